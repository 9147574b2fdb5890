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


def offset_causal_mask(n_query: int, n_key: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive [1, 1, query, key] causal mask for queries that are the last `n_query` of `n_key` positions."""
    allowed = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(n_key - n_query)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def apply_window(mask: Tensor | None, n_query: int, n_key: int, window: int, dtype: torch.dtype, device: torch.device
                 ) -> Tensor:
    """Sliding-window attention (Mistral, Qwen2's upper layers, Gemma 3's local layers), as HF's
    `sliding_window_overlay`: query i (at key position n_key - n_query + i) sees key j only if i_abs - j < window.
    Added on top of `mask` (additive [batch, 1, query, key], or None = plain causal)."""
    q_abs = torch.arange(n_key - n_query, n_key, device=device)[:, None]
    k_abs = torch.arange(n_key, device=device)[None, :]
    outside = (q_abs - k_abs >= window)[None, None]
    if mask is None:
        mask = offset_causal_mask(n_query, n_key, dtype, device)
    return mask.masked_fill(outside, torch.finfo(dtype).min)


def knock_out(pattern: Tensor, queries: Tensor, keys: Tensor, heads: list[int] | None = None,
              renormalize: bool = False) -> Tensor:
    """pattern [batch, head, query, key] with the weights from `queries` [batch, query] to `keys` [batch, key]
    (bool) zeroed (post-softmax, no renormalisation), in `heads` (None: all); with renormalize=True the tensor is the
    scores and gets the dtype's minimum instead, so the softmax renormalises over the remaining keys. The narrow-gate
    knockout of the analyses and of generation both edit through here."""
    m = queries[:, None, :, None] & keys[:, None, None, :]
    if heads is not None:
        hm = torch.zeros(pattern.shape[1], dtype=torch.bool, device=m.device)
        hm[heads] = True
        m = m & hm[None, :, None, None]
    return pattern.masked_fill(m.to(pattern.device), torch.finfo(pattern.dtype).min if renormalize else 0.0)


class Segments:
    """Block-diagonal attention given by segment lengths along the position axis (HF's `cu_seqlens`): each
    position attends only within its own segment. The fused path runs attention per segment (segments of equal
    length in one batched call), so no [pos, pos] tensor exists; `dense` builds the additive mask for the
    explicit path (asked for only when a pattern / score hook wants the full matrix)."""

    def __init__(self, lengths: Tensor | list[int]):
        self.lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths) if int(n) > 0]

    def dense(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        if len(self.lengths) <= 1:
            return None
        seg = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths)).to(device)
        blocked = seg[:, None] != seg[None, :]
        return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)[None, None]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q, k, v [batch, head, pos, d_head] (k/v heads already equal to q heads) -> z [batch, head, pos, d_head]."""
        n = len(self.lengths)
        if n <= 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if len(set(self.lengths)) == 1:  # equal segments: fold them into the batch axis
            b, h, p, d = q.shape
            fold = lambda t: t.reshape(b, t.shape[1], n, p // n, d).transpose(1, 2).reshape(b * n, t.shape[1], p // n, d)  # noqa: E731
            z = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), scale=scale)
            return z.reshape(b, n, h, p // n, d).transpose(1, 2).reshape(b, h, p, d)
        parts = zip(q.split(self.lengths, 2), k.split(self.lengths, 2), v.split(self.lengths, 2))
        return torch.cat([F.scaled_dot_product_attention(qi, ki, vi, scale=scale) for qi, ki, vi in parts], dim=2)


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
        window: int | None = None,
        scale: float | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        rotary_key: str = "rotary",
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.causal = causal
        self.scale = d_head**-0.5 if scale is None else scale  # Gemma: query_pre_attn_scalar ** -0.5
        # qk-norm (Qwen3-VL, Gemma 3): a norm over d_head on every query / key head after hook_q / hook_k and before
        # the rotary (TransformerLens' order); hooks attn.q_norm.hook_scale / hook_normalized [batch, pos, head, *]
        self.q_norm, self.k_norm = q_norm, k_norm
        self.rotary_key = rotary_key  # which (cos, sin) to take when the model passes one per rotary module
        # Qwen2-VL's vision tower rotates q/k in float32 and casts back; the decoders rotate in model dtype.
        self.rotary_in_float32 = rotary_in_float32
        self.window = window  # sliding-window attention: each query sees its last `window` positions (None: all)
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
        self.use_attn_result = False  # TL's set_use_attn_result: build hook_result on every forward, hooked or not

    # TransformerLens weight views (hooked_vlm/tl_api.py documents them) ---------------------------------------
    def _in(self, proj: nn.Linear, heads: int) -> Tensor:
        return einops.rearrange(proj.weight, "(h d) m -> h m d", h=heads)

    def _bias(self, proj: nn.Linear, heads: int) -> Tensor:
        b = proj.bias if proj.bias is not None else proj.weight.new_zeros(proj.weight.shape[0])
        return b.view(heads, self.d_head)

    def _expand(self, t: Tensor) -> Tensor:  # kv heads -> query heads, as TL's GroupedQueryAttention.W_K
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    W_Q = property(lambda self: self._in(self.q_proj, self.n_heads), doc="[head, d_model, d_head]")
    _W_K = property(lambda self: self._in(self.k_proj, self.n_kv_heads), doc="[kv_head, d_model, d_head]")
    _W_V = property(lambda self: self._in(self.v_proj, self.n_kv_heads), doc="[kv_head, d_model, d_head]")
    W_K = property(lambda self: self._expand(self._W_K), doc="[head, d_model, d_head] (kv heads repeated)")
    W_V = property(lambda self: self._expand(self._W_V), doc="[head, d_model, d_head] (kv heads repeated)")
    b_Q = property(lambda self: self._bias(self.q_proj, self.n_heads), doc="[head, d_head]")
    _b_K = property(lambda self: self._bias(self.k_proj, self.n_kv_heads), doc="[kv_head, d_head]")
    _b_V = property(lambda self: self._bias(self.v_proj, self.n_kv_heads), doc="[kv_head, d_head]")
    b_K = property(lambda self: self._expand(self._b_K), doc="[head, d_head] (kv heads repeated)")
    b_V = property(lambda self: self._expand(self._b_V), doc="[head, d_head] (kv heads repeated)")

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "m (h d) -> h d m", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return self.o_proj.bias if self.o_proj.bias is not None else self.o_proj.weight.new_zeros(self.o_proj.weight.shape[0])

    @property
    def OV(self) -> "FactoredMatrix":
        """W_V @ W_O per head, [head, d_model, d_model] as a transformer_lens FactoredMatrix."""
        from transformer_lens.FactoredMatrix import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> "FactoredMatrix":
        """W_Q @ W_K^T per head, [head, d_model, d_model] (FactoredMatrix). Rotary positions are not in it: the
        scores are (rotated q) . (rotated k), so QK gives them only for a zero relative offset."""
        from transformer_lens.FactoredMatrix import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    def pattern_wanted(self) -> bool:
        return self.force_explicit or self.hook_pattern.has_hooks() or self.hook_attn_scores.has_hooks()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: "tuple[Tensor, Tensor] | dict[str, tuple[Tensor, Tensor]] | None" = None,
        mask: Float[Tensor, "batch 1 query key"] | Segments | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`mask`: additive [batch, 1, query, key], or `Segments` (block-diagonal attention, run per segment on
        the fused path), or None (causal / full). `past`: rotated keys and values [batch, p0, kv_head, d_head] of
        the positions before `x`, which then holds positions p0.. only (hooks see those); `mask` must then have
        all p0 + pos key columns."""
        b, p, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, p, self.n_heads, self.d_head))
        k = self.hook_k(self.k_proj(x).view(b, p, self.n_kv_heads, self.d_head))
        v = self.hook_v(self.v_proj(x).view(b, p, self.n_kv_heads, self.d_head))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary[self.rotary_key] if isinstance(rotary, dict) else rotary
            if self.rotary_in_float32:
                q, k = apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)
            else:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], dim=1), torch.cat([past[1].to(v.dtype), v], dim=1)
            if mask is None:  # causal with an offset: query i sits at key position p0 + i
                mask = offset_causal_mask(p, k.shape[1], q.dtype, q.device)
        if self.window is not None and k.shape[1] > self.window:  # only long inputs reach past the window
            mask = apply_window(mask, p, k.shape[1], self.window, q.dtype, q.device)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        if isinstance(mask, Segments):
            if self.pattern_wanted():  # the pattern hook asked for the full [query, key] matrix
                z = self._explicit(q, k, v, mask.dense(q.dtype, q.device))
            else:
                z = mask.attend(q, k, v, self.scale)
        elif self.pattern_wanted():
            z = self._explicit(q, k, v, mask)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=self.causal and mask is None, scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if self.use_attn_result or self.hook_result.has_hooks():
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
