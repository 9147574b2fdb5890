"""Rotary position embeddings: 1-D RoPE (Llama, Qwen2), 3-D M-RoPE (Qwen2-VL decoder) and the 2-D RoPE of
the Qwen2-VL vision tower all share `apply_rotary`; they differ only in how cos/sin are built.

M-RoPE (Qwen2-VL): position ids have shape [3, batch, pos] (temporal, height, width). The half-dim frequency
axis is cut into `mrope_section` chunks (e.g. [16, 24, 24] for d_head 128); chunk i takes its angle from axis
i % 3, then the half is duplicated, exactly as HF's `recomposition_frequencies`.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from jaxtyping import Float, Real
from torch import Tensor, nn


# What a decoder block receives: one (cos, sin) for every layer, or, when layers rotate with different bases
# (Gemma 3's sliding layers), {rotary module name: (cos, sin)} from which each attention takes its own.
Rotary = Union[tuple[Tensor, Tensor], dict[str, tuple[Tensor, Tensor]]]


def map_rotary(rotary: Rotary | None, fn: Callable[[Tensor], Tensor]) -> Rotary | None:
    """`fn` applied to every cos / sin tensor of `rotary` (e.g. to move, slice or repeat them)."""
    if rotary is None:
        return None
    if isinstance(rotary, dict):
        return {k: (fn(c), fn(s)) for k, (c, s) in rotary.items()}
    return fn(rotary[0]), fn(rotary[1])


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Float[Tensor, "batch pos d_head"], sin: Float[Tensor, "batch pos d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin for 1-D positions [batch, pos] or, when `mrope_section` is set, 3-D positions [3, batch, pos].

    `inv_freq` is a buffer copied from the HF model at conversion, so any rope_type HF supports is honoured.
    """

    def __init__(self, d_head: int, theta: float, mrope_section: list[int] | None = None, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float) / d_head)))
        self.mrope_section = list(mrope_section) if mrope_section else None
        self.attention_scaling = attention_scaling

    def forward(self, position_ids: Real[Tensor, "*axes batch pos"], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [batch, pos, d_head]. Positions may be fractional (analyses re-rotate keys by any delta)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        if self.mrope_section is not None:
            if position_ids.ndim != 3 or position_ids.shape[0] != 3:
                raise ValueError(f"M-RoPE needs position_ids of shape [3, batch, pos]; got {tuple(position_ids.shape)}")
            freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        elif position_ids.ndim != 2:
            raise ValueError(f"1-D RoPE needs position_ids of shape [batch, pos]; got {tuple(position_ids.shape)}")
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
