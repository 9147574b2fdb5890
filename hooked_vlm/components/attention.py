"""Multi-head attention with TransformerLens hooks, shared by every decoder and vision tower.

Two paths, chosen per call and per layer:
- fused: `F.scaled_dot_product_attention`, no [query, key] tensor is ever built. Used when nothing hooks
  `hook_attn_scores` or `hook_pattern`.
- explicit: scores -> `hook_attn_scores` -> softmax (float32, as HF eager) -> `hook_pattern` -> pattern @ v.
  Whatever a hook returns from `hook_pattern` is the matrix multiplied with v, so pattern edits take effect.
`hook_result` (per-head outputs [batch, pos, head, d_model]) is built only when hooked or cached; then the
attention output is the sum of the (possibly edited) per-head results plus the output bias.
Rotary embeddings (1-D, M-RoPE, 2-D vision) arrive as precomputed (cos, sin), so this module never branches
on a model family.
"""
from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .rotary import apply_rotary


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        d_head: int,
        qkv_bias: bool,
        o_bias: bool,
        causal: bool,
        rotary: bool,
        rotary_in_float32: bool = False,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.causal = causal
        self.scale = d_head**-0.5
        # Qwen2-VL's vision tower rotates q/k in float32 and casts back; the decoders rotate in model dtype.
        self.rotary_in_float32 = rotary_in_float32
        self.q_proj = nn.Linear(d_model, n_heads * d_head, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * d_head, d_model, bias=o_bias)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        if rotary:
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]
        for hp in (self.hook_attn_scores, self.hook_pattern):
            hp.pos_dim = -2
        self.force_explicit = False  # set by analyses that must see the pattern (e.g. gradients through it)

    # TransformerLens weight views ------------------------------------------------------------------------
    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "m (h d) -> h d m", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return self.o_proj.bias if self.o_proj.bias is not None else self.o_proj.weight.new_zeros(self.o_proj.weight.shape[0])

    def pattern_wanted(self) -> bool:
        return self.force_explicit or self.hook_pattern.has_hooks() or self.hook_attn_scores.has_hooks()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: Float[Tensor, "batch 1 query key"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        b, p, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, p, self.n_heads, self.d_head))
        k = self.hook_k(self.k_proj(x).view(b, p, self.n_kv_heads, self.d_head))
        v = self.hook_v(self.v_proj(x).view(b, p, self.n_kv_heads, self.d_head))
        if rotary is not None:
            cos, sin = rotary
            if self.rotary_in_float32:
                q, k = apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)
            else:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        if self.pattern_wanted():
            z = self._explicit(q, k, v, mask)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=self.causal and mask is None, scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if self.hook_result.has_hooks():
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(-2) + self.b_O
        return self.o_proj(z.reshape(b, p, self.n_heads * self.d_head))

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if mask is not None:
            scores = scores + mask
        elif self.causal:
            qn, kn = scores.shape[-2:]
            causal = torch.ones(qn, kn, dtype=torch.bool, device=scores.device).tril(kn - qn)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype))
        return torch.matmul(pattern, v)
