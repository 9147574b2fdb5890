"""Binding IDs in VLMs (arXiv 2505.22200; after Feng & Steinhardt's binding-ID tests for LLMs).

A *slot* is a position set (boolean mask [batch, pos]) holding one bound variable of one entity: the object slot
(the image tokens of an object), the colour slot (its colour word) and the item slot (its item letter). Slot k is
the k-th entity the text context mentions (the Shapes helpers also offer order="position": the object in image
block k). Every intervention edits the residual stream at ALL layers (default
`blocks.{l}.hook_resid_pre` for every l), optionally with the context frozen (its residuals at every layer set
to the unedited run's, so that only the query tokens are recomputed, as with a cached context).

- `swap_slot` / `factorizability`: the slot's activations replaced by another context's (source) slot; read which
  candidate answer the model gives -> matrix [query, answer].
- `rerotate_keys` / `position_swap`: the keys of a slot re-rotated by delta positions after RoPE
  (`hook_rot_k`), so the slot *looks* as if it sat elsewhere; M-RoPE families shift all 3 axes (or per-axis).
- `binding_deltas` / `mean_intervention`: Delta = mean(slot 1) - mean(slot 0) per layer over many prompts;
  slot 0 := clean + Delta, slot 1 := clean - Delta swaps their binding IDs; `random_deltas` is the same-norm
  random control. Read the fraction of swapped answers with `metrics.Accuracy(swapped_answer)`.

Shapes organism helpers (`shapes_slots`, `shapes_factorizability`, ...) build the masks from `Sample.scene`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from analyses.heads import run_cached, transplant, word_positions
from analyses.metrics import final_logits
from hooked_vlm.components.rotary import apply_rotary

Metric = Callable[[Tensor], Tensor]


def resid_names(model: Any, kind: str = "resid_pre") -> list[str]:
    """`blocks.{l}.hook_{kind}` for every layer."""
    return [f"blocks.{l}.hook_{kind}" for l in range(model.cfg.n_layers)]


@torch.no_grad()
def run_with_resid(
    model: Any, inputs: dict[str, Any], targets: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
    metric: Metric | None = None,
) -> Tensor:
    """Run with every hook in `targets` set to targets[name] [batch, pos, d] at the positions in mask."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        m = mask.to(x.device)[..., None]
        return torch.where(m, targets[hook.name].to(x.device, x.dtype), x)

    with model.hooks(fwd_hooks=[(n, hook) for n in targets]):
        logits = model(**inputs)
    return logits if metric is None else metric(logits)


def _or(*masks: Tensor | None) -> Tensor:
    out = None
    for m in masks:
        if m is not None:
            out = m.bool().cpu() if out is None else out | m.bool().cpu()
    return out


# ----------------------------------------------------------------------------------- factorizability
@torch.no_grad()
def swap_slot(
    model: Any,
    inputs: dict[str, Any],
    source: dict[str, Any],
    slot: Bool[Tensor, "batch pos"],
    source_slot: Bool[Tensor, "batch pos2"] | None = None,
    freeze: Bool[Tensor, "batch pos"] | None = None,
    hook_names: Sequence[str] | None = None,
    metric: Metric | None = None,
) -> Tensor:
    """Run `inputs` with the residuals at `slot` replaced, at every hook in hook_names (default all resid_pre),
    by the `source` run's residuals at `source_slot` (same count per prompt). `freeze`: positions (the context)
    held at the unedited run's values at every layer. Returns logits, or metric(logits)."""
    names = list(hook_names or resid_names(model))
    _, clean = run_cached(model, inputs, names)
    _, src = run_cached(model, source, names)
    targets = {n: transplant(clean[n], src[n], slot, source_slot) for n in names}
    return run_with_resid(model, inputs, targets, _or(slot, freeze), metric)


def read_answers(logits: Tensor, answers: Int[Tensor, "n_answers batch"], attention_mask: Tensor | None = None,
                 readout: str = "choice") -> Float[Tensor, "n_answers batch"]:
    """Per candidate answer and prompt: "choice" 1.0 where it has the highest logit among the candidates,
    "prob" its softmax probability over the vocabulary, "logit" its logit (at the final token)."""
    fl = final_logits(logits, attention_mask).float()
    answers = torch.as_tensor(answers, device=fl.device).long()
    vals = fl.gather(1, answers.T).T  # [n_answers, batch]
    if readout == "logit":
        return vals
    if readout == "prob":
        return fl.softmax(-1).gather(1, answers.T).T
    if readout == "choice":
        return torch.nn.functional.one_hot(vals.argmax(0), answers.shape[0]).T.float()
    raise ValueError(f"readout must be 'choice', 'prob' or 'logit', got {readout!r}")


@torch.no_grad()
def factorizability(
    model: Any,
    queries: Sequence[dict[str, Any]],
    answers: Int[Tensor, "n_answers batch"],
    source: dict[str, Any] | None = None,
    slots: Sequence[Tensor] | None = None,
    source_slot: Tensor | None = None,
    freeze: Sequence[Tensor | None] | None = None,
    hook_names: Sequence[str] | None = None,
    readout: str = "choice",
) -> Float[Tensor, "n_queries n_answers"]:
    """Factorizability matrix: for each query prompt batch (same contexts, different questions), the slot
    `slots[i]` swapped with the source context's `source_slot` (all layers), then the mean `read_answers`
    over prompts for each candidate answer. source=None gives the unedited matrix (the baseline)."""
    rows = []
    for i, q in enumerate(queries):
        if source is None:
            logits = model(**q)
        else:
            logits = swap_slot(model, q, source, slots[i], source_slot, None if freeze is None else freeze[i],
                               hook_names)
        rows.append(read_answers(logits, answers, q.get("attention_mask"), readout).mean(-1).cpu())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------ position independence
def delta_positions(
    position_ids: Tensor, shifts: Sequence[tuple[Tensor, Any]]
) -> Float[Tensor, "*axes batch pos"]:
    """Float tensor shaped like position_ids ([batch, pos] or M-RoPE [3, batch, pos]) holding, at each slot's
    positions, its delta: a number, one per prompt [batch], or for M-RoPE one per axis and prompt [3, batch]
    (a number or [batch] shifts all 3 axes alike). Zero elsewhere."""
    d_ids = torch.zeros(position_ids.shape, dtype=torch.float32)
    b = position_ids.shape[-2]
    for mask, delta in shifts:
        d = torch.as_tensor(delta, dtype=torch.float32).cpu()
        if d.ndim == 0:
            d = d.expand(b)
        if d.ndim == 1:
            if d.shape[0] != b:
                raise ValueError(f"delta has {d.shape[0]} entries for {b} prompts")
            d = d[:, None] if position_ids.ndim == 2 else d[None, :, None].expand(3, b, 1)
        elif d.shape == (3, b) and position_ids.ndim == 3:
            d = d[..., None]
        else:
            raise ValueError(f"delta of shape {tuple(d.shape)} does not fit position ids {tuple(position_ids.shape)}")
        d_ids = d_ids + torch.where(mask.bool().cpu(), d, torch.zeros(()))
    return d_ids


def rotation(rotary: Any, delta_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) of a pure rotation by delta_ids positions (the rotary's attention_scaling divided out), so
    apply_rotary(apply_rotary(k, R(p)), R(delta)) == apply_rotary(k, R(p + delta))."""
    cos, sin = rotary(delta_ids.to(rotary.inv_freq.device), torch.float32)
    s = getattr(rotary, "attention_scaling", 1.0)
    return (cos / s).to(dtype), (sin / s).to(dtype)


@torch.no_grad()
def rerotate_keys(
    model: Any,
    inputs: dict[str, Any],
    shifts: Sequence[tuple[Bool[Tensor, "batch pos"], Any]],
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Run with the keys (after RoPE, `blocks.{l}.attn.hook_rot_k`) at each slot rotated by an extra delta
    positions: shifts = [(mask, delta), ...] (see `delta_positions`). Returns logits or metric(logits)."""
    if position_ids is None:
        position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = model.layout(inputs).position_ids
    d_ids = delta_positions(position_ids, shifts)
    moved = _or(*[m for m, _ in shifts])
    layers = range(model.cfg.n_layers) if layers is None else layers

    rot: dict[Any, tuple[Tensor, Tensor]] = {}

    def hook(k: Tensor, hook: Any) -> Tensor:
        rotary = model.layer_rotary(int(hook.name.split(".")[1]))  # layers may rotate with different bases
        if (id(rotary), k.dtype, k.device) not in rot:
            cos, sin = rotation(rotary, d_ids, k.dtype)
            rot[id(rotary), k.dtype, k.device] = cos.to(k.device), sin.to(k.device)
        cos, sin = rot[id(rotary), k.dtype, k.device]
        return torch.where(moved.to(k.device)[..., None, None], apply_rotary(k, cos, sin), k)

    with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_rot_k", hook) for l in layers]):
        logits = model(**inputs)
    return logits if metric is None else metric(logits)


def _first_position_ids(position_ids: Tensor, mask: Tensor) -> Tensor:
    """Position id(s) of each prompt's first masked token: [batch] (1-D) or [3, batch] (M-RoPE)."""
    first = mask.int().argmax(1)
    if position_ids.ndim == 2:
        return position_ids[torch.arange(len(first)), first].float()
    return position_ids[:, torch.arange(len(first)), first].float()


@torch.no_grad()
def position_swap(
    model: Any,
    inputs: dict[str, Any],
    slot_a: Bool[Tensor, "batch pos"],
    slot_b: Bool[Tensor, "batch pos"],
    fractions: Sequence[float | int] = (0.0, 0.25, 0.5, 0.75, 1.0),
    metric: Metric | None = None,
) -> list[Tensor]:
    """Move slot a toward slot b's position and b toward a's by fraction f of the distance between their first
    tokens (f = 1: positions swapped), by key re-rotation at every layer. One result per fraction."""
    pos = model.layout(inputs).position_ids
    dist = _first_position_ids(pos, slot_b) - _first_position_ids(pos, slot_a)
    return [rerotate_keys(model, inputs, [(slot_a, f * dist), (slot_b, -f * dist)], metric, position_ids=pos)
            for f in fractions]


# ------------------------------------------------------------------------------------- mean interventions
@torch.no_grad()
def slot_means(
    model: Any, inputs: dict[str, Any], slots: Sequence[Bool[Tensor, "batch pos"]],
    hook_names: Sequence[str] | None = None,
) -> Float[Tensor, "n_slots n_hooks d_model"]:
    """Mean residual of each slot (its positions of all prompts pooled) at each hook."""
    names = list(hook_names or resid_names(model))
    _, cache = run_cached(model, inputs, names)
    return torch.stack([torch.stack([cache[n][s.to(cache[n].device)].float().mean(0).cpu() for n in names])
                        for s in slots])


def binding_deltas(
    model: Any, inputs: dict[str, Any], slot0: Tensor, slot1: Tensor, hook_names: Sequence[str] | None = None
) -> Float[Tensor, "n_hooks d_model"]:
    """Delta = mean(slot 1) - mean(slot 0) per hook (the difference of binding IDs, content averaged out)."""
    m = slot_means(model, inputs, [slot0, slot1], hook_names)
    return m[1] - m[0]


def random_deltas(delta: Float[Tensor, "n_hooks d_model"], seed: int = 0) -> Tensor:
    """Random directions with the same norm as delta, per hook (the control)."""
    r = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed))
    return r / r.norm(dim=-1, keepdim=True) * delta.float().norm(dim=-1, keepdim=True)


@torch.no_grad()
def mean_intervention(
    model: Any,
    inputs: dict[str, Any],
    slot0: Bool[Tensor, "batch pos"],
    slot1: Bool[Tensor, "batch pos"],
    delta: Float[Tensor, "n_hooks d_model"],
    metric: Metric | None = None,
    hook_names: Sequence[str] | None = None,
    freeze: Bool[Tensor, "batch pos"] | None = None,
) -> Tensor:
    """Run with, at every hook, slot 0 := unedited + delta and slot 1 := unedited - delta (all their positions).
    delta = 0 is the identity. Returns logits or metric(logits)."""
    names = list(hook_names or resid_names(model))
    if len(delta) != len(names):
        raise ValueError(f"delta has {len(delta)} rows for {len(names)} hooks")
    _, clean = run_cached(model, inputs, names)
    targets = {}
    for n, d in zip(names, delta):
        x = clean[n]
        d = d.to(x.device, x.dtype)
        targets[n] = x + slot0.to(x.device)[..., None] * d - slot1.to(x.device)[..., None] * d
    return run_with_resid(model, inputs, targets, _or(slot0, slot1, freeze), metric)


# ------------------------------------------------------------------------------------- Shapes organism
def slot_objects(scene: Any, order: str = "mention") -> tuple[int, int]:
    """Object index of slot 0 and slot 1: in mention order (the k-th object the context names) or in image
    order (slot k = the object in block k: upper-left 0, lower-right 1)."""
    if order == "mention":
        return tuple(scene.mention_order)
    if order == "position":
        return tuple(sorted(range(2), key=lambda i: scene.slots[i]))
    raise ValueError(f"order must be 'mention' or 'position', got {order!r}")


def shapes_slots(model: Any, inputs: dict[str, Any], scenes: Sequence[Any], layout: Any = None,
                 image_size: tuple[int, int] | None = None, order: str = "mention") -> dict[str, list[Tensor]]:
    """{"object": [slot0, slot1], "colour": [...], "item": [...]} masks for Shapes prompts (one scene, or
    Sample, per prompt); slot k = the k-th entity the context mentions (order="mention") or the object in
    image block k (order="position"): its image tokens (patch centres inside scene.boxes, via layout.in_box),
    its colour word and its item letter (first occurrences: in the context).
    image_size: (width, height) in pixels, default the organism's."""
    from hooked_vlm.organism.shapes import IMAGE_SIZE

    if layout is not None:
        layout.check_inputs(inputs["input_ids"])  # a layout of other prompts would select wrong tokens silently
    layout = layout or model.layout(inputs)
    scenes = [getattr(s, "scene", s) for s in scenes]
    w, h = image_size or (IMAGE_SIZE, IMAGE_SIZE)
    ids = inputs["input_ids"]
    out: dict[str, list[Tensor]] = {"object": [], "colour": [], "item": []}
    for k in range(2):
        objs = [slot_objects(sc, order)[k] for sc in scenes]
        obj = torch.zeros(layout.shape, dtype=torch.bool)
        for bi, (sc, i) in enumerate(zip(scenes, objs)):
            x0, y0, x1, y1 = sc.boxes[i]
            obj[bi] = layout.in_box(x0 / w, y0 / h, x1 / w, y1 / h)[bi]
        out["object"].append(obj)
        out["colour"].append(word_positions(model, ids, [sc.colours[i] for sc, i in zip(scenes, objs)], 0))
        out["item"].append(word_positions(model, ids, [sc.items[i] for sc, i in zip(scenes, objs)], 0))
    return out


def shapes_context(model: Any, inputs: dict[str, Any]) -> Bool[Tensor, "batch pos"]:
    """The image and the text context (every real position up to the context's second '.')."""
    end = word_positions(model, inputs["input_ids"], ".", occurrence=1).int().argmax(1)
    pos = torch.arange(inputs["input_ids"].shape[1])
    return (pos[None] <= end[:, None]) & inputs["attention_mask"].bool().cpu()


def disjoint_scene(scene: Any, rng: np.random.Generator) -> Any:
    """A second context c' for `scene`: other shapes, colours and items, same boxes and mention order, so that
    slot k of both sits at the same positions."""
    from hooked_vlm.organism import COLOURS, ITEMS, SHAPES

    def pick(pool: Sequence[str], used: Sequence[str]) -> tuple[str, str]:
        free = [x for x in pool if x not in used]
        a, b = rng.choice(len(free), size=2, replace=False)
        return free[int(a)], free[int(b)]

    return replace(scene, shapes=pick(SHAPES, scene.shapes), colours=pick(COLOURS, scene.colours),
                   items=pick(ITEMS, scene.items))


def _shape_query(scene: Any, context_scene: Any, obj: int) -> str:
    from hooked_vlm.organism.shapes import query_text

    return f"<image> {context_scene.context()} {query_text(scene, 'shape_item', obj)[0]}"


def _encode(model: Any, images: list, texts: list[str]) -> dict[str, Any]:
    return dict(model.processor(images=images, text=texts, padding=True, return_tensors="pt"))


@torch.no_grad()
def shapes_factorizability(
    model: Any, n: int = 32, seed: int = 0, kinds: Sequence[str] = ("object", "colour", "item"),
    readout: str = "choice", frozen_context: bool = True,
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Factorizability matrices on the Shapes organism: n scene pairs (c, c') with disjoint attributes; for each
    slot kind, slot 0 of c swapped with slot 0 of c' at all layers. Rows: questions about O0, O1, O'0, O'1
    (asked in context c); columns: answers I0, I1, I'0, I'1. Key "none" is the unedited matrix."""
    from hooked_vlm.organism import ShapesGenerator, render

    gen = ShapesGenerator(seed)
    rng = np.random.default_rng(seed + 1)
    cs = [gen.scene() for _ in range(n)]
    cps = [disjoint_scene(c, rng) for c in cs]
    images = [render(c) for c in cs]
    tok = model.tokenizer
    # queries: about the k-th mentioned object of c, then of c'
    queries, slot_sets = [], []
    for sc_list, k in [(cs, 0), (cs, 1), (cps, 0), (cps, 1)]:
        texts = [_shape_query(s, c, s.mention_order[k]) for s, c in zip(sc_list, cs)]
        q = _encode(model, images, texts)
        queries.append(q)
    answers = torch.tensor([[tok.convert_tokens_to_ids(s.items[s.mention_order[k]]) for s in sc_list]
                            for sc_list, k in [(cs, 0), (cs, 1), (cps, 0), (cps, 1)]])
    source = _encode(model, [render(c) for c in cps], [_shape_query(c, c, c.mention_order[0]) for c in cps])
    src_slots = shapes_slots(model, source, cps)
    out = {"none": factorizability(model, queries, answers, readout=readout)}
    for kind in kinds:
        slots = [shapes_slots(model, q, cs)[kind][0] for q in queries]
        freeze = [shapes_context(model, q) for q in queries] if frozen_context else None
        out[kind] = factorizability(model, queries, answers, source, slots, src_slots[kind][0], freeze,
                                    readout=readout)
    labels = ["O0", "O1", "O'0", "O'1"], ["I0", "I1", "I'0", "I'1"]
    return out, *labels


def _shape_prompts(model: Any, scenes: Sequence[Any], objs: Sequence[int]) -> dict[str, Any]:
    from hooked_vlm.organism import render

    return _encode(model, [render(s) for s in scenes], [_shape_query(s, s, i) for s, i in zip(scenes, objs)])


@torch.no_grad()
def shapes_mean_intervention(
    model: Any, kinds: Sequence[str] = ("object", "colour", "item"), n_fit: int = 64, n_eval: int = 32,
    seed: int = 0, order: str = "mention", frozen_context: bool = False, control_seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Mean interventions on Shapes: Delta_kind = mean(slot 1) - mean(slot 0) per layer over n_fit prompts; on
    n_eval other prompts asking about the slot-0 object (answer I0), slot 0 += Delta and slot 1 -= Delta at
    every layer. Returns {kind: {"swapped": fraction answering I1, "kept": fraction answering I0,
    "random_swapped": the same with a same-norm random Delta}} plus "none" (no intervention)."""
    from analyses.metrics import Accuracy
    from hooked_vlm.organism import ShapesGenerator

    gen = ShapesGenerator(seed)
    fit = [gen.scene() for _ in range(n_fit)]
    ev = [gen.scene() for _ in range(n_eval)]
    fit_in = _shape_prompts(model, fit, [slot_objects(s, order)[0] for s in fit])
    ev_in = _shape_prompts(model, ev, [slot_objects(s, order)[0] for s in ev])
    fit_slots, ev_slots = shapes_slots(model, fit_in, fit, order=order), shapes_slots(model, ev_in, ev, order=order)
    tok = model.tokenizer
    ids = [torch.tensor([tok.convert_tokens_to_ids(s.items[slot_objects(s, order)[k]]) for s in ev]) for k in (0, 1)]
    mask = ev_in.get("attention_mask")
    kept, swapped = Accuracy(ids[0], mask), Accuracy(ids[1], mask)
    freeze = shapes_context(model, ev_in) if frozen_context else None
    logits = model(**ev_in)
    out = {"none": {"swapped": float(swapped(logits).mean()), "kept": float(kept(logits).mean())}}
    for kind in kinds:
        delta = binding_deltas(model, fit_in, fit_slots[kind][0], fit_slots[kind][1])
        res = {}
        for name, d in (("", delta), ("random_", random_deltas(delta, control_seed))):
            logits = mean_intervention(model, ev_in, ev_slots[kind][0], ev_slots[kind][1], d, freeze=freeze)
            res[name + "swapped"] = float(swapped(logits).mean())
            res[name + "kept"] = float(kept(logits).mean())
        out[kind] = res
    return out


@torch.no_grad()
def shapes_position_swap(
    model: Any, kind: str = "object", n: int = 32, seed: int = 0,
    fractions: Sequence[float | int] = (0.0, 0.25, 0.5, 0.75, 1.0), order: str = "mention",
) -> dict[str, list[float]]:
    """Position independence on Shapes: the keys of slot 0 and slot 1 (`kind`) re-rotated toward each other's
    positions by each fraction, at every layer; questions about the slot-0 object. Returns the fraction of
    answers that stay I0 ("kept") and that become I1 ("swapped"), per fraction."""
    from analyses.metrics import Accuracy
    from hooked_vlm.organism import ShapesGenerator

    gen = ShapesGenerator(seed)
    scenes = [gen.scene() for _ in range(n)]
    inputs = _shape_prompts(model, scenes, [slot_objects(s, order)[0] for s in scenes])
    slots = shapes_slots(model, inputs, scenes, order=order)[kind]
    tok = model.tokenizer
    ids = [torch.tensor([tok.convert_tokens_to_ids(s.items[slot_objects(s, order)[k]]) for s in scenes]) for k in (0, 1)]
    mask = inputs.get("attention_mask")
    runs = position_swap(model, inputs, slots[0], slots[1], fractions)
    return {"kept": [float(Accuracy(ids[0], mask)(r).mean()) for r in runs],
            "swapped": [float(Accuracy(ids[1], mask)(r).mean()) for r in runs]}


# ------------------------------------------------------------------------------------------------ plots
def plot_factorizability(
    matrix: Float[Tensor, "n_queries n_answers"], row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None, title: str = "Factorizability",
) -> go.Figure:
    """Query x answer heatmap (e.g. fraction of prompts choosing each answer)."""
    m = matrix.detach().float().cpu()
    rows = list(row_labels or [f"q{i}" for i in range(m.shape[0])])
    cols = list(col_labels or [f"a{j}" for j in range(m.shape[1])])
    fig = go.Figure(go.Heatmap(z=m.tolist(), x=cols, y=rows, colorscale="Blues", zmin=0,
                               text=[[f"{v:.2f}" for v in r] for r in m.tolist()], texttemplate="%{text}",
                               hovertemplate="query %{y}, answer %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="answer", yaxis_title="query", yaxis_autorange="reversed")
    return fig


def plot_factorizability_grid(matrices: dict[str, Tensor], row_labels: Sequence[str], col_labels: Sequence[str],
                              title: str = "Factorizability") -> go.Figure:
    """One heatmap per swapped slot kind, side by side."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(matrices), subplot_titles=list(matrices), shared_yaxes=True)
    for i, m in enumerate(matrices.values()):
        fig.add_trace(go.Heatmap(z=m.float().tolist(), x=list(col_labels), y=list(row_labels), zmin=0, zmax=1,
                                 colorscale="Blues", showscale=i == 0), row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title)
    return fig


def plot_position_sweep(fractions: Sequence[Any], values: Sequence[Any] | dict[str, Sequence[Any]],
                        title: str = "Position independence", ylabel: str = "metric") -> go.Figure:
    """Metric against the fraction of the distance the slots were moved (key re-rotation)."""
    series = values if isinstance(values, dict) else {"metric": values}
    fig = go.Figure([go.Scatter(x=list(fractions), y=[float(v) for v in vs], mode="lines+markers", name=k)
                     for k, vs in series.items()])
    fig.update_layout(title=title, xaxis_title="fraction of the slot distance moved", yaxis_title=ylabel)
    return fig


def plot_mean_intervention(results: dict[str, Any], title: str = "Mean interventions",
                           ylabel: str = "fraction of answers swapped") -> go.Figure:
    """Bars, e.g. {"Delta_O": .., "Delta_I": .., "random": ..}."""
    fig = go.Figure(go.Bar(x=list(results), y=[float(v) for v in results.values()]))
    fig.update_layout(title=title, yaxis_title=ylabel, yaxis_range=[0, 1])
    return fig
