"""Binding IDs in VLMs (arXiv 2505.22200; after Feng & Steinhardt's binding-ID tests for LLMs).

A *slot* is a position set (boolean mask [batch, pos]) holding one bound variable of one entity: the object slot
(the image tokens of an object), the colour slot (its colour word) and the item slot (its item letter). Slot k is
the k-th entity the text context mentions (the Shapes helpers also offer order="position": the object in image
block k). Every intervention edits the residual stream at ALL layers (default
`blocks.{l}.hook_resid_pre` for every l), optionally with the context frozen (its residuals at every layer set
to the unedited run's, so that only the query tokens are recomputed, as with a cached context).

- `swap_slot` / `factorizability`: the slot's activations in the clean context replaced by another (corrupt)
  context's slot; read which candidate answer the model gives -> matrix [query, answer]. `pad_slot` widens a
  slot by the paper's extra token (item: the token before the letter; colour: the token after the colour word).
- `rerotate_keys` / `position_swap`: the keys of a slot re-rotated by delta positions after RoPE
  (`hook_rot_k`), so the slot *looks* as if it sat elsewhere; M-RoPE families shift all 3 axes (or per-axis).
- `mean_intervention_protocol` (analyses/binding_means.py, re-exported here): the paper's mean interventions with
  the paired, per-token Delta (`paired_deltas`): slot 0 := clean + Delta, slot 1 := clean - Delta at every layer,
  context frozen; conditions O, C, I, O+I, O+C; questions about both objects; a scale sweep with the same-norm
  random control (`random_deltas`) at every scale; rates as `toolkit.stats.Estimate`s.
- `binding_deltas` / `mean_intervention`: the simplified option kept for comparison: ONE pooled Delta = mean(slot 1)
  - mean(slot 0) per layer over unpaired prompts (content averaged out only in expectation, every token alike).

Shapes organism helpers (`shapes_slots`, `shapes_factorizability`, ...) build the masks from `Sample.scene`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .binding_means import (CONDITIONS, BindingQuery, MeanInterventionResult, SlotPairs, _or, add_deltas,
                            mean_intervention_protocol, paired_deltas, per_token_delta, prompt_chunks, random_deltas,
                            resid_names, run_with_resid, slot_activations, slot_tokens)
from .metrics import final_logits
from .toolkit import Metric, act_name, check_pair, run_cached, transplant
from hooked_vlm.components.rotary import apply_rotary

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM



# ----------------------------------------------------------------------------------- factorizability
def pad_slot(slot: Bool[Tensor, "batch pos"], before: int = 0, after: int = 0,
             attention_mask: Tensor | None = None) -> Bool[Tensor, "batch pos"]:
    """The slot widened by `before` positions before and `after` positions after each of its tokens (2505.22200
    pads the item slot with the token before the letter and the colour slot with the token after the colour word),
    kept inside the real tokens of attention_mask."""
    if before < 0 or after < 0:
        raise ValueError(f"pad_slot: before and after are counts of positions >= 0, got {before}, {after}")
    m = slot.bool().cpu()
    out = m.clone()
    for k in range(1, before + 1):
        out[:, :-k] |= m[:, k:]
    for k in range(1, after + 1):
        out[:, k:] |= m[:, :-k]
    if attention_mask is not None:
        out &= attention_mask.bool().cpu()
    return out


@torch.no_grad()
def swap_slot(
    model: "HookedVLM",
    clean: dict[str, Any],
    corrupt: dict[str, Any],
    metric: Metric | None = None,
    *,
    slot: Bool[Tensor, "batch pos"],
    corrupt_slot: Bool[Tensor, "batch pos2"] | None = None,
    freeze: Bool[Tensor, "batch pos"] | None = None,
    hook_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    corrupt_cache: dict[str, Tensor] | None = None,
) -> Tensor:
    """Run `clean` with the residuals at `slot` replaced, at every hook in hook_names (default all resid_pre), by
    the `corrupt` run's residuals at `corrupt_slot` (default `slot`; the same count per prompt, taken in order).
    `freeze`: positions (the context) held at the clean run's values at every layer. Returns logits, or
    metric(logits), over chunks of batch_size prompts (None: all at once). corrupt_cache: the corrupt run's
    activations at hook_names when the caller has them (only without chunks)."""
    if clean["input_ids"].shape[0] != corrupt["input_ids"].shape[0]:
        check_pair(clean, corrupt)  # names both batch sizes
    names = list(hook_names or resid_names(model))
    chunks = zip(prompt_chunks(model, clean, batch_size), prompt_chunks(model, corrupt, batch_size))
    out = []
    if corrupt_cache is not None and batch_size is not None:
        raise ValueError("swap_slot: corrupt_cache holds the whole batch; pass it without batch_size")
    for (i, j, c), (_, _, x) in chunks:
        _, cl = run_cached(model, c, names)
        src = corrupt_cache if corrupt_cache is not None else run_cached(model, x, names)[1]
        cs = slot if corrupt_slot is None else corrupt_slot
        targets = {n: transplant(cl[n], src[n], slot[i:j], cs[i:j]) for n in names}
        out.append(run_with_resid(model, c, targets, _or(slot[i:j], None if freeze is None else freeze[i:j]), metric))
    return torch.cat(out)


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
    model: "HookedVLM",
    queries: Sequence[dict[str, Any]],
    answers: Int[Tensor, "n_answers batch"],
    corrupt: dict[str, Any] | None = None,
    *,
    slots: Sequence[Tensor] | None = None,
    corrupt_slot: Tensor | None = None,
    freeze: Sequence[Tensor | None] | None = None,
    hook_names: Sequence[str] | None = None,
    readout: str = "choice",
    batch_size: int | None = None,
) -> Float[Tensor, "n_queries n_answers"]:
    """Factorizability matrix: for each query prompt batch (the clean contexts, each with its own question), the
    slot `slots[i]` replaced by the `corrupt` context's `corrupt_slot` (all layers; see `swap_slot`), then the
    mean `read_answers` over prompts for each candidate answer. corrupt=None gives the unedited matrix (the
    baseline). To swap both slots, pass slot0 | slot1 as the slot and the corrupt context's union as corrupt_slot."""
    if corrupt is not None and slots is None:
        raise ValueError("factorizability: a corrupt context needs slots (one mask per query batch)")
    rows = []
    names = list(hook_names or resid_names(model))
    cache = run_cached(model, corrupt, names)[1] if corrupt is not None and batch_size is None else None
    for i, q in enumerate(queries):
        if corrupt is None:
            logits = model(**q)
        else:
            logits = swap_slot(model, q, corrupt, slot=slots[i], corrupt_slot=corrupt_slot,
                               freeze=None if freeze is None else freeze[i], hook_names=names,
                               batch_size=batch_size, corrupt_cache=cache)
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
    model: "HookedVLM",
    inputs: dict[str, Any],
    shifts: Sequence[tuple[Bool[Tensor, "batch pos"], Any]],
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    position_ids: Tensor | None = None,
    freeze: Bool[Tensor, "batch pos"] | None = None,
) -> Tensor:
    """Run with the keys (after RoPE, `blocks.{l}.attn.hook_rot_k`) at each slot rotated by an extra delta
    positions: shifts = [(mask, delta), ...] (see `delta_positions`). Returns logits or metric(logits).

    freeze: the context (2505.22200's protocol): these positions, less the moved slots, keep their clean residual
    stream (`resid_pre`) at every layer, so the re-rotation reaches the answer only through the slots themselves
    and not through context tokens that read them."""
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

    hooks = [(act_name("rot_k", l), hook) for l in layers]
    if freeze is not None:
        keep = freeze.bool().cpu() & ~moved
        names = [act_name("resid_pre", l) for l in range(model.cfg.n_layers)]
        _, clean = run_cached(model, inputs, names)

        def hold(x: Tensor, hook: Any) -> Tensor:
            return torch.where(keep.to(x.device)[..., None], clean[hook.name].to(x.device, x.dtype), x)

        hooks += [(name, hold) for name in names]
    with model.hooks(fwd_hooks=hooks):
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
    model: "HookedVLM",
    inputs: dict[str, Any],
    slot_a: Bool[Tensor, "batch pos"],
    slot_b: Bool[Tensor, "batch pos"],
    fractions: Sequence[float | int] = (0.0, 0.25, 0.5, 0.75, 1.0),
    metric: Metric | None = None,
    freeze: Bool[Tensor, "batch pos"] | None = None,
) -> list[Tensor]:
    """Move slot a toward slot b's position and b toward a's by fraction f of the distance between their first
    tokens (f = 1: positions swapped), by key re-rotation at every layer. One result per fraction. `freeze`: the
    context held at its clean residuals at every layer (the paper's protocol; see `rerotate_keys`)."""
    pos = model.layout(inputs).position_ids
    dist = _first_position_ids(pos, slot_b) - _first_position_ids(pos, slot_a)
    return [rerotate_keys(model, inputs, [(slot_a, f * dist), (slot_b, -f * dist)], metric, position_ids=pos,
                          freeze=freeze) for f in fractions]


# ------------------------------------------------------------------------------------- mean interventions
@torch.no_grad()
def slot_means(
    model: "HookedVLM", inputs: dict[str, Any], slots: Sequence[Bool[Tensor, "batch pos"]],
    hook_names: Sequence[str] | None = None,
) -> Float[Tensor, "n_slots n_hooks d_model"]:
    """Mean residual of each slot (its positions of all prompts pooled) at each hook."""
    names = list(hook_names or resid_names(model))
    _, cache = run_cached(model, inputs, names)
    return torch.stack([torch.stack([cache[n][s.to(cache[n].device)].float().mean(0).cpu() for n in names])
                        for s in slots])


def binding_deltas(
    model: "HookedVLM", inputs: dict[str, Any], slot0: Tensor, slot1: Tensor, hook_names: Sequence[str] | None = None
) -> Float[Tensor, "n_hooks d_model"]:
    """The pooled option: Delta = mean(slot 1) - mean(slot 0) per hook over unpaired prompts (content averaged out
    only in expectation; one vector for all the slot's tokens). The paper's estimator is `paired_deltas`."""
    m = slot_means(model, inputs, [slot0, slot1], hook_names)
    return m[1] - m[0]


@torch.no_grad()
def mean_intervention(
    model: "HookedVLM",
    inputs: dict[str, Any],
    slot0: Bool[Tensor, "batch pos"],
    slot1: Bool[Tensor, "batch pos"],
    delta: Float[Tensor, "n_hooks d_model"],
    metric: Metric | None = None,
    hook_names: Sequence[str] | None = None,
    freeze: Bool[Tensor, "batch pos"] | None = None,
) -> Tensor:
    """Run with, at every hook, slot 0 := unedited + delta and slot 1 := unedited - delta (all their positions),
    with one vector per hook (the pooled option; per-token Deltas: `add_deltas`). delta = 0 is the identity.
    Returns logits or metric(logits)."""
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
