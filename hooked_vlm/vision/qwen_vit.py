"""Qwen2-VL / Qwen2.5-VL vision tower (native resolution, 3-D patches, 2-D rotary) and its patch merger.

Input: the processor's `pixel_values` [n_patches, C * T * P * P] (every image's patches, concatenated) and
`image_grid_thw` [n_images, 3] (temporal, height, width in PATCHES). The processor orders each image's patches
in *merge-window order*: frame by frame, then merged row, merged col, then the merge_size x merge_size patches
inside that window (row-major), so that `merge_size**2` consecutive patches form one merged token.

    pixel_values --patch_embed--> hook_patch_embed [1, n_patches, d]          (processor order)
        (Qwen2.5-VL: reorder windows of merge units by `window_index`)
      --blocks.{i}--> [1, n_patches, d]                                     (Qwen2.5-VL: window order)
      --projector (PatchMerger: ln_q -> concat merge_size**2 patches -> fc_in -> GELU -> fc_out)
        (Qwen2.5-VL: undo the window order) --> projector.hook_out [n_tokens, d_model]  (reading order)

Attention never crosses images (nor frames): the tower runs with batch dimension 1 over all patches, and
attention is given the per-frame segment lengths (HF's `cu_seqlens`) as `components.attention.Segments`: the
fused path attends per segment (equal segments batched), so cost grows with the sum of squared image sizes,
not the square of the total; only a pattern / score hook builds the dense block-diagonal mask. Qwen2.5-VL's windowed blocks use the window segments (`cu_window_seqlens`) and
the blocks in `fullatt_block_indexes` use the per-frame ones. The 2-D rotary embedding (same frequencies for the
row and column halves) is built and applied in float32, then q/k are cast back, as in HF.

Qwen2.5-VL hook order: `vision.blocks.*` see the patches in HF's window order (consecutive windows of merge
units); `QwenViTTower.window_index(grid_thw)` gives, for each merged token of the window order, its index in
processor order (merge units), so the patch in window-order row i is processor row
`(window_index[:, None] * merge_size**2 + arange(merge_size**2)).flatten()[i]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..components import NORMS
from ..components.attention import Segments
from ..config import VisionCfg
from .vit import vision_block


def _check_grid(pixel_values: Tensor, grid_thw: Tensor, cfg: VisionCfg) -> None:
    if not isinstance(grid_thw, Tensor) or grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.is_floating_point():
        shape = tuple(getattr(grid_thw, "shape", ()))
        raise ValueError(f"image_grid_thw: expected an integer tensor [n_images, 3], got {shape} "
                         f"{getattr(grid_thw, 'dtype', type(grid_thw).__name__)}")
    patch_dim = cfg.n_channels * cfg.temporal_patch_size * cfg.patch_size**2
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(
            f"pixel_values: expected flattened patches [n_patches, {patch_dim}] (channels * temporal_patch_size * "
            f"patch_size**2), got {tuple(pixel_values.shape)}"
        )
    m = cfg.spatial_merge_size
    if ((grid_thw[:, 1:] % m) != 0).any():
        raise ValueError(
            f"image_grid_thw: height and width must be multiples of spatial_merge_size {m}, got {grid_thw.tolist()}"
        )
    n = int(grid_thw.prod(-1).sum())
    if n != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw describes {n} patches but pixel_values has {pixel_values.shape[0]} rows")


def vision_rotary_positions(grid_thw: Tensor, merge: int) -> Int[Tensor, "n_patches 2"]:
    """(row, col) in the patch grid of every patch, in the processor's merge-window order."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hpos, wpos = hpos.reshape(block).transpose(1, 2).flatten(), wpos.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_segments(grid_thw: Tensor) -> Tensor:
    """Lengths of the attention segments of full-attention blocks: one per frame of every image (HF cu_seqlens)."""
    return torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cpu()


def window_partition(grid_thw: Tensor, merge: int, window_size: int, patch_size: int) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL window attention: (window_index, window_lengths).

    window_index [n_merged_tokens]: merged-token (merge unit) indices in processor order, listed window by window
    (windows of `window_size // merge // patch_size` merged tokens per side, row-major within the window, per
    frame, per image). window_lengths: the number of patches of each non-empty window, in that order.
    """
    win = window_size // merge // patch_size
    if win <= 0:
        raise ValueError(f"window_size {window_size} is smaller than one merged patch ({merge * patch_size} px)")
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win  # as HF: a whole empty window when divisible (dropped below)
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        idx = F.pad(idx, (0, pad_w, 0, pad_h), "constant", -100)
        idx = idx.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        counts = (idx != -100).sum(-1).flatten()
        flat = idx.flatten()
        index.append(flat[flat != -100] + offset)
        lengths.append(counts[counts > 0] * merge * merge)
        offset += t * gh * gw
    return torch.cat(index), torch.cat(lengths)


@dataclass(frozen=True)
class QwenGrid:
    """One call's images as the tower sees them, checked and partitioned once (`plan_grid`): the grid
    [n_images, 3] (long, CPU), the per-frame attention segments, and Qwen2.5-VL's window partition (None without
    windows): `window_index` [n_merged_tokens] (processor-order merge units, window by window) and the window
    segments' lengths in patches."""

    grid_thw: Tensor
    frames: Tensor
    window_index: Tensor | None = None
    window_lengths: Tensor | None = None


def plan_grid(pixel_values: Tensor, grid_thw: Tensor, cfg: VisionCfg) -> QwenGrid:
    """Check `grid_thw` against `pixel_values` (plain messages) and compute the attention segments once."""
    _check_grid(pixel_values, grid_thw, cfg)
    grid_thw = grid_thw.cpu().long()
    index = lengths = None
    if cfg.window_size:
        index, lengths = window_partition(grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    return QwenGrid(grid_thw, frame_segments(grid_thw), index, lengths)


class QwenViTTower(nn.Module):
    """Patch embedding, 2-D rotary and bidirectional blocks; returns the last block's output [n_patches, d]
    (in window order for Qwen2.5-VL: the PatchMerger undoes it)."""

    def __init__(self, cfg: VisionCfg):
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.n_channels * cfg.temporal_patch_size * cfg.patch_size**2
        # HF's Conv3d with kernel = stride = (T, P, P) over [C, T, P, P] patches is this linear map
        self.patch_embed = nn.Linear(patch_dim, cfg.d_model, bias=cfg.patch_bias)
        self.blocks = nn.ModuleList(vision_block(cfg, rotary=True, rotary_in_float32=True) for _ in range(cfg.n_layers))
        self.hook_patch_embed = HookPoint()  # [1, n_patches, d], processor order

    def rotary(self, grid_thw: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """float32 (cos, sin) [1, n_patches, d_head] in processor order: first half of the rotated pairs by row,
        second by column (HF's axial rope), each with inv_freq over d_head // 2."""
        spatial = self.cfg.d_head // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        pos = vision_rotary_positions(grid_thw.cpu(), self.cfg.spatial_merge_size).to(device)
        freqs = pos[..., None].float() * inv_freq.to(device)  # [n, 2, d_head // 4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[None], emb.sin()[None]

    def window_index(self, grid_thw: Tensor) -> Tensor | None:
        """Qwen2.5-VL: merged-token indices (processor order) in the window order the blocks see; None without windows."""
        if not self.cfg.window_size:
            return None
        return window_partition(grid_thw.cpu(), self.cfg.spatial_merge_size, self.cfg.window_size, self.cfg.patch_size)[0]

    def forward(self, pixel_values: Tensor, grid: QwenGrid | Tensor) -> Float[Tensor, "n_patches d"]:
        """pixel_values [n_patches, C*T*P*P]; `grid` the call's `QwenGrid` (the family's plan), or image_grid_thw
        [n_images, 3] (then checked and partitioned here)."""
        cfg = self.cfg
        grid = grid if isinstance(grid, QwenGrid) else plan_grid(pixel_values, grid, cfg)
        dev = self.patch_embed.weight.device
        x = self.hook_patch_embed(self.patch_embed(pixel_values.to(dev, self.patch_embed.weight.dtype))[None])
        cos, sin = self.rotary(grid.grid_thw, dev)
        full_mask = Segments(grid.frames)
        window_mask = full_mask
        if grid.window_index is not None:
            unit = cfg.spatial_merge_size**2
            order = (grid.window_index[:, None] * unit + torch.arange(unit)).flatten().to(dev)
            x, cos, sin = x[:, order], cos[:, order], sin[:, order]
            window_mask = Segments(grid.window_lengths)
        for i, block in enumerate(self.blocks):
            mask = full_mask if (grid.window_index is None or i in cfg.fullatt_block_indexes) else window_mask
            x = block(x, (cos, sin), mask)
        return x[0]


class PatchMerger(nn.Module):
    """ln_q on each patch, concatenate each window of merge_size**2 patches, then fc_in -> GELU -> fc_out.
    `hook_out` is the image features exactly as they are placed into the token sequence [n_tokens, d_model]."""

    def __init__(self, cfg: VisionCfg, d_model: int):
        super().__init__()
        self.unit = cfg.spatial_merge_size**2
        d_in = cfg.d_model * self.unit
        self.ln_q = NORMS[cfg.normalization_type](cfg.d_model, cfg.eps)
        self.fc_in = nn.Linear(d_in, d_in)
        self.fc_out = nn.Linear(d_in, d_model)
        self.hook_in = HookPoint()  # the tower's output [n_patches, d_vision]
        self.hook_merged = HookPoint()  # normed patches, merge_size**2 concatenated [n_tokens, d_vision * merge_size**2]
        self.hook_post = HookPoint()  # after the GELU [n_tokens, d_vision * merge_size**2]
        self.hook_out = HookPoint()  # [n_tokens, d_model], reading order

    def forward(
        self, x: Float[Tensor, "n_patches d"], window_index: Tensor | None = None
    ) -> Float[Tensor, "n_tokens d_model"]:
        x = self.ln_q(self.hook_in(x))
        x = self.hook_merged(x.reshape(-1, x.shape[-1] * self.unit))
        x = self.fc_out(self.hook_post(F.gelu(self.fc_in(x))))
        if window_index is not None:
            x = x[torch.argsort(window_index).to(x.device)]
        return self.hook_out(x)


__all__ = ["QwenViTTower", "PatchMerger", "QwenGrid", "plan_grid", "window_partition", "vision_rotary_positions"]
