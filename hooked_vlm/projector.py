"""Projectors from the vision tower's width to the decoder's: LLaVA's two-layer MLP.
(Qwen2-VL's patch merger lives beside its tower in vision/qwen_vit.py.) `projector.hook_out` is the image
features exactly as they are placed into the token sequence."""
from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class MLPProjector(nn.Module):
    def __init__(self, d_in: int, d_model: int, act: str, bias: bool):
        super().__init__()
        self.fc_in = nn.Linear(d_in, d_model, bias=bias)
        self.fc_out = nn.Linear(d_model, d_model, bias=bias)
        self.act = ACT2FN[act]
        self.hook_in = HookPoint()  # selected vision features [n_img, pos, d_in]
        self.hook_out = HookPoint()  # [n_img, pos, d_model]

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_model"]:
        return self.hook_out(self.fc_out(self.act(self.fc_in(self.hook_in(x)))))
