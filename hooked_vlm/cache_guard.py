"""What `HookedVLM.run_with_cache` checks and protects.

* The size guard: `estimate_hook_bytes` bounds, from the config and the input shapes alone (nothing runs), the
  bytes each hook's cached activation takes; `check_cache_request` refuses a request whose total is over the limit
  before any hook is added. Each per-hook figure is an upper bound (tested against the real cache of every family,
  hook by hook), so a request that passes the guard cannot cache more than it said.
* The alias guard: identity hook points hand the very tensor they received to the next hook point
  (`hook_embed` -> `blocks.0.hook_resid_pre`, `blocks.{l}.hook_resid_post` -> `blocks.{l+1}.hook_resid_pre`, ...),
  and TransformerLens caches a detached *view*. A user hook that edits its input in place at the later point
  (``x[:, 3] = 0``) would then rewrite the earlier point's cache entry. `separate_aliases` copies such an entry,
  just before the later point's hooks run, and only when that point has hooks other than the cache's own (no
  copy at all in a plain run_with_cache).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor, nn

ATTN_MAPS = ("hook_pattern", "hook_attn_scores")
HEAD_LEAVES = ("hook_q", "hook_rot_q", "hook_z")
KV_LEAVES = ("hook_k", "hook_v", "hook_rot_k")
MLP_LEAVES = ("hook_pre", "hook_pre_linear", "hook_post")


def selected_names(model: nn.Module, names_filter: Any = None) -> list[str]:
    """The hook names a TransformerLens `names_filter` (None, a name, a list of names or a predicate) selects."""
    if names_filter is None:
        return list(model.hook_dict)
    if isinstance(names_filter, str):
        return [names_filter]
    if callable(names_filter):
        return [n for n in model.hook_dict if names_filter(n)]
    return list(names_filter)


def _vision_shape(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """(attention sequences the tower runs: images or crops, tokens per sequence), upper bounds from pixel_values."""
    v = model.cfg.vision
    pv = inputs.get("pixel_values", model._bound.get("pixel_values"))
    if not isinstance(pv, Tensor) or v is None:
        return 0, 0
    if pv.ndim == 2:  # Qwen: the flattened patches of all images form one sequence
        return 1, pv.shape[0]
    n_seq = pv.shape[0] * (pv.shape[1] if pv.ndim == 5 else 1)  # LLaVA-OV: [batch, crops, C, H, W]
    return n_seq, ((v.image_size // v.patch_size) ** 2 + 1) if v.image_size else 0  # + 1: a class token, if any


def _vision_blocks_run(model: nn.Module, inputs: Mapping[str, Any]) -> int:
    """How many vision blocks run: the tower stops at its deepest feature layer (HF hidden-state indexing)."""
    v = model.cfg.vision
    layer = inputs.get("vision_feature_layer", model._bound.get("vision_feature_layer"))
    layer = model.cfg.vision_feature_layer if layer is None else layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    try:
        return max(l if l >= 0 else v.n_layers + 1 + l for l in layers)
    except (TypeError, ValueError):
        return v.n_layers


def estimate_hook_bytes(model: nn.Module, inputs: Mapping[str, Any], names: list[str]) -> dict[str, int]:
    """{hook name: upper bound on the bytes its cached activation takes} for a forward on `inputs`.

    Decoder: patterns / scores are batch * heads * pos^2, per-head outputs (`hook_result`) batch * pos * heads *
    d_model, other hooks batch * pos * their width. Vision: the same per attention sequence (image or crop), with
    the tower's widths; the projector's hooks take the widest of its widths over max(tower tokens, image tokens);
    vision blocks after the deepest feature layer do not run (0)."""
    c, v = model.cfg, model.cfg.vision
    ids = inputs.get("input_ids")
    b, s = tuple(ids.shape) if isinstance(ids, Tensor) and ids.ndim == 2 else (1, 0)
    n_image_ids = int((ids == c.image_token_id).sum()) if isinstance(ids, Tensor) else 0
    item = model.embed.weight.element_size()
    n_seq, n_tok = _vision_shape(model, inputs)
    n_blocks = _vision_blocks_run(model, inputs) if v is not None else 0
    n_feat = len(c.vision_feature_layer) if isinstance(c.vision_feature_layer, (list, tuple)) else 1
    out: dict[str, int] = {}
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("projector."):  # LLaVA MLP (d_v * n_feat -> d_model) or the Qwen merger (4 d_v / 4 rows)
            width = 1 if leaf == "hook_scale" else max(v.d_model * n_feat, v.d_model, c.d_model)
            out[name] = max(n_seq * n_tok, n_image_ids) * width
        elif name.startswith("vision."):
            parts = name.split(".")
            if parts[1] == "blocks" and int(parts[2]) >= n_blocks:
                out[name] = 0
            elif leaf in ATTN_MAPS:
                out[name] = n_seq * v.n_heads * n_tok**2
            elif leaf == "hook_result":
                out[name] = n_seq * n_tok * v.n_heads * v.d_model
            elif leaf == "hook_scale":
                out[name] = n_seq * n_tok
            else:
                out[name] = n_seq * n_tok * (v.d_mlp if leaf in MLP_LEAVES and ".mlp." in name else v.d_model)
        else:
            if ".q_norm." in name or ".k_norm." in name:  # per-head qk-norms (Qwen3-VL, Gemma 3): [b, pos, heads, *]
                per = (c.n_heads if ".q_norm." in name else c.n_key_value_heads) * (1 if leaf == "hook_scale" else c.d_head)
            elif leaf in ATTN_MAPS:
                per = c.n_heads * s
            elif leaf in HEAD_LEAVES:
                per = c.n_heads * c.d_head
            elif leaf in KV_LEAVES:
                per = c.n_key_value_heads * c.d_head
            elif leaf == "hook_result":
                per = c.n_heads * c.d_model
            elif leaf in MLP_LEAVES and ".mlp." in name:
                per = c.d_mlp
            elif leaf == "hook_scale":
                per = 1
            else:
                per = c.d_model
            out[name] = b * s * per
    return {k: int(n * item) for k, n in out.items()}


def estimate_cache_bytes(model: nn.Module, inputs: Mapping[str, Any], names_filter: Any = None) -> int:
    """Bytes a run_with_cache of `inputs` would hold for the hooks `names_filter` selects (None: all); an upper
    bound, from the config and input shapes alone."""
    return sum(estimate_hook_bytes(model, inputs, selected_names(model, names_filter)).values())


def check_cache_request(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], limit: int | None) -> None:
    """Raise before anything runs if a run_with_cache(*args, **kwargs) would cache more than `limit` bytes."""
    if limit is None:
        return
    inputs = dict(kwargs, input_ids=args[0]) if args else dict(kwargs)
    estimate = estimate_cache_bytes(model, inputs, kwargs.get("names_filter"))
    if kwargs.get("incl_bwd"):
        estimate *= 2  # gradients are cached too
    if estimate > limit:
        raise ValueError(
            f"run_with_cache: this request would cache about {estimate / 2**30:.2f} GiB ({estimate} bytes), over "
            f"max_cache_bytes={limit}. Narrow it: names_filter=[...] (e.g. fewer layers, or avoid "
            "hook_pattern / hook_attn_scores, which grow with pos^2), device=\"cpu\" to keep the cache off the "
            "accelerator, fewer prompts / positions; or pass max_cache_bytes=None to run it anyway."
        )


def _storage(t: Any) -> int | None:
    if not isinstance(t, Tensor) or t.is_meta:
        return None
    return t.untyped_storage().data_ptr()


@contextmanager
def separate_aliases(model: nn.Module, cache: dict[str, Tensor], cached: Callable[[str], bool]) -> Iterator[None]:
    """While active, a hook point about to run hooks other than the cache's own on a tensor that shares storage
    with an entry already in `cache` first replaces that entry with a copy (see the module docstring)."""
    owners: dict[int, list[str]] = {}  # storage -> cache entries that view it
    indexed = 0

    def before(hook_point: nn.Module, args: tuple) -> None:
        nonlocal indexed
        for name in itertools.islice(cache, indexed, None):  # entries cached since the last call
            ptr = _storage(cache[name])
            if ptr is not None:
                owners.setdefault(ptr, []).append(name)
        indexed = len(cache)
        ptr = _storage(args[0]) if args else None
        if ptr is None or ptr not in owners:
            return
        own = int(bool(hook_point.name) and cached(hook_point.name))  # this point's own caching hook, if any
        if len(hook_point.fwd_hooks) <= own:
            return  # nothing here but the cache: nothing can edit the tensor in place
        for name in owners.pop(ptr):
            cache[name] = cache[name].clone()

    handles = [hp.register_forward_pre_hook(before) for hp in model.hook_dict.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
