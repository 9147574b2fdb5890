"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL with an RMSNorm / gated-SiLU vision tower that attends within windows of
`window_size` pixels except in `fullatt_block_indexes` blocks (see vision/qwen_vit.py for the window order of
the `vision.blocks.*` hooks), and a merger with an RMSNorm `ln_q`. Inputs, M-RoPE positions (worked example in
families/qwen2_vl.py; for still images HF applies no temporal scaling, so they are identical), TokenLayout and
errors are Qwen2-VL's. Unlike HF's Qwen2.5-VL, which silently falls back to 1-D positions when
`mm_token_type_ids` is missing, a missing `mm_token_type_ids` with `image_grid_thw` raises (as HF's Qwen2-VL).
"""
from __future__ import annotations

from typing import Any

from ..config import VisionCfg
from . import register
from .base import FieldRules, KeyMapper
from .qwen2_vl import QWEN_VIT_IMPLEMENTED, QWEN_VIT_REFUSED, QWEN_VL_TEXT, QWEN_VL_TOP, VIDEO_KWARGS, Qwen2VL

QWEN2_5_VL_FIELDS = (
    FieldRules("Qwen2_5_VLConfig", **QWEN_VL_TOP),
    FieldRules("Qwen2_5_VLTextConfig", **QWEN_VL_TEXT),
    FieldRules("Qwen2_5_VLVisionConfig",
               implemented=QWEN_VIT_IMPLEMENTED + ("fullatt_block_indexes", "intermediate_size", "out_hidden_size",
                                                   "window_size"),
               ignored={"initializer_range": "initialisation only",
                        "tokens_per_second": "temporal positions of videos, which are refused at the input"},
               refused=QWEN_VIT_REFUSED),
)


class Qwen2_5_VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    config_fields = QWEN2_5_VL_FIELDS
    image_kwargs = ("pixel_values", "image_grid_thw", "mm_token_type_ids") + VIDEO_KWARGS + ("second_per_grid_ts",)

    def vision_cfg(self, vc: Any) -> VisionCfg:
        return VisionCfg(
            d_model=vc.hidden_size, n_layers=vc.depth, n_heads=vc.num_heads, d_mlp=vc.intermediate_size,
            act_fn=vc.hidden_act, patch_size=vc.patch_size, n_channels=vc.in_channels, normalization_type="RMS",
            eps=1e-6, gated_mlp=True, temporal_patch_size=vc.temporal_patch_size,
            spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size,
            fullatt_block_indexes=tuple(vc.fullatt_block_indexes),
            rope_theta=(getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0),
        )

    def merger_width(self, vc: Any) -> int:
        return vc.out_hidden_size

    def map_vision_mlp(self, km: KeyMapper, ours: str, hf: str) -> None:
        km.linear(f"{ours}.gate", f"{hf}.gate_proj")
        km.linear(f"{ours}.up", f"{hf}.up_proj")
        km.linear(f"{ours}.down", f"{hf}.down_proj")


register(Qwen2_5_VL())
