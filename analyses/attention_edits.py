"""Attention edits and steering, as forward-hook builders that compose with each other and with every analysis.

Each builder returns a list of ``(hook name, fn)``; concatenate lists to combine edits and pass them to
``model.hooks(fwd_hooks=...)`` / ``model.run_with_hooks(..., fwd_hooks=...)``, or run them with `run_with_edits`.

* `reweight_hooks`: multiply the post-softmax attention from a query set to a key set by `factor`
  (``hook_pattern``). Without renormalisation the other weights keep their values (factor 0 is exactly
  `narrow_gate.knockout_hooks`); with ``renormalize=True`` every edited query row is divided by its new sum
  (the one meaning of `renormalize` in every analysis: the edited rows sum to 1 again).
* `temperature_hooks`: divide the attention scores by `temperature` before the softmax (``hook_attn_scores``);
  masked entries (causal / padding, at the dtype's minimum) are left alone, so they stay masked.
* `steering_hooks` / `steer`: add ``alpha * vector`` to any hook's activation at chosen positions.

Masks are bool [batch, pos] (`TokenLayout` position sets) or [pos] / int positions for every prompt. When the run's
batch is n times the masks' batch (`hooked_vlm.batching.repeat_inputs`, as patching sweeps use), masks are tiled.
Pattern and score hooks switch attention to its explicit path (softmax in float32, as HF eager), which agrees with
the fused path only to float round-off; compare edited runs with a run that has an identity pattern hook when
bit-exactness matters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .toolkit import as_positions, check_hook, hook_template, resolve_layers, tile

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Hooks = list[tuple[str, Callable]]


def _mask(mask: Any, n_pos: int) -> Tensor | None:
    m = as_positions(mask, n_pos)
    return None if m is None else (m[None] if m.ndim == 1 else m)


_tile = tile


def _heads(heads: Any) -> list[int] | None:
    return None if heads is None else [int(h) for h in ([heads] if isinstance(heads, int) else heads)]


def _qk_mask(queries: Any, keys: Any, heads: list[int] | None, shape: Sequence[int], device: Any) -> Tensor:
    """Bool [batch, head, query, key] selecting the edited entries."""
    b, n_heads, nq, nk = shape
    q = torch.ones(b, nq, dtype=torch.bool) if queries is None else _tile(_mask(queries, nq), b)
    k = torch.ones(b, nk, dtype=torch.bool) if keys is None else _tile(_mask(keys, nk), b)
    if q.shape[-1] != nq or k.shape[-1] != nk:
        raise ValueError(f"masks of length {q.shape[-1]}/{k.shape[-1]} for a pattern of {nq} queries, {nk} keys")
    m = q[:, None, :, None] & k[:, None, None, :]
    if heads is not None:
        hm = torch.zeros(n_heads, dtype=torch.bool)
        hm[heads] = True
        m = m & hm[None, :, None, None]
    return m.to(device)


def reweight_hooks(model: "HookedVLM", queries: Any, keys: Any, factor: float, layers: Any = None, heads: Any = None,
                   renormalize: bool = False, hook: str = "pattern") -> Hooks:
    """pattern[b, h, q, k] *= factor where queries[b, q] & keys[b, k] (None = all) and h is a chosen head, at
    the chosen layers (default all). ``renormalize=True`` then divides each edited query row by its sum, so the
    row is again a distribution (factor 0 then removes the keys like masking their scores; a row whose weights
    all become 0 is left at 0). `hook`: "pattern" or a ``{layer}`` template of a hook_pattern (vision towers)."""
    template = hook_template(hook)
    if not template.endswith("hook_pattern"):
        raise ValueError(f"reweighting acts on hook_pattern, got {template!r}")
    head_list = _heads(heads)

    def fn(pattern: Tensor, hook: Any = None) -> Tensor:
        m = _qk_mask(queries, keys, head_list, pattern.shape, pattern.device)
        out = torch.where(m, pattern * factor, pattern)
        if renormalize:
            rows = m.any(-1, keepdim=True)
            total = out.sum(-1, keepdim=True)
            out = torch.where(rows & (total > 0), out / total.clamp_min(torch.finfo(out.dtype).tiny), out)
        return out

    return [(template.format(layer=l), fn) for l in resolve_layers(model, template, layers)]


def temperature_hooks(model: "HookedVLM", temperature: float, layers: Any = None, heads: Any = None, queries: Any = None,
                      hook: str = "attn_scores") -> Hooks:
    """scores[b, h, q, :] /= temperature for the chosen layers, heads and query positions (None = all) before
    the softmax. >1 flattens, <1 sharpens the attention. Masked scores (<= half the dtype's minimum) are kept."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    template = hook_template(hook)
    if not template.endswith("hook_attn_scores"):
        raise ValueError(f"temperature acts on hook_attn_scores, got {template!r}")
    head_list = _heads(heads)

    def fn(scores: Tensor, hook: Any = None) -> Tensor:
        m = _qk_mask(queries, None, head_list, scores.shape, scores.device)
        m = m & (scores > torch.finfo(scores.dtype).min / 2)
        return torch.where(m, scores / temperature, scores)

    return [(template.format(layer=l), fn) for l in resolve_layers(model, template, layers)]


def steering_hooks(model: "HookedVLM", hook: str, vector: Tensor, positions: Any = None, alpha: float = 1.0,
                   layers: Any = None) -> Hooks:
    """Add ``alpha * vector`` to the activation of `hook` at `positions` (bool [batch, pos] / [pos] / ints;
    None = every position). `hook`: full name, short kind or ``{layer}`` template (then at `layers`, default all).
    `vector` broadcasts against one position's activation (e.g. [d_model] for residual hooks, [head, d_head] or
    [d_head] for hook_z); it may also be [batch, pos, ...] (a per-position edit, e.g. a difference of caches)."""
    template = hook_template(hook)
    names = ([template.format(layer=l) for l in resolve_layers(model, template, layers)] if "{layer}" in template
             else [check_hook(model, template)])
    vec = torch.as_tensor(vector)

    def fn(act: Tensor, hook: Any = None) -> Tensor:
        v = vec.to(act.device, act.dtype)
        add = alpha * v
        if v.ndim == act.ndim and v.shape[0] != act.shape[0]:  # per-prompt vector, run on a repeated batch
            add = add.repeat((act.shape[0] // v.shape[0],) + (1,) * (v.ndim - 1))
        if positions is None:
            return act + add
        m = _tile(_mask(positions, act.shape[1]), act.shape[0]).to(act.device)
        m = m.reshape(m.shape + (1,) * (act.ndim - 2))
        return torch.where(m, act + add, act)

    return [(name, fn) for name in names]


def run_with_edits(model: "HookedVLM", inputs: dict[str, Any], *edits: Hooks) -> Tensor:
    """Logits of one forward with every given hook list applied (lists are concatenated, in order)."""
    hooks = [h for edit in edits for h in edit]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(**inputs)


def steer(model: "HookedVLM", inputs: dict[str, Any], hook: str, vector: Tensor, positions: Any = None,
          alpha: float = 1.0, layers: Any = None, extra: Hooks = ()) -> Tensor:
    """Logits with ``alpha * vector`` added at `hook` / `positions` (see `steering_hooks`), plus `extra` hooks."""
    return run_with_edits(model, inputs, steering_hooks(model, hook, vector, positions, alpha, layers), list(extra))


def steering_vector(model: "HookedVLM", inputs_a: dict[str, Any], inputs_b: dict[str, Any], hook: str,
                    positions: Any = None) -> Tensor:
    """Mean activation difference a - b at `hook` (full name) over the prompts and the chosen positions
    (bool [batch, pos] / [pos]; None = all): a [d...] vector for `steer` (difference-of-means steering)."""
    name = check_hook(model, hook_template(hook))
    with torch.no_grad():
        _, ca = model.run_with_cache(**inputs_a, names_filter=[name])
        _, cb = model.run_with_cache(**inputs_b, names_filter=[name])
    a, b = ca[name], cb[name]
    if positions is None:
        return (a - b).flatten(0, 1).mean(0)
    m = _tile(_mask(positions, a.shape[1]), a.shape[0]).to(a.device)
    return (a - b)[m].mean(0)


__all__ = ["reweight_hooks", "temperature_hooks", "steering_hooks", "run_with_edits", "steer", "steering_vector"]
