"""Gemma 3 (`gemma3`): SigLIP tower (its final `post_layernorm` included) -> pooled projector (average pooling of
the patch grid to `mm_tokens_per_image` tokens, Gemma's (1 + w) RMSNorm, one matrix) -> Gemma 3 decoder.

The decoder, as configuration (no Gemma branch in shared code): token embeddings times sqrt(d_model) rounded to
the model dtype (`embed_scale`); RMSNorms that multiply by (1 + w) in float32 (`norm_offset=1`: a norm variant,
weights kept zero-centred as HF stores them, so bf16 rounds as HF does); pre- and post-norms around attention
and MLP (`post_norms`: input_layernorm -> ln1, post_attention_layernorm -> ln1_post, pre_feedforward_layernorm ->
ln2, post_feedforward_layernorm -> ln2_post); qk-norm (`attn.q_norm` / `attn.k_norm`, after hook_q / hook_k,
before the rotary); scores scaled by query_pre_attn_scalar ** -0.5; gated gelu_pytorch_tanh MLP; local layers
(`layer_types` "sliding_attention") with a sliding window and their own rotary (`model.rotary_local`, HF's
`rope_parameters["sliding_attention"]`), global layers with `model.rotary` (`rope_parameters["full_attention"]`,
its scaling included: inv_freq and attention_scaling are copied from HF per layer type).

Inputs are what Gemma3Processor returns: `input_ids`, `attention_mask`, `pixel_values` [n_images, 3, H, W] and
`token_type_ids` [batch, pos] (1 at image tokens). Each image is ``\\n\\n<start_of_image> <image_soft_token> x
mm_tokens_per_image <end_of_image>\\n\\n`` in the text. As in HF, when `token_type_ids` is given, the tokens of
one image (one run of token_type_ids == 1) attend to each other in both directions (HF's blockwise overlay, OR-ed
with causal; in local layers the window still bounds how far back a query sees); without it attention is
causal everywhere (HF's behaviour too). `blocks.{l}.attn.hook_pattern` shows the bidirectional block.

Worked example (mm_tokens_per_image = 4: a 2 x 2 token grid; one image):

    tokens:      A  \\n\\n  <boi>  <img> <img> <img> <img>  <eoi>  \\n\\n  B
    token_type:  0   0     0      1     1     1     1      0      0    0
    row, col:    -     -     -    (0,0) (0,1) (1,0) (1,1)   -      -    -

The four <img> tokens see each other (and every earlier token); end_of_image() is <end_of_image> (offset 1).

Refused by name (ValueError): final_logit_softcapping / attn_logit_softcapping set (Gemma 3 checkpoints leave
them None), use_bidirectional_attention (text-only embedding models), rope types that change inv_freq with the
sequence length (dynamic, longrope), a processor with do_pan_and_scan (the processor drops `num_crops`, so
TokenLayout cannot tell an image's crops from separate images).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import HookedVLMConfig, VisionCfg
from ..projector import PooledProjector
from ..vision import ViTTower
from . import register
from .backbones import SIGLIP_VISION
from .base import (Accept, Family, FieldRules, ImageCoords, ImageInputs, KeyMapper, hf_rotary, layer_windows, make_plan,
                   map_decoder, only)
from .llava import map_vit

STATIC_ROPE = ("default", "linear", "yarn", "llama3")  # inv_freq fixed: copied from HF per layer type


def _rope_ok(rope: Any) -> bool:
    """Gemma 3's rope_parameters: {layer type: {rope_type, rope_theta, ...}} with static rope types only."""
    return all((p or {}).get("rope_type", "default") in STATIC_ROPE and (p or {}).get("partial_rotary_factor", 1.0) in (None, 1.0)
               for p in (rope or {}).values())


GEMMA3_FIELDS = (
    FieldRules("Gemma3Config",
               implemented=("text_config", "vision_config", "mm_tokens_per_image", "image_token_index",
                            "tie_word_embeddings"),
               ignored={"boi_token_index": "kept in family_options for the layout; not read by the forward",
                        "eoi_token_index": "kept in family_options for the layout; not read by the forward",
                        "initializer_range": "initialisation only"}),
    FieldRules("Gemma3TextConfig",
               implemented=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "hidden_activation", "rms_norm_eps", "attention_bias",
                            "query_pre_attn_scalar", "sliding_window", "layer_types", "max_position_embeddings",
                            "tie_word_embeddings"),
               ignored={"_sliding_window_pattern": "HF spells it out in layer_types, which is implemented",
                        "initializer_range": "initialisation only", "use_cache": "KV caching: same result",
                        "attention_dropout": "dropout: inference only", "pad_token_id": "tokenizer id",
                        "bos_token_id": "tokenizer id", "eos_token_id": "tokenizer / generation id"},
               refused={"final_logit_softcapping": only(None), "attn_logit_softcapping": only(None),
                        "use_bidirectional_attention": only(False, None),
                        "rope_parameters": Accept(f"per layer type, rope_type in {list(STATIC_ROPE)} (inv_freq copied "
                                                  "from HF), partial_rotary_factor 1.0", _rope_ok)}),
    SIGLIP_VISION,
)

RUNTIME_ROPE = ("dynamic", "longrope")  # inv_freq recomputed from the sequence length at run time


def image_groups(token_type_ids: Tensor) -> Tensor:
    """HF `get_block_sequence_ids_for_mask`: [batch, pos] index of the run of image tokens (token_type_ids == 1)
    each position belongs to, counted per prompt from 0; -1 for every other token."""
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


class Gemma3(Family):
    has_end_of_image_token = True
    config_fields = GEMMA3_FIELDS
    model_type = "gemma3"
    image_kwargs = ("pixel_values", "token_type_ids")
    ignored_keys = (("model.vision_tower.head", "SigLIP pooling head (vision_use_head): not used by Gemma 3"),)

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        tc, vc = hf_config.text_config, hf_config.vision_config
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(tc, name, None) is not None:
                raise ValueError(f"gemma3: {name}={getattr(tc, name)} is not supported (Gemma 3 checkpoints set None)")
        if getattr(tc, "use_bidirectional_attention", False):
            raise ValueError("gemma3: use_bidirectional_attention=True (bidirectional text attention) is not supported")
        rope = tc.rope_parameters or {}
        for kind in sorted(set(tc.layer_types)):
            rt = (rope.get(kind) or {}).get("rope_type", "default")
            if rt in RUNTIME_ROPE:
                raise ValueError(f"gemma3: rope_type {rt!r} for {kind} layers is not supported (its inv_freq depends on "
                                 "the sequence length at run time)")
        if vc.model_type != "siglip_vision_model":
            raise ValueError(f"gemma3: unsupported vision tower {vc.model_type!r}; expected 'siglip_vision_model'")
        side = vc.image_size // vc.patch_size
        per_side = int(hf_config.mm_tokens_per_image**0.5)
        if per_side * per_side != hf_config.mm_tokens_per_image or side % per_side:
            raise ValueError(f"gemma3: mm_tokens_per_image={hf_config.mm_tokens_per_image} must be a square whose side "
                             f"divides the patch grid side {side}")
        if "sliding_attention" in tc.layer_types and tc.sliding_window is None:
            raise ValueError("gemma3: sliding_attention layers without a sliding_window are not supported")
        windows = layer_windows(tc)
        sliding = any(w is not None for w in windows or [])
        return HookedVLMConfig(
            n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=tc.num_attention_heads,
            n_key_value_heads=tc.num_key_value_heads, d_head=tc.head_dim, d_mlp=tc.intermediate_size,
            d_vocab=tc.vocab_size, act_fn=tc.hidden_activation, eps=tc.rms_norm_eps,
            rope_theta=rope["full_attention"]["rope_theta"], n_ctx=tc.max_position_embeddings,
            layer_windows=windows, local_rope_theta=rope["sliding_attention"]["rope_theta"] if sliding else None,
            norm_offset=1.0, attn_scale=tc.query_pre_attn_scalar**-0.5, qk_norm=True, post_norms=True,
            embed_scale=tc.hidden_size**0.5, qkv_bias=bool(tc.attention_bias), o_bias=bool(tc.attention_bias),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            family=self.model_type, image_token_id=hf_config.image_token_id,
            vision=VisionCfg(
                d_model=vc.hidden_size, n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads,
                d_mlp=vc.intermediate_size, act_fn=vc.hidden_act, patch_size=vc.patch_size, image_size=vc.image_size,
                n_channels=vc.num_channels, eps=vc.layer_norm_eps, patch_bias=True, post_norm=True,
            ),
            projector_bias=False, vision_feature_layer=-1,
            family_options={"mm_tokens_per_image": hf_config.mm_tokens_per_image,
                            "boi_token_id": hf_config.boi_token_id, "eoi_token_id": hf_config.eoi_token_id},
        )

    def build_vision(self, cfg: HookedVLMConfig) -> nn.Module:
        return ViTTower(cfg.vision)

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        v = cfg.vision
        per_side = int(cfg.family_options["mm_tokens_per_image"] ** 0.5)
        return PooledProjector(v.d_model, cfg.d_model, v.image_size // v.patch_size, per_side, v.eps)

    def check_processor(self, processor: Any) -> None:
        if getattr(getattr(processor, "image_processor", None), "do_pan_and_scan", None):
            raise ValueError("gemma3: a processor with do_pan_and_scan=True is not supported (Gemma3Processor drops "
                             "num_crops, so TokenLayout cannot tell an image's crops from separate images); set "
                             "processor.image_processor.do_pan_and_scan = False")

    def plan(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
             **options: Any) -> ImageInputs:
        """token_type_ids checked and turned into image groups (bidirectional blocks) once per call."""
        token_type_ids = options.get("token_type_ids")
        groups = None
        if token_type_ids is not None:
            if tuple(token_type_ids.shape) != tuple(input_ids.shape):
                raise ValueError(f"token_type_ids: expected shape {tuple(input_ids.shape)} (as input_ids), "
                                 f"got {tuple(token_type_ids.shape)}")
            groups = image_groups(token_type_ids.to(input_ids.device))
        return make_plan(pixel_values, options, groups)

    def image_features(self, model: nn.Module, plan: ImageInputs) -> Tensor:
        return model.projector(model.vision(plan.pixel_values, [-1]))

    def attention_groups(self, model: nn.Module, input_ids: Tensor, plan: ImageInputs) -> Tensor | None:
        return plan.geometry

    def image_coords(self, model: nn.Module, plan: ImageInputs) -> list[ImageCoords]:
        side = int(model.cfg.family_options["mm_tokens_per_image"] ** 0.5)
        n = side * side
        one = ImageCoords(crop=torch.zeros(n, dtype=torch.long), row=torch.arange(side).repeat_interleave(side),
                          col=torch.arange(side).repeat(side), t=torch.zeros(n, dtype=torch.long), grids={0: (side, side)})
        return [one] * plan.pixel_values.shape[0]

    def end_of_image_offset(self) -> int:
        return 1  # <end_of_image> follows the last image token

    def rotary_from_hf(self, hf_model: nn.Module) -> dict[str, tuple[Tensor, float]]:
        rot = hf_rotary(hf_model)
        out = {}
        for ours, kind in (("rotary", "full_attention"), ("rotary_local", "sliding_attention")):
            if hasattr(rot, f"{kind}_inv_freq"):
                out[ours] = (getattr(rot, f"{kind}_inv_freq").detach().float().clone(),
                             float(getattr(rot, f"{kind}_attention_scaling", 1.0)))
        if "rotary" not in out:
            raise ValueError("gemma3: the HF rotary embedding has no full_attention_inv_freq")
        return out

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        km = KeyMapper(hf_sd, self.ignored_keys)
        map_vit(km, cfg.vision, "model.vision_tower")
        km.norm("vision.ln_post", "model.vision_tower.post_layernorm")
        km.norm("projector.norm", "model.multi_modal_projector.mm_soft_emb_norm")
        km.map("projector.W", "model.multi_modal_projector.mm_input_projection_weight")
        map_decoder(km, cfg, "model.language_model", "lm_head.weight", norms=(
            ("ln1", "input_layernorm"), ("ln1_post", "post_attention_layernorm"), ("ln2", "pre_feedforward_layernorm"),
            ("ln2_post", "post_feedforward_layernorm"), ("attn.q_norm", "self_attn.q_norm"),
            ("attn.k_norm", "self_attn.k_norm")))
        return km.finish()


register(Gemma3())
