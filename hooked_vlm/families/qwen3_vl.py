"""Qwen3-VL (`qwen3_vl`): the Qwen2-VL pipeline (inputs, M-RoPE position ids, TokenLayout, errors: see
families/qwen2_vl.py and its worked example) with four differences, all resolved when the model is built:

- vision tower (vision/qwen3_vit.py): learned position embeddings resampled to each image's grid, added to the
  patches before the blocks; LayerNorm / GELU(tanh) blocks; the merger's output width is `out_hidden_size`.
- DeepStack: the outputs of vision blocks `deepstack_visual_indexes[j]` go through their own mergers
  (`projector.deepstack.{j}.hook_out`) and are added to the residual stream at the image positions after decoder
  block j's MLP (`blocks.{j}.hook_deepstack` [batch, pos, d_model], zero elsewhere), inside block j's
  resid_post, so resid_post(j) = resid_pre(j + 1) as in TransformerLens. `HookedVLMCache.decompose_resid` lists
  each addition as the component `{j}_deepstack`.
- interleaved M-RoPE: frequency i of d_head / 2 rotates by the height position if i % 3 == 1 (i < 3 *
  mrope_section[1]), by the width position if i % 3 == 2 (i < 3 * mrope_section[2]), else by the temporal one.
  HF applies the interleaving whatever `rope_parameters["mrope_interleaved"]` says, and so do we.
- qk-norm: RMSNorm over d_head on every query and key head (`attn.q_norm`, `attn.k_norm`) before rotary;
  `head_dim` is read from the config (not hidden_size / n_heads); q/k/v/o biases follow `attention_bias`.

Position ids for images are Qwen2-VL's (HF's Qwen3-VL `get_rope_index` differs only for videos, which it splits
into one-frame grids separated by timestamps). Refused by name: video inputs (`pixel_values_videos`,
`video_grid_thw`, video tokens in mm_token_type_ids), precomputed encoder outputs (`mm_encoder_outputs`) and
`inputs_embeds` (as every family).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..config import HookedVLMConfig, VisionCfg
from ..vision.qwen3_vit import Qwen3Projector, Qwen3ViTTower
from . import register
from .backbones import DECODER_IGNORED, DECODER_IMPLEMENTED
from .base import LLAMA_NORMS, Accept, FieldRules, ImageInputs, KeyMapper, decoder_fields, map_decoder
from .qwen2_vl import QWEN_VIT_IMPLEMENTED, QWEN_VL_TOP, Qwen2VL


def _text_rope_ok(rope: Any) -> bool:
    # M-RoPE with the default frequencies; HF interleaves whatever `mrope_interleaved` says, and so do we
    rope = rope or {}
    return rope.get("rope_type", "default") == "default" and rope.get("partial_rotary_factor", 1.0) in (None, 1.0)


QWEN3_VL_FIELDS = (
    FieldRules("Qwen3VLConfig", **QWEN_VL_TOP),
    FieldRules("Qwen3VLTextConfig", implemented=DECODER_IMPLEMENTED + ("attention_bias", "head_dim"),
               ignored={k: v for k, v in DECODER_IGNORED.items() if k not in ("bos_token_id", "eos_token_id")},
               refused={"rope_parameters": Accept("rope_type 'default' (M-RoPE, interleaved), partial_rotary_factor 1.0",
                                                  _text_rope_ok)}),
    FieldRules("Qwen3VLVisionConfig",
               implemented=QWEN_VIT_IMPLEMENTED + ("intermediate_size", "out_hidden_size", "num_position_embeddings",
                                                   "deepstack_visual_indexes"),
               ignored={"initializer_range": "initialisation only"},
               refused={"rope_parameters": Accept("rope_type 'axial' (2-D rope: rope_theta only)",
                                                  lambda r: (r or {}).get("rope_type", "axial") == "axial")}),
)


class Qwen3VL(Qwen2VL):
    model_type = "qwen3_vl"
    config_fields = QWEN3_VL_FIELDS

    def vision_cfg(self, vc: Any) -> VisionCfg:
        rope = getattr(vc, "rope_parameters", None) or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"qwen3_vl: vision rope_type {rope.get('rope_type')!r} is not supported (HF allows 'axial')")
        return VisionCfg(
            d_model=vc.hidden_size, n_layers=vc.depth, n_heads=vc.num_heads, d_mlp=vc.intermediate_size,
            act_fn=vc.hidden_act, patch_size=vc.patch_size, n_channels=vc.in_channels, normalization_type="LN",
            eps=1e-6, patch_bias=True, temporal_patch_size=vc.temporal_patch_size,
            spatial_merge_size=vc.spatial_merge_size, rope_theta=rope.get("rope_theta", 10000.0),
        )

    def merger_width(self, vc: Any) -> int:
        return vc.out_hidden_size

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        tc, vc = hf_config.text_config, hf_config.vision_config
        for name in ("patch_size", "temporal_patch_size"):
            if not isinstance(getattr(vc, name), int):
                raise ValueError(f"qwen3_vl: a non-square vision {name} {getattr(vc, name)} is not supported")
        if self.merger_width(vc) != tc.hidden_size:
            raise ValueError(f"the patch merger outputs width {vc.out_hidden_size}, the decoder's is {tc.hidden_size}")
        levels = list(vc.deepstack_visual_indexes)
        if len(levels) > tc.num_hidden_layers:
            raise ValueError(f"qwen3_vl: {len(levels)} DeepStack levels but only {tc.num_hidden_layers} decoder layers")
        rope = getattr(tc, "rope_parameters", None) or {}
        fields = decoder_fields(tc)
        fields.update(tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
        bias = bool(getattr(tc, "attention_bias", False))
        return HookedVLMConfig(
            **fields, mrope_section=list(rope.get("mrope_section", [24, 20, 20])), mrope_interleaved=True,
            qk_norm=True, deepstack_layers=list(range(len(levels))), qkv_bias=bias, o_bias=bias,
            family=self.model_type, image_token_id=hf_config.image_token_id, vision=self.vision_cfg(vc),
            family_options=dict(video_token_id=getattr(hf_config, "video_token_id", None),
                                vision_start_token_id=getattr(hf_config, "vision_start_token_id", None),
                                vision_end_token_id=getattr(hf_config, "vision_end_token_id", None),
                                num_position_embeddings=vc.num_position_embeddings,
                                deepstack_visual_indexes=levels),
        )

    def build_vision(self, cfg: HookedVLMConfig) -> nn.Module:
        o = cfg.family_options
        return Qwen3ViTTower(cfg.vision, o["num_position_embeddings"], o["deepstack_visual_indexes"])

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        return Qwen3Projector(cfg.vision, cfg.d_model, len(cfg.deepstack_layers))

    def image_features(self, model: nn.Module, plan: ImageInputs) -> tuple[Tensor, dict[int, Tensor]]:
        """(features [n_tokens, d_model], {decoder layer j: DeepStack features [n_tokens, d_model]})."""
        hidden, levels = model.vision(plan.pixel_values, plan.geometry)
        extra = {j: merger(h) for j, (merger, h) in enumerate(zip(model.projector.deepstack, levels))}
        return model.projector(hidden), extra

    def map_vision_mlp(self, km: KeyMapper, ours: str, hf: str) -> None:
        km.linear(f"{ours}.fc_in", f"{hf}.linear_fc1")
        km.linear(f"{ours}.fc_out", f"{hf}.linear_fc2")

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        km = KeyMapper(hf_sd, self.ignored_keys)
        v, vis = cfg.vision, "model.visual"
        km.put("vision.patch_embed.weight", km.take(f"{vis}.patch_embed.proj.weight").reshape(v.d_model, -1))
        km.map("vision.patch_embed.bias", f"{vis}.patch_embed.proj.bias")
        km.map("vision.pos_embed", f"{vis}.pos_embed.weight")
        self.map_vision_blocks(km, v.n_layers, vis)
        mergers = [("projector", f"{vis}.merger")]
        mergers += [(f"projector.deepstack.{j}", f"{vis}.deepstack_merger_list.{j}") for j in range(len(cfg.deepstack_layers))]
        for ours, hf in mergers:
            km.norm(f"{ours}.ln_q", f"{hf}.norm")
            km.linear(f"{ours}.fc_in", f"{hf}.linear_fc1")
            km.linear(f"{ours}.fc_out", f"{hf}.linear_fc2")
        map_decoder(km, cfg, "model.language_model", "lm_head.weight",
                    norms=LLAMA_NORMS + (("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm")))
        return km.finish()


register(Qwen3VL())
