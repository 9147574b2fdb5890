"""Edge-level patching for `analyses.edges`: forward hooks that give each receiver v its current input plus
``a_u(source) - a_u(current)`` for every ablated edge u -> v (`edge_hooks`, `patch_edges`), the exact effects
that EAP estimates (`edge_effects`), pruning (`prune`) and faithfulness of a pruned graph (`faithfulness`).

Faithfulness runs the clean input with every OTHER edge ablated (counterfactual: the corrupt run's a_u; mean:
a_u averaged over the leading axis of the clean run: over prompts per position, for vision nodes over images /
crops per patch, so for Qwen's packed [1, patches, d] tower a no-op). Ablating every edge with counterfactual
values reproduces the corrupt run, keeping every edge the clean run (both tested, with and without the image
path)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .toolkit import Metric, act_name, progress_bar
from .toolkit.metric import metric_values
from .edge_graph import (Edge, EdgeGraph, _image_mask, _is_edge, _is_vision, deepstack_layers, node_activations,
                         node_names, receiver_names, valid_edges, vision_depth)

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


# ------------------------------------------------------------------------------- edge-patching forward hooks
def edge_hooks(
    model: "HookedVLM",
    inputs: dict[str, Any],
    ablate: dict[str, Sequence[str]] | None = None,
    sources: dict[str, Tensor] | None = None,
    extra: dict[str, Tensor] | None = None,
    *,
    image_path: bool = False,
) -> list[tuple[str, Callable]]:
    """Forward hooks giving each receiver v the input ``resid + extra[v] + sum_{u in ablate[v]} (sources[u] -
    a_u(current run))``. Compose with other hooks; hooks added earlier on the same hook point run first.
    Receivers and nodes not in the graph (vision ones without ``image_path=True``) raise."""
    return _edge_hooks(model, inputs, ablate, sources, extra, image_path)


def _edge_hooks(
    model: "HookedVLM",
    inputs: dict[str, Any],
    ablate: dict[str, Sequence[str]] | None,
    sources: dict[str, Tensor] | None,
    extra: dict[str, Tensor] | None,
    image_path: bool,
    leaves: dict[str, Tensor] | None = None,
) -> list[tuple[str, Callable]]:
    """`edge_hooks`; with `leaves` (a dict, image_path only) every vision receiver gets a zero gradient leaf shaped
    like its residual, created in the forward and stored in `leaves`."""
    ablate, sources, extra = ablate or {}, sources or {}, dict(extra or {})
    c = model.cfg
    depth = vision_depth(model, inputs) if image_path else None
    receivers, nodes = set(receiver_names(model, image_path=image_path)), set(node_names(model, image_path=image_path))
    unknown = sorted((set(ablate) | set(extra)) - receivers) + sorted({u for us in ablate.values() for u in us} - nodes)
    if unknown:
        hint = "" if image_path else " (vision nodes and receivers need image_path=True)"
        raise ValueError(f"not nodes / receivers of this graph: {unknown[:5]}{hint}")
    invalid = [(u, v) for v, us in ablate.items() for u in us if not _is_edge(u, v, c.n_layers)]
    if invalid:
        raise ValueError(f"not edges of this graph (u must write before v reads): {invalid[:5]}")
    img = _image_mask(model, inputs)
    cur: dict[str, Tensor] = {}
    resid: dict[str, Tensor] = {}
    active = {v for v in set(ablate) | set(extra) if ablate.get(v) or v in extra}

    def diff(u: str) -> Tensor:
        src, now = sources[u], cur[u]
        if _is_vision(u) and (src.shape[1:] != now.shape[1:] or src.shape[0] not in (1, now.shape[0])):
            raise ValueError(f"source of {u} has shape {tuple(src.shape)} but this run's {u} is {tuple(now.shape)}: "
                             "image-path counterfactuals need the same image sizes / crops as the clean inputs")
        return src - now

    def delta(v: str) -> Tensor | None:
        d = extra.get(v)
        for u in ablate.get(v, ()):
            dd = diff(u)
            d = dd if d is None else d + dd
        return d

    def on_embed(x: Tensor, hook: Any = None) -> None:
        m = img.to(x.device).repeat(x.shape[0] // img.shape[0], 1, 1)
        cur["embed_image"], cur["embed_text"] = x * m, x * ~m
        for l in deepstack_layers(model):  # stays 0 unless the block adds something (no image in this run)
            cur[f"DS{l}"] = torch.zeros_like(x)

    def store(key: str) -> Callable:
        def fn(x: Tensor, hook: Any = None) -> None:
            resid[key] = x
        return fn

    def qkv(l: int, kind: str) -> Callable:
        block = model.blocks[l]
        proj = getattr(block.attn, f"{kind}_proj")
        heads = c.n_heads if kind == "q" else c.n_key_value_heads

        def fn(act: Tensor, hook: Any = None) -> Tensor:
            parts = []
            for h in range(heads):
                d = delta(f"L{l}H{h}.{kind}") if f"L{l}H{h}.{kind}" in active else None
                if d is None:
                    parts.append(act[:, :, h])
                    continue
                dh = act.shape[-1]
                w = proj.weight[h * dh : (h + 1) * dh]
                bias = None if proj.bias is None else proj.bias[h * dh : (h + 1) * dh]
                parts.append(F.linear(block.ln1(resid[f"pre{l}"] + d), w, bias))
            return torch.stack(parts, 2)
        return fn

    def on_result(l: int) -> Callable:
        def fn(r: Tensor, hook: Any = None) -> None:
            for h in range(c.n_heads):
                cur[f"L{l}H{h}"] = r[:, :, h]
        return fn

    def on_mlp(l: int) -> Callable:
        block = model.blocks[l]

        def fn(out: Tensor, hook: Any = None) -> Tensor:
            d = delta(f"MLP{l}") if f"MLP{l}" in active else None
            if d is not None:
                out = block.mlp(block.ln2(resid[f"mid{l}"] + d))
            cur[f"MLP{l}"] = out
            return out
        return fn

    def on_deepstack(l: int) -> Callable:
        def fn(x: Tensor, hook: Any = None) -> None:
            cur[f"DS{l}"] = x
        return fn

    def on_final(x: Tensor, hook: Any = None) -> Tensor:
        d = delta("logits") if "logits" in active else None
        return x if d is None else x + d

    hooks: list[tuple[str, Callable]] = []
    if depth is not None:
        hooks += _vision_edge_hooks(model, depth, cur, resid, active, delta, extra, leaves)
    hooks.append(("hook_embed", on_embed))
    for l in range(c.n_layers):
        hooks.append((act_name("resid_pre", l), store(f"pre{l}")))
        for kind in ("q", "k", "v"):
            if any(v.startswith(f"L{l}H") and v.endswith(f".{kind}") for v in active):
                hooks.append((act_name(kind, l), qkv(l, kind)))
        hooks.append((act_name("result", l), on_result(l)))
        hooks.append((act_name("resid_mid", l), store(f"mid{l}")))
        hooks.append((act_name("mlp_out", l), on_mlp(l)))
        if l in deepstack_layers(model):
            hooks.append((f"blocks.{l}.hook_deepstack", on_deepstack(l)))
    hooks.append((act_name("resid_post", c.n_layers - 1), on_final))
    return hooks


def _vision_edge_hooks(model: "HookedVLM", depth: int, cur: dict[str, Tensor], resid: dict[str, Tensor], active: set[str],
                       delta: Callable[[str], Tensor | None], extra: dict[str, Tensor],
                       leaves: dict[str, Tensor] | None) -> list[tuple[str, Callable]]:
    """The tower's part of `edge_hooks` (blocks 0..depth-1). A vision attention receiver's input is recomputed at
    ``hook_q`` as ``ln1(resid_pre + delta)`` and reused by ``hook_k`` / ``hook_v`` of the same call (rotary and
    mask apply after these hooks, as usual)."""
    attn_in: dict[int, Tensor | None] = {}

    def vdelta(v: str, like: Tensor) -> Tensor | None:
        if leaves is not None and v not in extra:
            extra[v] = leaves[v] = torch.zeros_like(like, requires_grad=True)
        return delta(v) if (v in active or v in extra) else None

    def on_pre(k: int) -> Callable:
        def fn(x: Tensor, hook: Any = None) -> None:
            resid[f"vpre{k}"] = x
            if k == 0:
                cur["V.embed"] = x
        return fn

    def on_mid(k: int) -> Callable:
        def fn(x: Tensor, hook: Any = None) -> None:
            resid[f"vmid{k}"] = x
        return fn

    def on_qkv(k: int, kind: str) -> Callable:
        block = model.vision.blocks[k]
        proj = getattr(block.attn, f"{kind}_proj")

        def fn(act: Tensor, hook: Any = None) -> Tensor:
            if kind == "q":
                x = resid[f"vpre{k}"]
                d = vdelta(f"V{k}.attn", x)
                attn_in[k] = None if d is None else block.ln1(x + d)
            x = attn_in.get(k)
            return act if x is None else proj(x).view(act.shape)
        return fn

    def on_attn_out(k: int) -> Callable:
        def fn(x: Tensor, hook: Any = None) -> None:
            cur[f"V{k}.attn"] = x
        return fn

    def on_mlp_out(k: int) -> Callable:
        block = model.vision.blocks[k]

        def fn(out: Tensor, hook: Any = None) -> Tensor:
            mid = resid[f"vmid{k}"]
            d = vdelta(f"V{k}.mlp", mid)
            if d is not None:
                out = block.mlp(block.ln2(mid + d))
            cur[f"V{k}.mlp"] = out
            return out
        return fn

    def on_last(x: Tensor, hook: Any = None) -> Tensor:
        d = vdelta("projector", x)
        return x if d is None else x + d

    grad = leaves is not None
    hooks: list[tuple[str, Callable]] = []
    for k in range(depth):
        p = f"vision.blocks.{k}."
        hooks.append((p + "hook_resid_pre", on_pre(k)))
        if grad or f"V{k}.attn" in active:
            hooks += [(p + f"attn.hook_{kind}", on_qkv(k, kind)) for kind in ("q", "k", "v")]
        hooks += [(p + "hook_attn_out", on_attn_out(k)), (p + "hook_resid_mid", on_mid(k)),
                  (p + "hook_mlp_out", on_mlp_out(k))]
    hooks.append((f"vision.blocks.{depth - 1}.hook_resid_post", on_last))
    return hooks


def patch_edges(model: "HookedVLM", inputs: dict[str, Any], edges: Iterable[Edge], sources: dict[str, Tensor],
                fwd_hooks: Sequence[tuple[str, Callable]] = (), *, image_path: bool = False) -> Tensor:
    """Logits of a run on `inputs` where each edge u -> v in `edges` carries ``sources[u]`` instead of u's
    current output (all other edges unchanged). `fwd_hooks` are applied first (e.g. a model modification)."""
    ablate: dict[str, list[str]] = {}
    for u, v in edges:
        ablate.setdefault(v, []).append(u)
    hooks = list(fwd_hooks) + edge_hooks(model, inputs, ablate, sources, image_path=image_path)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(**inputs)


# ---------------------------------------------------------------------------------- exact effects, pruning
def _sources(model: "HookedVLM", clean: dict[str, Any], corrupt: dict[str, Any], ablation: str,
             fwd_hooks: Sequence[tuple[str, Callable]], image_path: bool = False) -> dict[str, Tensor]:
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        if ablation == "counterfactual":
            return node_activations(model, corrupt, image_path=image_path)[1]
        if ablation == "mean":
            acts = node_activations(model, clean, image_path=image_path)[1]
            return {u: a.mean(0, keepdim=True) for u, a in acts.items()}
    raise ValueError(f"ablation must be 'counterfactual' or 'mean', got {ablation!r}")


def edge_effects(model: "HookedVLM", clean: dict[str, Any], corrupt: dict[str, Any], metric: Metric,
                 edges: Sequence[Edge], *, ablation: str = "counterfactual", per_prompt: bool = False,
                 image_path: bool = False, fwd_hooks: Sequence[tuple[str, Callable]] = (), progress: bool = True
                 ) -> Tensor:
    """Exact effect of ablating each edge alone: M(clean, edge ablated) - M(clean), [n_edges] (or [n, B]: with
    ``image_path`` a vision edge is ablated in every image at once and [n, B] is its effect on each prompt).
    Both runs go through the edge-patching hooks, so an edge whose source equals its value gives exactly 0."""
    src = _sources(model, clean, corrupt, ablation, fwd_hooks, image_path)
    # the baseline runs through the same hooks (nothing ablated), so an edge whose source equals its current value
    # has an effect of exactly 0 (a plain forward differs in rounding: e.g. hook_result sums heads separately)
    base = metric_values(metric, patch_edges(model, clean, [], src, fwd_hooks, image_path=image_path))
    out = []
    for e in progress_bar(edges, desc="edge patching", progress=progress):
        out.append(metric_values(metric, patch_edges(model, clean, [e], src, fwd_hooks, image_path=image_path))
                   - base)
    res = torch.stack(out) if out else torch.empty(0, len(base))
    return res if per_prompt else res.mean(-1)


def prune(graph: EdgeGraph, top_n: int, absolute: bool = True) -> list[Edge]:
    """The `top_n` edges with the largest |score| (or largest score with ``absolute=False``)."""
    edges = graph.edges()
    if not absolute:
        edges = sorted(edges, key=lambda e: -e[2])
    return [(u, v) for u, v, _ in edges[:top_n]]


@dataclass
class Faithfulness:
    value: Tensor  # metric with only the kept edges left (mean over prompts, or [B])
    clean: Tensor  # metric of the full model
    ablated: Tensor  # metric with every edge ablated (the corrupt run for counterfactual ablation)
    n_edges: int

    @property
    def normalized(self) -> Tensor:
        """(value - ablated) / (clean - ablated): 1 = the circuit alone recovers the clean metric."""
        return (self.value - self.ablated) / (self.clean - self.ablated)


def faithfulness(model: "HookedVLM", clean: dict[str, Any], corrupt: dict[str, Any], metric: Metric,
                 kept_edges: Iterable[Edge], *, ablation: str = "counterfactual", per_prompt: bool = False,
                 image_path: bool = False, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Faithfulness:
    """Run the clean inputs with every edge NOT in `kept_edges` ablated (edge-level, see `patch_edges`); with
    ``image_path`` the tower's edges are part of the graph (not kept = ablated)."""
    src = _sources(model, clean, corrupt, ablation, fwd_hooks, image_path)
    kept = {tuple(e) for e in kept_edges}
    all_edges = valid_edges(model, image_path=image_path)
    unknown = kept - set(all_edges)
    if unknown:
        raise ValueError(f"not edges of this graph: {sorted(unknown)[:5]}")
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        clean_v = metric_values(metric, model(**clean))
    ablate = [e for e in all_edges if e not in kept]
    value = metric_values(metric, patch_edges(model, clean, ablate, src, fwd_hooks, image_path=image_path))
    ablated = metric_values(metric, patch_edges(model, clean, all_edges, src, fwd_hooks, image_path=image_path))
    if not per_prompt:
        value, clean_v, ablated = value.mean(), clean_v.mean(), ablated.mean()
    return Faithfulness(value, clean_v, ablated, len(kept))
