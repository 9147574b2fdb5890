"""What a family module provides, and the weight-conversion helpers they share.

A family is a stateless object registered under an HF `config.model_type`. It resolves the HF config into a
`HookedVLMConfig`, builds the family's vision tower and projector, turns image inputs into features in
reading order, computes position ids, describes image tokens for `TokenLayout`, and maps HF weights. Shared
components never ask which family they are in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import HookedVLMConfig


@dataclass
class ImageCoords:
    """Per image token of one image, in feature order: crop (0 = base grid; family-defined beyond), row, col
    (-1 for separator tokens such as LLaVA-OV's image_newline) and temporal index t. `grids[crop]` is that
    crop's (rows, cols) so pixel boxes can be mapped to tokens."""

    crop: Tensor
    row: Tensor
    col: Tensor
    t: Tensor
    grids: dict[int, tuple[int, int]]


class Family:
    model_type: ClassVar[str]
    # keywords the HF forward takes for these inputs, beyond input_ids / attention_mask / position_ids
    image_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # HF keys deliberately not converted, as (prefix, why)
    ignored_keys: ClassVar[tuple[tuple[str, str], ...]] = ()

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        raise NotImplementedError

    def build_vision(self, cfg: HookedVLMConfig) -> nn.Module:
        raise NotImplementedError

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        raise NotImplementedError

    def image_features(self, model: nn.Module, input_ids: Tensor, **image_inputs: Any) -> Tensor:
        """[n_image_tokens, d_model], in the reading order of the image tokens in `input_ids`."""
        raise NotImplementedError

    def position_ids(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, **image_inputs: Any) -> Tensor:
        """Default: HF's plain 0..S-1 (left pads counted), [batch, pos]."""
        b, s = input_ids.shape
        return torch.arange(s, device=input_ids.device).expand(b, s)

    def image_coords(self, model: nn.Module, input_ids: Tensor, **image_inputs: Any) -> list[ImageCoords]:
        raise NotImplementedError

    def end_of_image_offset(self) -> int:
        """Where the 'end-of-image' token sits relative to the last image token: 0 = the last image token itself
        (LLaVA has no end marker), 1 = the next token (Qwen2-VL's <|vision_end|>)."""
        return 0

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        raise NotImplementedError

    def check_processor(self, processor: Any) -> None:
        """Raise if the processor would make inputs this family cannot describe (default: accept any)."""

    def attention_groups(self, model: nn.Module, input_ids: Tensor, **image_inputs: Any) -> Tensor | None:
        """[batch, pos] group ids (-1 = none): positions of one group attend to each other in both directions on
        top of the causal mask (Gemma 3: the tokens of one image). Default None: purely causal."""
        return None

    def rotary_from_hf(self, hf_model: nn.Module) -> dict[str, tuple[Tensor, float]]:
        """{our rotary module: (inv_freq, attention_scaling)} copied from the HF decoder's rotary embedding, so any
        rope_type HF supports is honoured. Default: the single `language_model.rotary_emb`."""
        rot = hf_rotary(hf_model)
        return {"rotary": (rot.inv_freq.detach().float().clone(), getattr(rot, "attention_scaling", 1.0))}


def hf_rotary(hf_model: nn.Module) -> nn.Module:
    """The HF decoder's rotary embedding module (`...language_model.rotary_emb`)."""
    for name, mod in hf_model.named_modules():
        if name.endswith("language_model.rotary_emb"):
            return mod
    raise ValueError("could not find the decoder's rotary embedding (language_model.rotary_emb) in the HF model")


class KeyMapper:
    """Takes HF tensors by name and records which were used, so that conversion can insist every key is used."""

    def __init__(self, hf_sd: dict[str, Tensor], ignored: tuple[tuple[str, str], ...] = ()):
        self.hf_sd, self.ignored, self.used, self.out = hf_sd, ignored, set(), {}

    def take(self, hf_key: str) -> Tensor:
        if hf_key not in self.hf_sd:
            raise KeyError(f"the HF checkpoint has no weight {hf_key!r}")
        self.used.add(hf_key)
        return self.hf_sd[hf_key]

    def has(self, hf_key: str) -> bool:
        return hf_key in self.hf_sd

    def put(self, ours: str, tensor: Tensor) -> None:
        self.out[ours] = tensor

    def map(self, ours: str, hf_key: str) -> None:
        self.put(ours, self.take(hf_key))

    def linear(self, ours: str, hf_prefix: str) -> None:
        self.map(f"{ours}.weight", f"{hf_prefix}.weight")
        if self.has(f"{hf_prefix}.bias"):
            self.map(f"{ours}.bias", f"{hf_prefix}.bias")

    def norm(self, ours: str, hf_prefix: str) -> None:
        self.map(f"{ours}.w", f"{hf_prefix}.weight")
        if self.has(f"{hf_prefix}.bias"):
            self.map(f"{ours}.b", f"{hf_prefix}.bias")

    def finish(self) -> dict[str, Tensor]:
        left = [k for k in self.hf_sd if k not in self.used and not any(k.startswith(p) for p, _ in self.ignored)]
        if left:
            raise ValueError(f"{len(left)} HF weights were not converted (a conversion bug): {left[:8]}")
        return self.out


def map_decoder(km: KeyMapper, cfg: HookedVLMConfig, prefix: str, lm_head: str) -> None:
    """Llama / Qwen2 decoders share HF key names: embed_tokens, layers.{l}.self_attn/mlp, norm."""
    km.map("embed.weight", f"{prefix}.embed_tokens.weight")
    for l in range(cfg.n_layers):
        p, o = f"{prefix}.layers.{l}", f"blocks.{l}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            km.linear(f"{o}.attn.{proj}", f"{p}.self_attn.{proj}")
        km.linear(f"{o}.mlp.gate", f"{p}.mlp.gate_proj")
        km.linear(f"{o}.mlp.up", f"{p}.mlp.up_proj")
        km.linear(f"{o}.mlp.down", f"{p}.mlp.down_proj")
        km.norm(f"{o}.ln1", f"{p}.input_layernorm")
        km.norm(f"{o}.ln2", f"{p}.post_attention_layernorm")
    km.norm("ln_final", f"{prefix}.norm")
    km.map("unembed.weight", lm_head if km.has(lm_head) else f"{prefix}.embed_tokens.weight")


def map_vit_blocks(km: KeyMapper, n_layers: int, prefix: str) -> None:
    """CLIP / SigLIP encoder layers -> vision.blocks."""
    for i in range(n_layers):
        p, o = f"{prefix}.layers.{i}", f"vision.blocks.{i}"
        for proj, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            km.linear(f"{o}.attn.{ours}", f"{p}.self_attn.{proj}")
        km.linear(f"{o}.mlp.fc_in", f"{p}.mlp.fc1")
        km.linear(f"{o}.mlp.fc_out", f"{p}.mlp.fc2")
        km.norm(f"{o}.ln1", f"{p}.layer_norm1")
        km.norm(f"{o}.ln2", f"{p}.layer_norm2")


def decoder_fields(tc: Any) -> dict[str, Any]:
    """HookedVLMConfig fields of a Llama / Qwen2 text config."""
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None) or {}
    return dict(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=tc.num_attention_heads,
        n_key_value_heads=tc.num_key_value_heads or tc.num_attention_heads, d_head=d_head, d_mlp=tc.intermediate_size,
        d_vocab=tc.vocab_size, act_fn=tc.hidden_act, eps=tc.rms_norm_eps, rope_theta=rope.get("rope_theta", 10000.0),
        n_ctx=tc.max_position_embeddings, mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)), layer_windows=layer_windows(tc),
    )


def layer_windows(tc: Any) -> list[int | None] | None:
    """Per-layer sliding windows of a text config, as HF applies them: Mistral slides in every layer when
    `sliding_window` is set; Qwen2 (`use_sliding_window`) from layer `max_window_layers` on, which its config
    spells out in `layer_types`. None when every layer attends to all earlier positions."""
    window = getattr(tc, "sliding_window", None)
    if window is None:
        return None
    types = getattr(tc, "layer_types", None) or ["sliding_attention"] * tc.num_hidden_layers
    windows = [int(window) if kind == "sliding_attention" else None for kind in types]
    return windows if any(w is not None for w in windows) else None
