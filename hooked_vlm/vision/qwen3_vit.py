"""Qwen3-VL vision tower: the Qwen2-VL tower (3-D patches, 2-D rotary, attention within each image; see
vision/qwen_vit.py) plus learned absolute position embeddings resampled to every image's grid, and DeepStack
mergers that turn the outputs of chosen blocks into extra features for the first decoder layers.

    pixel_values --patch_embed--> hook_patch_embed [1, n_patches, d]                        (processor order)
      + pos_embed resampled bilinearly (align_corners) from its side x side table --> hook_embed
      --blocks.{i}--> ... the output of block deepstack_visual_indexes[j]
                          --projector.deepstack.{j} (LayerNorm AFTER concatenating 2x2 patches)-->
                          projector.deepstack.{j}.hook_out [n_tokens, d_model] -> decoder block j's `hook_deepstack`
      --last block--> projector (PatchMerger, LayerNorm per patch) --> projector.hook_out [n_tokens, d_model]

The resampling follows HF's `fast_pos_embed_interpolate` (`get_vision_interpolation_indices_and_weights`): patch
(row r, col c) of an h x w grid reads the table at (r * (side - 1) / (h - 1), c * (side - 1) / (w - 1)) with the
four neighbours weighted bilinearly; every frame of a video reuses the same grid.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..components import NORMS
from ..components.attention import Segments
from ..config import VisionCfg
from .qwen_vit import PatchMerger, QwenGrid, QwenViTTower, plan_grid, vision_rotary_positions


def _axis_taps(index: Tensor, size: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """Bilinear taps (floor, floor + 1, clamped) and weights on one axis, corners aligned."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1).float()
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def position_interpolation(grid_thw: Tensor, side: int, merge: int) -> tuple[Tensor, Tensor]:
    """(indices, weights) [n_patches, 4] into the flattened side x side table, in the processor's patch order."""
    rows_cols = vision_rotary_positions(grid_thw, merge)
    counts = grid_thw.prod(-1)
    heights = torch.repeat_interleave(grid_thw[:, 1], counts)
    widths = torch.repeat_interleave(grid_thw[:, 2], counts)
    h_taps, h_w = _axis_taps(rows_cols[:, 0], heights, side)
    w_taps, w_w = _axis_taps(rows_cols[:, 1], widths, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices, weights


class Qwen3ViTTower(QwenViTTower):
    """Returns (last block's output [n_patches, d], [output of block i for i in deepstack_visual_indexes])."""

    def __init__(self, cfg: VisionCfg, num_position_embeddings: int, deepstack_visual_indexes: list[int]):
        super().__init__(cfg)
        self.side = int(num_position_embeddings**0.5)
        if self.side**2 != num_position_embeddings:
            raise ValueError(f"num_position_embeddings must be a square (a side x side table), got {num_position_embeddings}")
        bad = [i for i in deepstack_visual_indexes if not 0 <= i < cfg.n_layers]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are outside the tower's blocks 0..{cfg.n_layers - 1}")
        self.deepstack_visual_indexes = list(deepstack_visual_indexes)
        self.pos_embed = nn.Parameter(torch.zeros(num_position_embeddings, cfg.d_model))
        self.hook_embed = HookPoint()  # patches + resampled positions, the first block's input [1, n_patches, d]

    def forward(self, pixel_values: Tensor, grid: QwenGrid | Tensor) -> tuple[Float[Tensor, "n_patches d"], list[Tensor]]:
        """As QwenViTTower.forward (`grid`: the call's QwenGrid, or image_grid_thw), plus the DeepStack levels."""
        cfg = self.cfg
        grid = grid if isinstance(grid, QwenGrid) else plan_grid(pixel_values, grid, cfg)
        grid_thw = grid.grid_thw
        dev = self.patch_embed.weight.device
        x = self.hook_patch_embed(self.patch_embed(pixel_values.to(dev, self.patch_embed.weight.dtype))[None])
        index, weight = position_interpolation(grid_thw, self.side, cfg.spatial_merge_size)
        # float32 weights times the table (promoted, as HF), summed over the 4 taps, then cast to the patches' dtype
        pos = (self.pos_embed[index.to(dev)] * weight.to(dev)[..., None]).sum(1)
        x = self.hook_embed(x + pos.to(x.dtype))
        cos, sin = self.rotary(grid_thw, dev)
        mask = Segments(grid.frames)
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x, (cos, sin), mask)
            if i in self.deepstack_visual_indexes:
                levels.append(x[0])
        return x[0], levels


class PostShuffleMerger(PatchMerger):
    """DeepStack merger: concatenate merge_size**2 patches, THEN LayerNorm over the concatenation (HF's
    `use_postshuffle_norm=True`), fc_in -> GELU -> fc_out. Same hooks as PatchMerger."""

    def __init__(self, cfg: VisionCfg, d_model: int):
        super().__init__(cfg, d_model)
        self.ln_q = NORMS[cfg.normalization_type](cfg.d_model * self.unit, cfg.eps)

    def forward(self, x: Float[Tensor, "n_patches d"], window_index: Tensor | None = None) -> Float[Tensor, "n_tokens d_model"]:
        x = self.hook_in(x)
        x = self.hook_merged(self.ln_q(x.reshape(-1, x.shape[-1] * self.unit)))
        return self.hook_out(self.fc_out(self.hook_post(torch.nn.functional.gelu(self.fc_in(x)))))


class Qwen3Projector(PatchMerger):
    """The main merger (projector.*, as Qwen2-VL's) plus `deepstack.{j}`, one PostShuffleMerger per DeepStack level."""

    def __init__(self, cfg: VisionCfg, d_model: int, n_deepstack: int):
        super().__init__(cfg, d_model)
        self.deepstack = nn.ModuleList(PostShuffleMerger(cfg, d_model) for _ in range(n_deepstack))


__all__ = ["Qwen3ViTTower", "Qwen3Projector", "PostShuffleMerger", "position_interpolation"]
