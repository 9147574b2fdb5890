"""RMSNorm and LayerNorm with TransformerLens hook conventions.

`hook_scale` is sqrt(mean(x^2) + eps) (LayerNorm: sqrt(var + eps)) with shape [..., 1], and
`hook_normalized` is x / scale BEFORE the learned weight, as in TransformerLens. Both norms compute in
float32 and cast back before the weight, matching Hugging Face's Qwen2/Llama RMSNorm in bf16 (a float64 model
computes in float64, so that finite-difference checks are exact).

Gemma's RMSNorm (`offset=1`) multiplies by (1 + w) with w stored zero-centred as HF stores it, and does the
multiplication in float32 before casting back (HF's Gemma3RMSNorm), so bf16 models round as HF's do.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset  # the multiplier is offset + w (Gemma: 1, weights zero-centred)
        self.w = nn.Parameter(torch.full((d,), 1.0 - offset))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        if self.offset:  # Gemma: (x / scale) * (1 + w) in float32, then cast
            return (self.hook_normalized(x / scale) * (self.offset + self.w.to(x.dtype))).to(dtype)
        x = self.hook_normalized(x / scale).to(dtype)
        return self.w * x


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        return (x * self.w.to(x.dtype) + self.b.to(x.dtype)).to(dtype)


NORMS = {"RMS": RMSNorm, "LN": LayerNorm}
