"""Configuration, resolved once when a family converts an HF config (penzai style: no branching on model names
at forward time). `HookedVLMConfig` keeps the decoder's fields flat under TransformerLens names, because TL's
generic utilities (ActivationCache, patching, head_detector) read them from `model.cfg`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VisionCfg:
    """One vision transformer. The family picks the tower class; these fields size and shape it."""

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    act_fn: str
    patch_size: int
    image_size: int = 0  # fixed input size of CLIP/SigLIP towers; 0 for Qwen towers (any size)
    n_channels: int = 3
    normalization_type: str = "LN"  # "LN" | "RMS"
    eps: float = 1e-5
    gated_mlp: bool = False
    class_token: bool = False  # CLIP
    pre_norm: bool = False  # CLIP's pre_layrnorm
    post_norm: bool = False  # the tower's output passes its final norm (SigLIP's post_layernorm; Gemma 3 reads it)
    patch_bias: bool = False
    temporal_patch_size: int = 1  # Qwen2-VL 3-D patches
    spatial_merge_size: int = 1  # Qwen2-VL patch merger
    window_size: int = 0  # Qwen2.5-VL window attention (pixels); 0 = full attention everywhere
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class HookedVLMConfig:
    # decoder, under TransformerLens names
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    act_fn: str = "silu"
    eps: float = 1e-6
    rope_theta: float = 10000.0
    mrope_section: list[int] | None = None  # M-RoPE sections (Qwen2-VL); None = 1-D RoPE
    # rope types whose frequencies depend on the input length (components/rotary.py): {"rope_type": "dynamic",
    # "factor", "max_position_embeddings"} or {"rope_type": "longrope", "long_factor",
    # "original_max_position_embeddings"}; None for the static types (their inv_freq is copied from HF)
    rope_scaling: dict[str, Any] | None = None
    mrope_interleaved: bool = False  # Qwen3-VL: t/h/w frequencies interleaved (t h w t h w ...), not in sections
    qk_norm: bool = False  # Qwen3-VL, Gemma 3: RMSNorm over d_head on every query / key head, before the rotary
    # decoder layers whose residual stream gets a per-layer addition from the image features after their MLP
    # (Qwen3-VL DeepStack: layer l gets the l-th vision feature level at image positions), hook `hook_deepstack`
    deepstack_layers: list[int] = field(default_factory=list)
    # per decoder layer: None = full causal attention, w = sliding window (the query and the w - 1 positions before
    # it; Mistral, Qwen2's layers from max_window_layers on). None here = every layer full.
    layer_windows: list[int | None] | None = None
    # Gemma 3's decoder (defaults = Llama / Qwen2). The sliding-window layers' own rope base: those layers then
    # rotate with `model.rotary_local` (inv_freq copied from HF); None = one rotary for every layer.
    local_rope_theta: float | None = None
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w) in float32 (Gemma: 1); 0 = w in model dtype
    attn_scale: float | None = None  # attention score scale (Gemma: query_pre_attn_scalar ** -0.5); None = d_head ** -0.5
    post_norms: bool = False  # norms on the attention / MLP outputs before the residual add (ln1_post / ln2_post)
    embed_scale: float | None = None  # token embeddings times this (rounded to the model dtype, as HF does)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    n_ctx: int = 4096
    normalization_type: str = "RMS"
    final_rms: bool = True
    attn_only: bool = False
    positional_embedding_type: str = "rotary"
    use_split_qkv_input: bool = False
    default_prepend_bos: bool = False  # the processor decides what the prompt starts with
    tokenizer_prepends_bos: bool = False
    n_devices: int = 1
    device: Any = "cpu"
    dtype: torch.dtype = torch.float32
    # the multimodal parts
    family: str = ""
    model_name: str = ""
    image_token_id: int = -1
    vision: VisionCfg | None = None
    projector_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"
    family_options: dict[str, Any] = field(default_factory=dict)  # e.g. LLaVA-OV grid pinpoints

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab
