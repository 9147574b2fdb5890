"""Feed-forward blocks: gated (SwiGLU, Llama/Qwen2 decoders and Qwen2.5-VL vision) and plain (CLIP/SigLIP/Qwen2-VL vision).

Hooks follow TransformerLens: `hook_pre` is the (gate) pre-activation, `hook_pre_linear` the up projection of a
gated MLP, `hook_post` the input of the output projection. `W_out` is [d_mlp, d_model] as TL's utilities expect.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, act: str, bias: bool):
        super().__init__()
        self.gate = nn.Linear(d_model, d_mlp, bias=bias)
        self.up = nn.Linear(d_model, d_mlp, bias=bias)
        self.down = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act]
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pre = self.hook_pre(self.gate(x))
        lin = self.hook_pre_linear(self.up(x))
        return self.down(self.hook_post(self.act(pre) * lin))

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down.weight.T

    # TL's GatedMLP names: hook_pre = x @ W_gate (+ b_gate), hook_pre_linear = x @ W_in + b_in
    W_gate = property(lambda self: self.gate.weight.T, doc="[d_model, d_mlp]")
    W_in = property(lambda self: self.up.weight.T, doc="[d_model, d_mlp]")
    b_gate = property(lambda self: _bias(self.gate))
    b_in = property(lambda self: _bias(self.up))

    @property
    def b_out(self) -> Tensor:
        return self.down.bias if self.down.bias is not None else torch.zeros_like(self.down.weight[:, 0])


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, act: str, bias: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp, bias=bias)
        self.fc_out = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act]
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.fc_out(self.hook_post(self.act(self.hook_pre(self.fc_in(x)))))

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.fc_out.weight.T

    W_in = property(lambda self: self.fc_in.weight.T, doc="[d_model, d_mlp]")
    b_in = property(lambda self: _bias(self.fc_in))

    @property
    def b_out(self) -> Tensor:
        return self.fc_out.bias if self.fc_out.bias is not None else torch.zeros_like(self.fc_out.weight[:, 0])


def _bias(linear: nn.Linear) -> Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
