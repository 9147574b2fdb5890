"""Pre-norm transformer block with the TransformerLens residual hook vocabulary:
resid_pre -> ln1 -> attn -> hook_attn_out -> resid_mid -> ln2 -> mlp -> hook_mlp_out -> resid_post.
A block built with `deepstack=True` also adds `inject` (a [batch, pos, d_model] addition from outside, Qwen3-VL's
DeepStack image features) through `hook_deepstack` before `hook_resid_post`, so resid_post(l) = resid_pre(l + 1).

Optional post-norms (Gemma 2/3, TransformerLens's `ln1_post` / `ln2_post`) normalise the attention and MLP outputs
before they are added: hook_attn_out / hook_mlp_out are then the post-norm outputs, i.e. exactly what enters the
residual stream, so `resid_post = resid_pre + hook_attn_out + hook_mlp_out` holds in every block."""
from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .attention import Segments
from .rotary import Rotary, map_rotary


class TransformerBlock(nn.Module):
    def __init__(self, ln1: nn.Module, attn: nn.Module, ln2: nn.Module, mlp: nn.Module,
                 ln1_post: nn.Module | None = None, ln2_post: nn.Module | None = None, deepstack: bool = False):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.ln1_post, self.ln2_post = ln1_post, ln2_post
        if deepstack:
            self.hook_deepstack = HookPoint()  # the addition after the MLP [batch, pos, d_model] (0 off image tokens)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], rotary: Rotary | None = None, mask: "Tensor | Segments | None" = None,
        past: tuple[Tensor, Tensor] | None = None, inject: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`past`: (rotated keys, values) of earlier positions that `x` continues (see `Attention.forward`).
        Inputs on another device than this block's weights (a model split with `device_map`) are moved here."""
        dev = self.attn.q_proj.weight.device
        if x.device != dev:
            x = x.to(dev)
            rotary = map_rotary(rotary, lambda t: t.to(dev))
            mask = mask.to(dev) if isinstance(mask, Tensor) else mask
            past = None if past is None else (past[0].to(dev), past[1].to(dev))
        x = self.hook_resid_pre(x)
        attn_out = self.attn(self.ln1(x), rotary, mask, past)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        x = self.hook_resid_mid(x + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(x))
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        x = x + self.hook_mlp_out(mlp_out)
        if inject is not None:
            if not hasattr(self, "hook_deepstack"):
                raise ValueError("this block was built without deepstack=True: it takes no `inject`")
            x = x + self.hook_deepstack(inject.to(x.device, x.dtype))
        return self.hook_resid_post(x)
