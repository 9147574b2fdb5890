"""Dual mechanisms of spatial binding (arXiv 2603.22278): probes, last-token patching, strip swaps, amplification.

The paper's protocols (the defaults, re-exported at the end of this module):
- `position_probe` / `position_labels` / `absolute_vs_relative` (analyses/spatial_probes.py): order / position
  probes on post-projection visual tokens, AdamW as the paper, held-out accuracy with an interval;
- `criss_cross` / `criss_cross_pairs` / `vision_ablation` (analyses/criss_cross.py): the interchange between a
  clean image and its colour-reversed counterfactual, objects vs strips, at resid_pre 0 and every resid_post;
  the full-grid vision-encoder ablation;
- `amplification_protocol` (analyses/spatial_amplify.py): both probe columns, fix rate at the best global and the
  per-item oracle alpha, against separately drawn random W.

Simplified variants kept below as documented options:

- Linear probes (multinomial logistic regression in torch, LBFGS on standardised features) on any hook at a
  position set, e.g. image tokens of `hook_embed` (= the projector's output as placed in the sequence, for every
  family) or `projector.hook_out` (one row per image token, reading order), with a train/test split BY PROMPT.
- `last_token_patching`: the residual at the final token patched from a counterfactual run, one layer at a
  time (batched through the batch dimension) -> [layer].
- `swap_strips` / `strip_swap_matrix`: criss-cross swaps of two rows or two columns of image features
  (TokenLayout.row / col), metric change.
- `amplify`: h += alpha * sum_k (h . u_k) u_k at decoder layer 0 (`blocks.0.hook_resid_pre`) at image
  positions, u_k the probe's unit directions; `control_seed` gives random directions whose addition has the
  same norm, token by token.

Activations of hooks that are not [batch, pos, ...] (`projector.hook_out` [n_image_tokens, d]) are mapped onto the
sequence through the image-token positions in reading order (`as_sequence`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .toolkit import (Metric, Site, act_name, check_batch_size, first_position, metric_values, run_cached,
                      run_sites, transplant, transplant_sweep)
from .toolkit.sweep import decoder_layer

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

from .spatial_base import Probe, activations_at, as_sequence, fit_probe, split_prompts  # noqa: F401 (re-exported)

Inputs = dict[str, Any]


@dataclass
class ProbeResult:
    probe: Probe
    train_acc: float
    test_acc: float


def _rows_and_labels(positions: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Labels per masked position: labels [batch, pos] (read at the mask; -1 = skip) or [batch] (per prompt)."""
    if labels.ndim == 1:
        labels = labels[:, None].expand(positions.shape)
    keep = positions.cpu() & (labels.cpu() >= 0)
    return keep, labels.cpu()[keep]


@torch.no_grad()
def probe_hooks(
    model: "HookedVLM",
    inputs: dict[str, Any],
    hook_names: Sequence[str],
    positions: Bool[Tensor, "batch pos"],
    labels: Int[Tensor, "batch pos"] | Int[Tensor, "batch"],
    pool: bool = False,
    test_frac: float | int = 0.25,
    seed: int = 0,
    l2: float | int = 1e-3,
    steps: int = 200,
) -> dict[str, ProbeResult]:
    """A probe per hook, trained on the masked positions of the train prompts and scored on the test prompts.
    labels: per position [batch, pos] (-1 = skip) or per prompt [batch]; pool=True averages each prompt's
    positions into one row (needs per-prompt labels)."""
    keep, y = _rows_and_labels(positions, labels)
    feats, prompt = activations_at(model, inputs, hook_names, keep)
    if pool:
        if labels.ndim != 1:
            raise ValueError("pool=True needs one label per prompt")
        has = keep.any(1)
        prompt_ids = has.nonzero().flatten()
        feats = {n: torch.stack([f[prompt == p].mean(0) for p in prompt_ids]) for n, f in feats.items()}
        y, prompt = labels.cpu()[prompt_ids].long(), torch.arange(len(prompt_ids))
    test = split_prompts(int(prompt.max()) + 1 if len(prompt) else 0, test_frac, seed)[prompt]
    n_classes = int(y.max()) + 1
    out = {}
    for n, x in feats.items():
        p = fit_probe(x[~test], y[~test], n_classes, l2, steps)
        out[n] = ProbeResult(p, p.accuracy(x[~test], y[~test]), p.accuracy(x[test], y[test]))
    return out


# ------------------------------------------------------------------------------------ last-token patching
@torch.no_grad()
def last_token_patching(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    hook: str = "resid_pre",
    positions: Any = None,
    corrupt_positions: Any = None,
    batch_size: int = 8,
    per_prompt: bool = False,
    progress: bool = True,
) -> Float[Tensor, "layer"] | Float[Tensor, "layer batch"]:
    """metric(clean with decoder hook `hook` (a short kind such as "resid_pre" / "resid_post") of layer l at the
    final token (or `positions`) taken from the corrupt (counterfactual) run at its final token (or
    `corrupt_positions`)), for each layer l; on the sweep engine."""
    names = [act_name(hook, l) for l in range(model.cfg.n_layers)]
    positions = model.layout(clean).final_token() if positions is None else positions
    if corrupt_positions is None:
        corrupt_positions = model.layout(corrupt).final_token()
    _, cf = run_cached(model, corrupt, names)
    out = transplant_sweep(model, clean, cf, [(n, None) for n in names], metric, positions=positions,
                           source_positions=corrupt_positions, batch_size=batch_size, progress=progress)
    return out if per_prompt else out.mean(-1)


# ------------------------------------------------------------------------------------------- strip swaps
def strip_mask(layout: Any, axis: str, index: int, image: int = 0, crop: int = 0) -> Bool[Tensor, "batch pos"]:
    """Image tokens of one row (axis="row") or column (axis="col") of the image grid."""
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    grid = getattr(layout, axis)
    return layout.image_positions(image) & (layout.crop == crop) & (grid == index)


def _swap_view(x: Tensor, ma: Tensor, mb: Tensor) -> Tensor:
    return transplant(transplant(x, x, ma, mb), x, mb, ma)


def _swap_edit(hook_name: str, ma: Tensor, mb: Tensor, layout: Any) -> Callable[[Tensor, int], Tensor]:
    def fn(act: Tensor, first: int) -> Tensor:
        if first:  # a resumed decoder hook: [batch, pos - first, ...]
            return _swap_view(act, ma[:, first:], mb[:, first:])
        seq, back = as_sequence(act, layout)
        return back(_swap_view(seq, ma, mb))

    return fn


@torch.no_grad()
def _edit_sweep(
    model: "HookedVLM", inputs: Inputs, hook_name: str, edits: Sequence[tuple[Tensor, Tensor]], metric: Metric,
    batch_size: int, progress: bool = True,
) -> Float[Tensor, "n_edits batch"]:
    """metric after swapping the positions of mask a with those of mask b (in order) at hook_name, one pair per
    site of the sweep engine (decoder hooks resume at the first swapped position)."""
    layout = model.layout(inputs)
    layer = decoder_layer(hook_name)
    sites = [Site([(hook_name, _swap_edit(hook_name, ma, mb, layout))],
                  None if layer is None else (layer, min(first_position(ma), first_position(mb))), label=k)
             for k, (ma, mb) in enumerate(edits)]
    values, _ = run_sites(model, inputs, metric, sites, batch_size=batch_size, progress=progress, desc="strip swaps")
    return values


@torch.no_grad()
def swap_strips(
    model: "HookedVLM", inputs: dict[str, Any], axis: str, a: int, b: int, metric: Metric | None = None,
    hook_name: str = "hook_embed", image: int = 0, crop: int = 0,
) -> Tensor:
    """Run with the image features of rows (or columns) a and b swapped at hook_name (default hook_embed: the
    projector output in the sequence). Returns logits, or metric(logits)."""
    layout = model.layout(inputs)
    ma, mb = strip_mask(layout, axis, a, image, crop), strip_mask(layout, axis, b, image, crop)

    def hook(x: Tensor, hook: Any) -> Tensor:
        seq, back = as_sequence(x, layout)
        return back(_swap_view(seq, ma, mb))

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        logits = model(**inputs)
    return logits if metric is None else metric(logits)


@torch.no_grad()
def strip_swap_matrix(
    model: "HookedVLM", inputs: dict[str, Any], metric: Metric, axis: str = "row", hook_name: str = "hook_embed",
    image: int = 0, crop: int = 0, batch_size: int = 8, progress: bool = True,
) -> Float[Tensor, "n n"]:
    """Mean metric change (swapped - clean) for every pair of rows (or columns); symmetric, zero diagonal."""
    layout = model.layout(inputs)
    grid = getattr(layout, axis)[layout.image_positions(image) & (layout.crop == crop)]
    n = int(grid.max()) + 1
    check_batch_size(batch_size)
    base = metric_values(metric, model(**inputs))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edits = [(strip_mask(layout, axis, i, image, crop), strip_mask(layout, axis, j, image, crop)) for i, j in pairs]
    vals = _edit_sweep(model, inputs, hook_name, edits, metric, batch_size, progress) if pairs else torch.empty(0, len(base))
    out = torch.zeros(n, n)
    for (i, j), v in zip(pairs, vals):
        out[i, j] = out[j, i] = (v - base).mean()
    return out


# ------------------------------------------------------------------------------------------- amplification
def random_directions(k: int, d: int, seed: int = 0) -> Float[Tensor, "k d"]:
    r = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return r / r.norm(dim=-1, keepdim=True)


def amplification(
    h: Float[Tensor, "*rows d"], directions: Float[Tensor, "k d"], alpha: float | int, control_seed: int | None = None
) -> Float[Tensor, "*rows d"]:
    """The vector `amplify` adds: alpha * sum_k (h . u_k) u_k with u_k the unit directions; with control_seed,
    the same sum over k random unit directions, rescaled to that vector's norm row by row."""
    h = h.float()
    u = directions.float().to(h.device)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    add = alpha * (h @ u.T) @ u
    if control_seed is None:
        return add
    r = random_directions(u.shape[0], u.shape[1], control_seed).to(h.device)
    rand = (h @ r.T) @ r
    return rand / rand.norm(dim=-1, keepdim=True).clamp_min(1e-12) * add.norm(dim=-1, keepdim=True)


@torch.no_grad()
def amplify(
    model: "HookedVLM",
    inputs: dict[str, Any],
    directions: Float[Tensor, "k d_model"],
    alpha: float | int,
    metric: Metric | None = None,
    hook_name: str = "blocks.0.hook_resid_pre",
    positions: Bool[Tensor, "batch pos"] | None = None,
    control_seed: int | None = None,
) -> Tensor:
    """h += `amplification(h, directions, alpha, control_seed)` at `positions` (default the image tokens) of
    hook_name (default decoder layer 0's input). Returns logits or metric(logits)."""
    layout = model.layout(inputs)
    positions = layout.image_positions() if positions is None else positions

    def hook(x: Tensor, hook: Any) -> Tensor:
        seq, back = as_sequence(x, layout)
        new = (seq.float() + amplification(seq, directions, alpha, control_seed)).to(seq.dtype)
        return back(torch.where(positions.to(seq.device)[..., None], new, seq))

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        logits = model(**inputs)
    return logits if metric is None else metric(logits)


# ------------------------------------------------------------------------------------------------ plots
def plot_probe_accuracy(acc: dict[str, Any], title: str = "Probe accuracy",
                        chance: float | int | None = None) -> go.Figure:
    """Test accuracy per hook ({hook: acc}) or several series ({series: {hook: acc}}), e.g. per layer."""
    series = acc if acc and isinstance(next(iter(acc.values())), dict) else {"test": acc}
    fig = go.Figure([go.Scatter(x=list(s), y=[float(v) for v in s.values()], mode="lines+markers", name=k)
                     for k, s in series.items()])
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(title=title, xaxis_title="hook", yaxis_title="accuracy", yaxis_range=[0, 1.02])
    return fig


def plot_layer_patching(values: Float[Tensor, "layer"], title: str = "Last-token patching",
                        ylabel: str = "metric") -> go.Figure:
    v = values.detach().float().cpu().tolist()
    fig = go.Figure(go.Scatter(x=list(range(len(v))), y=v, mode="lines+markers"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=ylabel)
    return fig


def plot_strip_swaps(matrix: Float[Tensor, "n n"], axis: str = "row", title: str | None = None) -> go.Figure:
    m = matrix.detach().float().cpu()
    lim = float(m.abs().max()) or 1.0
    labels = [f"{axis} {i}" for i in range(m.shape[0])]
    fig = go.Figure(go.Heatmap(z=m.tolist(), x=labels, y=labels, colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                               colorbar=dict(title="metric change")))
    fig.update_layout(title=title or f"Strip swaps ({axis}s)", yaxis_autorange="reversed")
    return fig


def plot_amplification(alphas: Sequence[Any], probe: Sequence[Any], control: Sequence[Any] | None = None,
                       title: str = "Amplification at layer 0", ylabel: str = "metric") -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(alphas), y=[float(v) for v in probe], mode="lines+markers", name="probe"))
    if control is not None:
        fig.add_trace(go.Scatter(x=list(alphas), y=[float(v) for v in control], mode="lines+markers",
                                 name="random (same norm)"))
    fig.update_layout(title=title, xaxis_title="alpha", yaxis_title=ylabel)
    return fig


def plot_estimates(series: dict[str, dict[str, Any]], title: str, ylabel: str = "rate",
                   chance: float | int | None = None) -> go.Figure:
    """Lines with 95% interval bars: {series: {x label: Estimate or {"value", "ci_low", "ci_high", ...}}}."""
    fig = go.Figure()
    for name, pts in series.items():
        d = [p.to_dict() if hasattr(p, "to_dict") else p for p in pts.values()]
        fig.add_trace(go.Scatter(x=list(pts), y=[p["value"] for p in d], mode="lines+markers", name=name,
                                 error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["value"] for p in d],
                                              arrayminus=[p["value"] - p["ci_low"] for p in d])))
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(title=title, yaxis_title=ylabel, yaxis_range=[0, 1.05])
    return fig


# ------------------------------------------------------------------------- the paper's protocols (defaults)
# imported last: these modules build on the helpers above
from .spatial_probes import (AbsRelResult, PositionProbeResult, absolute_vs_relative, object_masks,  # noqa: E402
                             pixel_boxes_to_fractions, position_labels, position_probe, position_probes, train_probe)
from .criss_cross import (CrissCrossResult, VisionAblationResult, criss_cross, criss_cross_pairs,  # noqa: E402
                          default_sites, regions, vision_ablation)
from .spatial_amplify import (AmplificationResult, amplification_protocol, amplify_columns,  # noqa: E402
                              column_projection, random_columns)
