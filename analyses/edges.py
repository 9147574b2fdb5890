"""Edge attribution patching (EAP; Syed et al. 2023, arXiv 2310.10348) and EAP-IG (Hanna et al. 2024), over a
component graph of the decoder (optionally with the vision tower: ``image_path=True``), with edge-level patching
for exact effects and faithfulness.

Graph. Upstream nodes (each writes an additive term of the residual stream):
  ``embed_image`` (``hook_embed`` at image positions: the projector's output, i.e. the whole image path),
  ``embed_text`` (``hook_embed`` elsewhere), every head ``L{l}H{h}`` (its ``hook_result``) and every MLP
  ``MLP{l}`` (``hook_mlp_out``). The attention output bias is a constant, not a node.
Receivers (each reads the residual stream):
  ``L{l}H{h}.q`` (query head h), ``L{l}H{g}.k`` / ``L{l}H{g}.v`` (KEY/VALUE head g: with grouped-query attention
  one kv head serves ``n_heads / n_kv_heads`` query heads), ``MLP{l}`` and ``logits``.
An edge u -> v exists when u writes before v reads: u in an earlier layer for attention receivers, heads of the
same layer and anything earlier for MLP receivers, everything for the logits.

Image path (``image_path=True`` on every function below; default False = the decoder graph above, unchanged).
The vision tower's residual is additive too: resid_post(K-1) = resid_pre(0) + sum_k (attn_out_k + mlp_out_k)
over the K blocks that run (with one vision feature layer the ViT towers stop after it; Qwen towers run every
block). Extra nodes, written before every decoder node:
  ``V.embed`` (``vision.blocks.0.hook_resid_pre``: the tower residual's input, for Qwen2.5-VL in window order),
  ``V{k}.attn`` (``vision.blocks.{k}.hook_attn_out``) and ``V{k}.mlp`` (``vision.blocks.{k}.hook_mlp_out``).
Extra receivers: ``V{k}.attn`` (the block's attention input ``ln1(resid_pre_k + delta)``: one receiver for q, k
and v of every head, recomputed at ``vision.blocks.{k}.attn.hook_q/k/v``), ``V{k}.mlp``
(``mlp(ln2(resid_mid_k + delta))`` at ``hook_mlp_out``) and ``projector`` (``delta`` added to the last running
block's ``hook_resid_post``, which only the projector reads). Edges: ``V.embed`` and ``V{j}.*`` -> ``V{k}.attn``
for j < k; those and ``V{k}.attn`` -> ``V{k}.mlp``; every tower node -> ``projector``. ``embed_image`` stays the
bridge into the decoder (no vision node has an edge into a decoder receiver), so ablating the projector's edges
changes ``embed_image``'s current value, which the decoder edges then carry. Vision activations are
[n_images_or_crops, patches, d_vision] (Qwen: [1, all patches, d_vision]); they do not map to prompts one to one,
so a vision edge's EAP score is summed over the whole batch and divided by the batch size B (a mean over prompts,
like the decoder scores), and ``per_prompt`` (and ``per_position``) scores raise with ``image_path=True``. Models
reading several vision feature layers raise (their projector reads several blocks' residuals).

Per-receiver inputs. q, k and v of a layer read ONE residual (through ln1), so the receivers are made separate
in the forward: the receiver's slice of ``hook_q`` / ``hook_k`` / ``hook_v`` is recomputed as
``{q,k,v}_proj(ln1(resid_pre + delta_v))[head]`` (MLPs: ``mlp(ln2(resid_mid + delta_v))`` at ``hook_mlp_out``;
logits: ``delta`` added to the final residual). With ``delta_v = 0`` the forward is unchanged; the gradient with
respect to ``delta_v`` is dM/d(input of v) along v's own path only (as TransformerLens's split-qkv input gives).

Scores (noising, gradients at the clean run):
    EAP(u -> v)    = sum over positions of (a_u(corrupt) - a_u(clean)) . dM/d(input of v) |clean
    EAP-IG(u -> v) = same with the gradient averaged over m runs whose ``hook_embed`` is
                     clean + (k/m) (corrupt - clean), k = 0..m-1 (left Riemann sum from the clean end, so m = 1
                     is EAP exactly)
With ``image_path=True`` EAP-IG interpolates the graph's INPUTS instead: ``V.embed`` and ``hook_embed`` at text
positions, while the image positions of ``hook_embed`` follow the tower (projector output) so that the vision
receivers keep a gradient; decoder-edge EAP-IG scores with m > 1 therefore differ from ``image_path=False``.
``per_position=True`` keeps a trailing position axis on decoder edges: score[..., p] = (a_u(corrupt) -
a_u(clean))[p] . grad_v[p], which sums over p to the ordinary score.
Each score estimates M(clean with only edge u -> v carrying the corrupt a_u) - M(clean), which `edge_effects`
computes exactly by edge patching (`patch_edges`): v's input becomes its current input plus
``a_u(source) - a_u(current)`` for every ablated edge u -> v. In a model that is linear from ``hook_embed`` to
the metric (MLPs zeroed, attention patterns and norm scales frozen) EAP equals the exact effects (tested).

`prune` keeps the top-n edges by |score|; `faithfulness` runs the clean input with every OTHER edge ablated
(counterfactual: the corrupt run's a_u; mean: a_u averaged over the leading axis of the clean run: over prompts
per position, for vision nodes over images / crops per patch, so for Qwen's packed [1, patches, d] tower a no-op).
Ablating every edge with counterfactual values reproduces the corrupt run, keeping every edge the clean run (both
tested, with and without the image path). Not included: per-prompt and per-position scores of vision edges (they
raise), a connectivity clean-up of pruned graphs (dangling edges are kept as they are), and models with attention
post-norms (Gemma 3: per-head outputs are not additive terms of the residual stream; every entry point raises).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hooked_vlm.vision.vit import ViTTower, hidden_state_index

from ._progress import progress_bar
from ._hooks import as_float, frozen_parameters

Metric = Callable[[Tensor], Tensor]
Edge = tuple[str, str]


# ----------------------------------------------------------------------------------------------- the graph
def _feature_depth(layer: Any, n_blocks: int) -> int:
    if isinstance(layer, (list, tuple)):
        if len(layer) != 1:
            raise ValueError(f"the image-path graph needs a single vision feature layer, got vision_feature_layer="
                             f"{list(layer)} (the projector would read several blocks' residuals)")
        layer = layer[0]
    return hidden_state_index(int(layer), n_blocks)


def vision_depth(model: Any, inputs: dict[str, Any] | None = None) -> int:
    """The number K of vision blocks that run (blocks 0..K-1 are in the image-path graph): every block for the Qwen
    towers; for the ViT towers (LLaVA, LLaVA-OneVision) the blocks up to the single vision feature layer."""
    tower = getattr(model, "vision", None)
    if tower is None or getattr(model.cfg, "vision", None) is None or not hasattr(tower, "blocks"):
        raise ValueError("image_path=True needs a model with a vision tower")
    n = len(tower.blocks)
    if not isinstance(tower, ViTTower):
        return n
    depth = _feature_depth(model.cfg.vision_feature_layer, n)
    if inputs is not None and inputs.get("vision_feature_layer") is not None:
        if _feature_depth(inputs["vision_feature_layer"], n) != depth:
            raise ValueError(f"the inputs override vision_feature_layer={inputs['vision_feature_layer']!r}; the "
                             f"image-path graph is built from model.cfg.vision_feature_layer="
                             f"{model.cfg.vision_feature_layer!r}")
    if depth == 0:
        raise ValueError("the vision feature layer is the tower's embedding: no vision block runs, so the image-path "
                         "graph would be empty")
    return depth


def _vision_nodes(k: int) -> list[str]:
    return ["V.embed"] + [f"V{i}.{s}" for i in range(k) for s in ("attn", "mlp")]


def _vision_receivers(k: int) -> list[str]:
    return [f"V{i}.{s}" for i in range(k) for s in ("attn", "mlp")] + ["projector"]


def _is_vision(name: str) -> bool:
    return name == "projector" or name.startswith("V")


def _check_additive_heads(model: Any) -> None:
    if any(getattr(block, "ln1_post", None) is not None for block in model.blocks):
        raise ValueError(
            "edge attribution needs each head's output (hook_result) to be an additive term of the residual stream; "
            "with attention post-norms (Gemma 3's ln1_post) the heads are normalised together before they are added, "
            "so per-head edges are not defined. Use path patching (analyses.paths) or activation patching instead")


def node_names(model: Any, *, image_path: bool = False) -> list[str]:
    c = model.cfg
    _check_additive_heads(model)
    vision = _vision_nodes(vision_depth(model)) if image_path else []
    return (vision + ["embed_image", "embed_text"] + [f"L{l}H{h}" for l in range(c.n_layers) for h in range(c.n_heads)]
            + [f"MLP{l}" for l in range(c.n_layers)])


def receiver_names(model: Any, *, image_path: bool = False) -> list[str]:
    c = model.cfg
    out = _vision_receivers(vision_depth(model)) if image_path else []
    for l in range(c.n_layers):
        out += [f"L{l}H{h}.q" for h in range(c.n_heads)]
        out += [f"L{l}H{g}.{k}" for k in ("k", "v") for g in range(c.n_key_value_heads)]
        out.append(f"MLP{l}")
    return out + ["logits"]


def _parse_node(u: str) -> tuple[int, int]:
    """Write order: embed (-1, 0), head of layer l (l, 0), MLP l (l, 1)."""
    if u.startswith("embed"):
        return (-1, 0)
    if u.startswith("MLP"):
        return (int(u[3:]), 1)
    return (int(u[1:].split("H")[0]), 0)


def _parse_receiver(v: str, n_layers: int) -> tuple[int, int]:
    """Read order: attention receivers of layer l (l, 0), MLP l (l, 1), logits (n_layers, 0)."""
    if v == "logits":
        return (n_layers, 0)
    if v.startswith("MLP"):
        return (int(v[3:]), 1)
    return (int(v[1:].split("H")[0]), 0)


def _parse_vision(name: str) -> tuple[int | float, int]:
    """Vision write / read order: V.embed (-1, 0), V{k}.attn (k, 0), V{k}.mlp (k, 1), projector (inf, 0)."""
    if name == "V.embed":
        return (-1, 0)
    if name == "projector":
        return (math.inf, 0)
    k, kind = name[1:].split(".")
    return (int(k), 0 if kind == "attn" else 1)


def _is_edge(u: str, v: str, n_layers: int) -> bool:
    """u writes before v reads, within the tower or within the decoder (the tower reaches the decoder only
    through the projector -> embed_image)."""
    if _is_vision(u) or _is_vision(v):
        return _is_vision(u) and _is_vision(v) and _parse_vision(u) < _parse_vision(v)
    return _parse_node(u) < _parse_receiver(v, n_layers)


def valid_edges(model: Any, *, image_path: bool = False) -> list[Edge]:
    n = model.cfg.n_layers
    return [(u, v) for v in receiver_names(model, image_path=image_path)
            for u in node_names(model, image_path=image_path) if _is_edge(u, v, n)]


def _node_hooks(model: Any, depth: int | None = None) -> list[str]:
    _check_additive_heads(model)
    n = model.cfg.n_layers
    vision = [] if depth is None else ["vision.blocks.0.hook_resid_pre"] + [
        f"vision.blocks.{k}.hook_{s}_out" for k in range(depth) for s in ("attn", "mlp")]
    return (vision + ["hook_embed"] + [f"blocks.{l}.attn.hook_result" for l in range(n)]
            + [f"blocks.{l}.hook_mlp_out" for l in range(n)])


def _image_mask(model: Any, inputs: dict[str, Any]) -> Tensor:
    return (inputs["input_ids"] == model.cfg.image_token_id)[:, :, None]


def _no_tower_run() -> ValueError:
    return ValueError("image_path=True: the vision tower did not run on these inputs (no pixel_values?)")


def _acts_from_cache(model: Any, cache: Any, img: Tensor, depth: int | None = None) -> dict[str, Tensor]:
    acts = {}
    if depth is not None:
        try:
            acts["V.embed"] = cache["vision.blocks.0.hook_resid_pre"]
        except KeyError:
            raise _no_tower_run() from None
        for k in range(depth):
            acts[f"V{k}.attn"] = cache[f"vision.blocks.{k}.hook_attn_out"]
            acts[f"V{k}.mlp"] = cache[f"vision.blocks.{k}.hook_mlp_out"]
    e = cache["hook_embed"]
    img = img.to(e.device)
    acts.update({"embed_image": e * img, "embed_text": e * ~img})
    for l in range(model.cfg.n_layers):
        r = cache[f"blocks.{l}.attn.hook_result"]
        for h in range(model.cfg.n_heads):
            acts[f"L{l}H{h}"] = r[:, :, h]
        acts[f"MLP{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return acts


@torch.no_grad()
def node_activations(model: Any, inputs: dict[str, Any], *, image_path: bool = False
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, {node: its additive term of the residual stream}): decoder nodes [batch, pos, d_model], vision
    nodes (``image_path=True``) [n_images_or_crops, patches, d_vision] (Qwen: [1, all patches, d_vision])."""
    depth = vision_depth(model, inputs) if image_path else None
    logits, cache = model.run_with_cache(**inputs, names_filter=_node_hooks(model, depth))
    return logits, _acts_from_cache(model, cache, _image_mask(model, inputs), depth)


# ------------------------------------------------------------------------------- edge-patching forward hooks
def edge_hooks(
    model: Any,
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
    model: Any,
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

    def on_final(x: Tensor, hook: Any = None) -> Tensor:
        d = delta("logits") if "logits" in active else None
        return x if d is None else x + d

    hooks: list[tuple[str, Callable]] = []
    if depth is not None:
        hooks += _vision_edge_hooks(model, depth, cur, resid, active, delta, extra, leaves)
    hooks.append(("hook_embed", on_embed))
    for l in range(c.n_layers):
        hooks.append((f"blocks.{l}.hook_resid_pre", store(f"pre{l}")))
        for kind in ("q", "k", "v"):
            if any(v.startswith(f"L{l}H") and v.endswith(f".{kind}") for v in active):
                hooks.append((f"blocks.{l}.attn.hook_{kind}", qkv(l, kind)))
        hooks.append((f"blocks.{l}.attn.hook_result", on_result(l)))
        hooks.append((f"blocks.{l}.hook_resid_mid", store(f"mid{l}")))
        hooks.append((f"blocks.{l}.hook_mlp_out", on_mlp(l)))
    hooks.append((f"blocks.{c.n_layers - 1}.hook_resid_post", on_final))
    return hooks


def _vision_edge_hooks(model: Any, depth: int, cur: dict[str, Tensor], resid: dict[str, Tensor], active: set[str],
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


def patch_edges(model: Any, inputs: dict[str, Any], edges: Iterable[Edge], sources: dict[str, Tensor],
                fwd_hooks: Sequence[tuple[str, Callable]] = (), *, image_path: bool = False) -> Tensor:
    """Logits of a run on `inputs` where each edge u -> v in `edges` carries ``sources[u]`` instead of u's
    current output (all other edges unchanged). `fwd_hooks` are applied first (e.g. a model modification)."""
    ablate: dict[str, list[str]] = {}
    for u, v in edges:
        ablate.setdefault(v, []).append(u)
    hooks = list(fwd_hooks) + edge_hooks(model, inputs, ablate, sources, image_path=image_path)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(**inputs)


# ------------------------------------------------------------------------------------------- EAP / EAP-IG
@dataclass
class EdgeGraph:
    """Edge scores.

    scores: [n_nodes, n_receivers] (NaN where no edge exists); with ``per_prompt`` a trailing batch axis, with
    ``per_position`` then a trailing position axis ([n_nodes, n_receivers, (batch,) pos]).
    nodes, receivers: the axis labels. clean, corrupt: metric baselines. method: "EAP" or "EAP-IG(m)".
    `edges` / `node_scores` sum the position axis and average the prompt axis.
    """

    scores: Tensor
    nodes: list[str]
    receivers: list[str]
    clean: Tensor
    corrupt: Tensor
    method: str
    labels: dict[str, Any] = field(default_factory=dict)
    per_position: bool = False

    def score(self, u: str, v: str) -> Tensor:
        return self.scores[self.nodes.index(u), self.receivers.index(v)]

    def _totals(self) -> Tensor:
        s = self.scores.sum(-1) if self.per_position else self.scores
        return s if s.ndim == 2 else s.mean(-1)

    def edges(self) -> list[tuple[str, str, float]]:
        """Every existing edge (u, v, score) sorted by |score|, largest first (prompts averaged, positions
        summed)."""
        s = self._totals()
        out = [(u, v, float(s[i, j])) for i, u in enumerate(self.nodes) for j, v in enumerate(self.receivers)
               if not torch.isnan(s[i, j])]
        return sorted(out, key=lambda e: -abs(e[2]))

    def node_scores(self) -> dict[str, float]:
        """Sum of |score| over each node's outgoing edges (a quick importance ranking)."""
        s = self._totals()
        return {u: float(s[i].abs().nansum()) for i, u in enumerate(self.nodes)}


def receiver_gradients(model: Any, inputs: dict[str, Any], metric: Metric, embed: Tensor | None = None,
                       fwd_hooks: Sequence[tuple[str, Callable]] = (), *, image_path: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """(metric [batch], {receiver: dM/d(input of receiver)}) from one forward and one backward: decoder receivers
    [batch, pos, d_model], vision receivers (``image_path=True``) shaped like the vision residual; each gradient
    is of the metric SUMMED over the batch (for decoder receivers that is prompt b's own metric at row b).
    `embed` overrides ``hook_embed`` (EAP-IG's interpolation); with ``image_path=True`` only at text positions,
    so that the image positions keep the projector's output and the tower its gradient."""
    b, p = inputs["input_ids"].shape
    w = model.W_E
    leaves = {v: torch.zeros(b, p, model.cfg.d_model, dtype=w.dtype, device=w.device, requires_grad=True)
              for v in receiver_names(model)}
    vleaves: dict[str, Tensor] | None = {} if image_path else None
    hooks = list(fwd_hooks)
    if embed is not None and image_path:
        img = _image_mask(model, inputs)
        hooks.append(("hook_embed", lambda x, hook=None: torch.where(img.to(x.device), x, embed.to(x.device, x.dtype))))
    elif embed is not None:
        hooks.append(("hook_embed", lambda x, hook=None: embed.to(x.device, x.dtype)))
    hooks += _edge_hooks(model, inputs, None, None, leaves, image_path, vleaves)
    with torch.enable_grad(), frozen_parameters(model), model.hooks(fwd_hooks=hooks):
        values = metric(model(**inputs))
        if image_path:
            missing = [v for v in receiver_names(model, image_path=True) if _is_vision(v) and v not in vleaves]
            if missing:
                raise _no_tower_run()
            leaves = {v: vleaves[v] for v in receiver_names(model, image_path=True) if _is_vision(v)} | leaves
        grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    return values.detach(), {v: (g if g is not None else torch.zeros_like(leaves[v])).detach()
                             for v, g in zip(leaves, grads)}


def eap(
    model: Any,
    clean_inputs: dict[str, Any],
    corrupt_inputs: dict[str, Any],
    metric: Metric,
    *,
    ig_steps: int | None = None,
    per_prompt: bool = False,
    per_position: bool = False,
    image_path: bool = False,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    progress: bool = False,
) -> EdgeGraph:
    """EAP scores of every edge (``ig_steps=m``: EAP-IG with m interpolation steps; see the module docstring).
    `fwd_hooks` are applied to every run first (e.g. to study a modified model).

    ``per_prompt``: a trailing batch axis. ``per_position``: a trailing position axis (decoder positions; the
    scores sum over it to the ordinary ones). ``image_path``: add the vision tower's nodes and receivers; its
    edges' scores are summed over the whole batch / B (images and crops do not map to prompts one to one in
    every family), so ``image_path`` with ``per_prompt`` or ``per_position`` raises ValueError."""
    if image_path and (per_prompt or per_position):
        raise ValueError("image_path=True gives batch-mean scores only: vision activations do not map to prompts "
                         "(nor to decoder positions) one to one in every family, so per_prompt / per_position "
                         "cannot be combined with it")
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        clean_logits, acts_c = node_activations(model, clean_inputs, image_path=image_path)
        corrupt_logits, acts_x = node_activations(model, corrupt_inputs, image_path=image_path)
        if ig_steps is not None:
            _, cc = model.run_with_cache(**clean_inputs, names_filter=["hook_embed"])
            _, cx = model.run_with_cache(**corrupt_inputs, names_filter=["hook_embed"])
            e_c, e_x = cc["hook_embed"], cx["hook_embed"]
    clean, corrupt = as_float(metric(clean_logits)), as_float(metric(corrupt_logits))
    nodes, recv = node_names(model, image_path=image_path), receiver_names(model, image_path=image_path)
    vnodes, vrecv = [u for u in nodes if _is_vision(u)], [v for v in recv if _is_vision(v)]
    for u in vnodes:
        if acts_x[u].shape != acts_c[u].shape:
            raise ValueError(f"{u}: the clean run gives shape {tuple(acts_c[u].shape)}, the corrupt run "
                             f"{tuple(acts_x[u].shape)}; image-path EAP needs the same image sizes / crops")
    if ig_steps is None:
        _, grads = receiver_gradients(model, clean_inputs, metric, fwd_hooks=fwd_hooks, image_path=image_path)
        method = "EAP"
    else:
        if ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
        grads = {}
        for k in progress_bar(range(ig_steps), desc="EAP-IG", progress=progress):
            hooks = list(fwd_hooks)
            if image_path:  # the tower's input is interpolated too; image positions of hook_embed follow it
                v_c, v_x = acts_c["V.embed"], acts_x["V.embed"]
                ve = v_c + (k / ig_steps) * (v_x - v_c)
                hooks.append(("vision.blocks.0.hook_resid_pre", lambda x, hook=None, ve=ve: ve.to(x.device, x.dtype)))
            _, g = receiver_gradients(model, clean_inputs, metric, embed=e_c + (k / ig_steps) * (e_x - e_c),
                                      fwd_hooks=hooks, image_path=image_path)
            for v in recv:
                grads[v] = g[v] if k == 0 else grads[v] + g[v]
        grads = {v: g / ig_steps for v, g in grads.items()}
        method = f"EAP-IG({ig_steps})"
    n = model.cfg.n_layers
    dnodes, drecv = nodes[len(vnodes):], recv[len(vrecv):]
    diff = torch.stack([acts_x[u] - acts_c[u] for u in dnodes])  # [U, B, P, D]
    grad = torch.stack([grads[v] for v in drecv])  # [V, B, P, D]
    eq = "ubpd,vbpd->uvbp" if per_position else "ubpd,vbpd->uvb"
    scores = as_float(torch.einsum(eq, diff, grad.to(diff.dtype)))
    valid = torch.tensor([[_is_edge(u, v, n) for v in drecv] for u in dnodes])
    scores = scores.masked_fill(~valid.view(*valid.shape, *[1] * (scores.ndim - 2)), float("nan"))
    if not per_prompt:
        scores, clean, corrupt = scores.mean(2), clean.mean(), corrupt.mean()
    if image_path:  # per_prompt / per_position are off: scores [U_dec, V_dec]
        vdiff = torch.stack([(acts_x[u] - acts_c[u]).flatten() for u in vnodes])  # [U_vis, N]
        vgrad = torch.stack([grads[v].flatten() for v in vrecv])  # [V_vis, N]
        vscores = as_float((vdiff @ vgrad.to(vdiff.dtype).T) / clean_inputs["input_ids"].shape[0])
        vvalid = torch.tensor([[_is_edge(u, v, n) for v in vrecv] for u in vnodes])
        full = torch.full((len(nodes), len(recv)), float("nan"), dtype=scores.dtype)
        full[: len(vnodes), : len(vrecv)] = vscores.to(scores.dtype).masked_fill(~vvalid, float("nan"))
        full[len(vnodes) :, len(vrecv) :] = scores
        scores = full
    return EdgeGraph(scores, nodes, recv, clean, corrupt, method, per_position=per_position)


def eap_ig(model: Any, clean_inputs: dict[str, Any], corrupt_inputs: dict[str, Any], metric: Metric,
           steps: int = 5, **kwargs: Any) -> EdgeGraph:
    """EAP-IG with `steps` interpolation steps (steps=1 is EAP)."""
    return eap(model, clean_inputs, corrupt_inputs, metric, ig_steps=steps, **kwargs)


# ---------------------------------------------------------------------------------- exact effects, pruning
def _sources(model: Any, clean_inputs: dict[str, Any], corrupt_inputs: dict[str, Any], ablation: str,
             fwd_hooks: Sequence[tuple[str, Callable]], image_path: bool = False) -> dict[str, Tensor]:
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        if ablation == "counterfactual":
            return node_activations(model, corrupt_inputs, image_path=image_path)[1]
        if ablation == "mean":
            acts = node_activations(model, clean_inputs, image_path=image_path)[1]
            return {u: a.mean(0, keepdim=True) for u, a in acts.items()}
    raise ValueError(f"ablation must be 'counterfactual' or 'mean', got {ablation!r}")


def edge_effects(model: Any, clean_inputs: dict[str, Any], corrupt_inputs: dict[str, Any], metric: Metric,
                 edges: Sequence[Edge], *, ablation: str = "counterfactual", per_prompt: bool = False,
                 image_path: bool = False, fwd_hooks: Sequence[tuple[str, Callable]] = (), progress: bool = True
                 ) -> Tensor:
    """Exact effect of ablating each edge alone: M(clean, edge ablated) - M(clean), [n_edges] (or [n, B]: with
    ``image_path`` a vision edge is ablated in every image at once and [n, B] is its effect on each prompt).
    Both runs go through the edge-patching hooks, so an edge whose source equals its value gives exactly 0."""
    src = _sources(model, clean_inputs, corrupt_inputs, ablation, fwd_hooks, image_path)
    # the baseline runs through the same hooks (nothing ablated), so an edge whose source equals its current value
    # has an effect of exactly 0 (a plain forward differs in rounding: e.g. hook_result sums heads separately)
    base = as_float(metric(patch_edges(model, clean_inputs, [], src, fwd_hooks, image_path=image_path)))
    out = []
    for e in progress_bar(edges, desc="edge patching", progress=progress):
        out.append(as_float(metric(patch_edges(model, clean_inputs, [e], src, fwd_hooks, image_path=image_path)))
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


def faithfulness(model: Any, clean_inputs: dict[str, Any], corrupt_inputs: dict[str, Any], metric: Metric,
                 kept_edges: Iterable[Edge], *, ablation: str = "counterfactual", per_prompt: bool = False,
                 image_path: bool = False, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Faithfulness:
    """Run the clean inputs with every edge NOT in `kept_edges` ablated (edge-level, see `patch_edges`); with
    ``image_path`` the tower's edges are part of the graph (not kept = ablated)."""
    src = _sources(model, clean_inputs, corrupt_inputs, ablation, fwd_hooks, image_path)
    kept = {tuple(e) for e in kept_edges}
    all_edges = valid_edges(model, image_path=image_path)
    unknown = kept - set(all_edges)
    if unknown:
        raise ValueError(f"not edges of this graph: {sorted(unknown)[:5]}")
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        clean = as_float(metric(model(**clean_inputs)))
    ablate = [e for e in all_edges if e not in kept]
    value = as_float(metric(patch_edges(model, clean_inputs, ablate, src, fwd_hooks, image_path=image_path)))
    ablated = as_float(metric(patch_edges(model, clean_inputs, all_edges, src, fwd_hooks, image_path=image_path)))
    if not per_prompt:
        value, clean, ablated = value.mean(), clean.mean(), ablated.mean()
    return Faithfulness(value, clean, ablated, len(kept))


__all__ = ["node_names", "receiver_names", "valid_edges", "vision_depth", "node_activations", "edge_hooks",
           "patch_edges", "EdgeGraph", "receiver_gradients", "eap", "eap_ig", "edge_effects", "prune",
           "Faithfulness", "faithfulness"]
