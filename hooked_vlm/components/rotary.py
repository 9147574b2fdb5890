"""Rotary position embeddings: 1-D RoPE (Llama, Qwen2), 3-D M-RoPE (Qwen2-VL decoder) and the 2-D RoPE of
the Qwen2-VL vision tower all share `apply_rotary`; they differ only in how cos/sin are built.

M-RoPE (Qwen2-VL): position ids have shape [3, batch, pos] (temporal, height, width). The half-dim frequency
axis is cut into `mrope_section` chunks (e.g. [16, 24, 24] for d_head 128); chunk i takes its angle from axis
i % 3, then the half is duplicated, exactly as HF's `recomposition_frequencies`.

Rope types (HF `rope_parameters["rope_type"]`): the static ones (default, linear, yarn, llama3) are a fixed
`inv_freq` and `attention_scaling`, both copied from HF's rotary module at conversion. Two depend on the input:
"dynamic" (NTK) recomputes inv_freq from the largest position when it is beyond `max_position_embeddings`, and
"longrope" switches to its long factors beyond `original_max_position_embeddings`. We do both per call, from the
positions of that call; HF keeps the grown frequencies as state until a short input resets them, so its result
for an input can depend on the inputs before it (ours does not; on a fresh HF model the two agree).

Interleaved M-RoPE (Qwen3-VL, `interleaved=True`): frequency j takes its angle from height if j % 3 == 1 and
j < 3 * mrope_section[1], from width if j % 3 == 2 and j < 3 * mrope_section[2], else from the temporal axis
(HF's Qwen3-VL `recomposition_frequencies`), so every axis spans low and high frequencies.
"""
from __future__ import annotations

from typing import Any, Callable, Union

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

    `inv_freq` is a buffer copied from the HF model at conversion (the short-input frequencies of the dynamic
    types); `scaling` holds what the dynamic types need to recompute it (see the module docstring).
    """

    def __init__(self, d_head: int, theta: float, mrope_section: list[int] | None = None, attention_scaling: float = 1.0,
                 scaling: dict[str, Any] | None = None, interleaved: bool = False):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float) / d_head)))
        self.mrope_section = list(mrope_section) if mrope_section else None
        self.attention_scaling = attention_scaling
        # interleaved M-RoPE: the axis (0 t, 1 h, 2 w) of every frequency, resolved here once
        self.mrope_axes: list[int] | None = None
        if interleaved:
            if self.mrope_section is None or len(self.mrope_section) != 3:
                raise ValueError(f"interleaved M-RoPE needs a 3-part mrope_section, got {mrope_section}")
            half = d_head // 2
            axes = [0] * half
            for axis in (1, 2):
                for j in range(axis, min(3 * self.mrope_section[axis], half), 3):
                    axes[j] = axis
            self.mrope_axes = axes
        self.d_head, self.theta, self.scaling = d_head, theta, dict(scaling or {})
        if self.scaling and self.mrope_section:
            raise ValueError(f"rope type {self.scaling.get('rope_type')!r} is not supported with M-RoPE")

    def inv_freq_for(self, position_ids: Tensor) -> Tensor:
        """The frequencies for this call: `inv_freq`, or the dynamic types' long-input ones (HF's formulas and
        float32 arithmetic, `dynamic_rope_update`)."""
        kind = self.scaling.get("rope_type")
        if kind is None or position_ids.numel() == 0:
            return self.inv_freq.float()
        seq_len = position_ids.max().detach().long() + 1
        dim, dev = self.d_head, self.inv_freq.device
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=dev).float() / dim
        if kind == "dynamic":
            max_pos = int(self.scaling["max_position_embeddings"])
            if int(seq_len) <= max_pos:
                return self.inv_freq.float()
            factor = self.scaling["factor"]
            base = self.theta * ((factor * seq_len.to(dev) / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (base**exponents)
        if kind == "longrope":
            if int(seq_len) <= int(self.scaling["original_max_position_embeddings"]):
                return self.inv_freq.float()
            long_factor = torch.tensor(self.scaling["long_factor"], dtype=torch.float32, device=dev)
            return 1.0 / (long_factor * self.theta**exponents)
        raise ValueError(f"unknown dynamic rope type {kind!r}")

    def forward(self, position_ids: Real[Tensor, "*axes batch pos"], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [batch, pos, d_head]. Positions may be fractional (analyses re-rotate keys by any delta)."""
        freqs = position_ids[..., None].float() * self.inv_freq_for(position_ids).to(position_ids.device)
        if self.mrope_section is not None:
            if position_ids.ndim != 3 or position_ids.shape[0] != 3:
                raise ValueError(f"M-RoPE needs position_ids of shape [3, batch, pos]; got {tuple(position_ids.shape)}")
            if self.mrope_axes is not None:
                axes = torch.tensor(self.mrope_axes, device=freqs.device).expand(1, *freqs.shape[1:])
                freqs = freqs.gather(0, axes)[0]
            else:
                freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        elif position_ids.ndim != 2:
            raise ValueError(f"1-D RoPE needs position_ids of shape [batch, pos]; got {tuple(position_ids.shape)}")
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
