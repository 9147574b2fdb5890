"""Projectors from the vision tower's width to the decoder's: LLaVA's two-layer MLP; Gemma 3's pooled projector.
(Qwen2-VL's patch merger lives beside its tower in vision/qwen_vit.py.)

`projector.hook_out` has one shape contract in every family: [n_image_tokens, d_model], the image features
exactly as they are placed into the token sequence, in reading order (prompt by prompt, position by position),
so `projector.hook_out[i]` is the feature at the i-th True of `model.layout(inputs).is_image` (= that row of
`hook_embed`). Per-image / per-crop views stay on the hooks before it (`projector.hook_in`, Gemma 3's
`projector.hook_pooled`, LLaVA-OneVision's `projector.mlp.*`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN

from .components import RMSNorm


class MLPProjector(nn.Module):
    """fc_in -> act -> fc_out. `flat` (LLaVA's projector, fixed at build): `hook_out` and the output are the rows
    flattened to [n_img * pos, d_model] (the `projector.hook_out` contract); not flat (LLaVA-OneVision's per-crop
    `projector.mlp`): [n_img, pos, d_model]."""

    def __init__(self, d_in: int, d_model: int, act: str, bias: bool, flat: bool = False):
        super().__init__()
        self.fc_in = nn.Linear(d_in, d_model, bias=bias)
        self.fc_out = nn.Linear(d_model, d_model, bias=bias)
        self.act = ACT2FN[act]
        self.flat = flat
        self.hook_in = HookPoint()  # selected vision features [n_img, pos, d_in]
        self.hook_out = HookPoint()  # flat: [n_img * pos, d_model] in reading order; else [n_img, pos, d_model]

    def forward(self, x: Float[Tensor, "n_img pos d_in"]) -> Float[Tensor, "... d_model"]:
        y = self.fc_out(self.act(self.fc_in(self.hook_in(x))))
        return self.hook_out(y.flatten(0, -2) if self.flat else y)


class PooledProjector(nn.Module):
    """Gemma 3: the tower's patch grid (side x side) average-pooled to tokens_per_side x tokens_per_side
    (`mm_tokens_per_image` tokens, row-major), Gemma's RMSNorm ((1 + w), float32) over the vision width, then one
    matrix [d_in, d_model] (HF `mm_input_projection_weight`, applied as x @ W). Hooks: hook_in (the tower's output
    [n_img, side^2, d_in]), hook_pooled [n_img, tokens, d_in], norm.hook_scale / norm.hook_normalized, hook_out
    [n_img * tokens, d_model] (reading order)."""

    def __init__(self, d_in: int, d_model: int, patches_per_side: int, tokens_per_side: int, eps: float):
        super().__init__()
        if tokens_per_side < 1 or patches_per_side % tokens_per_side:
            raise ValueError(f"the pooled projector needs a patch grid side ({patches_per_side}) that is a multiple of "
                             f"the token grid side ({tokens_per_side})")
        self.side, self.kernel = patches_per_side, patches_per_side // tokens_per_side
        self.norm = RMSNorm(d_in, eps, offset=1.0)
        self.W = nn.Parameter(torch.zeros(d_in, d_model))
        self.hook_in = HookPoint()  # [n_img, side^2, d_in]
        self.hook_pooled = HookPoint()  # [n_img, tokens, d_in]
        self.hook_out = HookPoint()  # [n_img * tokens, d_model], reading order

    def forward(self, x: Float[Tensor, "n_img patch d_in"]) -> Float[Tensor, "n_tokens d_model"]:
        x = self.hook_in(x)
        n, _, d = x.shape
        grid = x.transpose(1, 2).reshape(n, d, self.side, self.side).contiguous()
        pooled = self.hook_pooled(F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2))
        return self.hook_out(torch.matmul(self.norm(pooled), self.W).type_as(x).flatten(0, 1))
