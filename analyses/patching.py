"""Activation patching over any hook, batched through the batch dimension.

Activation patching (causal tracing; Meng et al. 2022, Wang et al. 2022 "IOI"; the protocol of all four binding
papers in ../../shared/papers) runs the model on one input while overwriting an activation with its value from
another input, and measures how a metric moves:

* ``direction="denoise"`` (default): run the *corrupt* inputs, patch in *clean* activations. A site that
  restores the clean behaviour carries information the corruption destroyed (sufficiency).
* ``direction="noise"``: run the *clean* inputs, patch in *corrupt* activations. A site that breaks the clean
  behaviour is necessary.

Counterfactuals may change the text (same token count) or only the pixels (image counterfactual: same
input_ids, different ``pixel_values``): any two input dicts whose patched activations have equal shapes work.

A *site* is ``(hook name, positions, heads)``: a hook name (or short kind, see `analyses.toolkit.hooks`), a position
set (any form `toolkit.as_positions` reads; None = every position; for vision hooks a mask over the activation's leading
dims, e.g. [n_img, patch]; for `projector.hook_out`, [n_image_tokens, d] in reading order, the rows: e.g.
``layout.in_box(...)[layout.is_image]``) and a head index or indices (None = all heads; only for
q/k/v/z/result/pattern hooks). Patching a site replaces exactly those entries of the activation.

Batching and prefix reuse come from the sweep engine (`analyses.toolkit.sweep`): n sites cost one forward of
batch n*B (``batch_size`` bounds n), decoder sites resume from one saved target run at their (layer, position),
and chunks are planned by a cost model. Results equal the one-forward-per-site loop up to float round-off
(tested to 1e-5).

Every sweep returns a `SweepResult`: metric values (mean over prompts, or per prompt with the batch as the last
axis), and the clean and corrupt baselines, so ``result.normalized()`` gives
(value - corrupt) / (clean - corrupt): 1 = clean behaviour, 0 = corrupt behaviour.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .toolkit.inputs import check_direction, check_pair
from .toolkit import (
    Metric,
    Site,
    SweepResult,
    as_positions,
    check_hook,
    hook_template,
    n_heads_of,
    patch_edit,
    resolve_layers,
    resume_start,
    run_cached,
    run_sites,
    site_mask,
)
from .toolkit.positions import PositionSpec, indices
from .toolkit.metric import metric_values
from .toolkit.sweep import position_axis

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Inputs = dict[str, Any]


def _as_site(site: Any) -> tuple[str, Any, Any]:
    if isinstance(site, str):
        return site, None, None
    site = tuple(site)
    if not 1 <= len(site) <= 3:
        raise ValueError(f"a site is (hook, positions, heads); got {len(site)} fields")
    return tuple(site) + (None,) * (3 - len(site))  # type: ignore[return-value]


@torch.no_grad()
def patch_sweep(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    sites: Sequence[Any],
    direction: str = "denoise",
    batch_size: int = 16,
    per_prompt: bool = False,
    device: str | torch.device | None = None,
    alpha: float | int = 1.0,
    progress: bool = True,
    desc: str | None = None,
    reuse_prefix: bool = True,
) -> SweepResult:
    """Patch each site in turn and evaluate `metric`.

    model:          a HookedVLM (any family).
    clean, corrupt: model input dicts with the same batch size B (and, for decoder hooks, the same sequence
                    length).
    metric:         logits [B, pos, vocab] -> [B] (see analyses.metrics); always called on B prompts, checked.
    sites:          (hook, positions, heads) tuples or bare hook names; see the module docstring.
    direction:      "denoise" (run corrupt, patch clean) or "noise" (run clean, patch corrupt).
    batch_size:     sites per forward (the forward batch is at most batch_size * B).
    per_prompt:     keep the prompt axis: scores [n_sites, B], baselines [B]; else means over prompts.
    device:         where the cached source activations live (e.g. "cpu" to save accelerator memory).
    alpha:          interpolation: the patched value is ``act + alpha * (source - act)``; 1 (default) replaces
                    the activation exactly. Small alphas give finite differences (see analyses.attribution).
    reuse_prefix:   for decoder sites (``blocks.{l}.*``) rerun only blocks l.. at positions p0.. from one saved
                    target run (`analyses.toolkit.sweep`, chunks planned by its cost model). False reruns the
                    whole model for every chunk.

    Returns a SweepResult with scores [n_sites] (or [n_sites, B]).
    """
    check_direction(direction)
    sites = [_as_site(s) for s in sites]
    if not sites:
        raise ValueError("patch_sweep: no sites given")
    names = sorted({hook_template(s[0]) for s in sites})
    for name in names:
        check_hook(model, name)
    check_pair(clean, corrupt, names)
    source_inputs, target_inputs = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    _, sources = run_cached(model, source_inputs, names, device=device, missing="warn")
    combine = None if alpha == 1.0 else (lambda src, act: act + alpha * (src - act))
    b = int(target_inputs["input_ids"].shape[0])
    engine_sites = []
    for hook, positions, heads in sites:
        name = hook_template(hook)
        if name not in sources:  # e.g. vision blocks past the feature layer: never run, so nothing to patch
            engine_sites.append(Site([], None, label=(hook, positions, heads)))
            continue
        shape = sources[name].shape
        axis = position_axis(name)
        if len(shape) == 2:  # rows [n, d] (projector.hook_out: one per image token, reading order): positions = rows
            n_pos, n_batch = shape[0], None
        else:
            n_pos, n_batch = (shape[axis], shape[0]) if len(shape) > axis else (shape[0], None)
        mask = site_mask(name, shape, as_positions(positions, n_pos, n_batch), heads)
        engine_sites.append(Site([(name, patch_edit(name, sources[name], mask, combine))], resume_start(name, mask),
                                 like={name: tuple(shape)}, label=(hook, positions, heads)))
    scores, target = run_sites(model, target_inputs, metric, engine_sites, batch_size=batch_size, progress=progress,
                               desc=desc or f"patching ({direction})", reuse_prefix=reuse_prefix)
    # the source baseline from a plain forward: caching some hooks (hook_pattern, hook_result) switches attention
    # to its explicit path, which agrees with the fused one only to round-off
    source = metric_values(metric, model(**source_inputs))
    clean_v, corrupt_v = (source, target) if direction == "denoise" else (target, source)
    if not per_prompt:
        scores, clean_v, corrupt_v = scores.mean(-1), clean_v.mean(), corrupt_v.mean()
    return SweepResult(scores, clean_v, corrupt_v, direction, ("site",), {"site": [s.label for s in engine_sites]})


def _reshape(res: SweepResult, shape: tuple[int, ...], dims: tuple[str, ...], labels: dict[str, Any]) -> SweepResult:
    extra = res.scores.shape[1:]
    return SweepResult(res.scores.reshape(shape + tuple(extra)), res.clean, res.corrupt, res.direction, dims, labels)


def _columns(positions: Any, n_pos: int) -> list[int]:
    """Which sequence positions to sweep: None = all; ints; or a bool mask [pos] / [batch, pos] (any prompt)."""
    if positions is None:
        return list(range(n_pos))
    return indices(as_positions(positions, n_pos))


def patch_resid_by_layer_and_position(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    positions: "PositionSpec" = None,
    **kwargs: Any,
) -> SweepResult:
    """Patch one (layer, position) at a time: the classic causal-tracing heatmap.

    hook:      "resid_pre" / "resid_mid" / "resid_post" / "attn_out" / "mlp_out" or any ``{layer}`` template
               with [batch, pos, ...] activations (e.g. "vision.blocks.{layer}.hook_resid_post", positions then
               being patch indices of every image).
    layers:    which layers (default all the hook has).
    positions: which sequence positions to sweep (None = all; ints; bool [pos] or [batch, pos] -> any prompt).
               Position p is patched at index p in every prompt, so prompts should share a layout.
    kwargs:    direction, batch_size, per_prompt, device, progress (see `patch_sweep`).

    Returns scores [n_layers, pos] (all positions of the sequence; NaN where not swept), [.., B] per prompt;
    labels["layer"] lists the layer indices.
    """
    template = hook_template(hook)
    layer_ids = resolve_layers(model, template, layers)
    n_pos = _seq_len(model, clean, template.format(layer=layer_ids[0]))
    cols = _columns(positions, n_pos)
    sites = []
    for layer in layer_ids:
        for p in cols:
            sites.append((template.format(layer=layer), [p], None))
    res = patch_sweep(model, clean, corrupt, metric, sites=sites, desc=f"patching {hook} x position", **kwargs)
    extra = tuple(res.scores.shape[1:])
    full = torch.full((len(layer_ids), n_pos) + extra, math.nan, dtype=res.scores.dtype)
    full[:, cols] = res.scores.reshape((len(layer_ids), len(cols)) + extra)
    return SweepResult(full, res.clean, res.corrupt, res.direction, ("layer", "pos"),
                       {"layer": layer_ids, "pos": list(range(n_pos)), "swept": cols, "hook": template})


def _seq_len(model: "HookedVLM", inputs: dict[str, Any], name: str) -> int:
    """Length of the position axis of hook `name` (the decoder's sequence, or a vision tower's patch axis)."""
    if not name.startswith("vision.") and not name.startswith("projector."):
        return int(inputs["input_ids"].shape[1])
    _, cache = run_cached(model, inputs, [name])
    return int(cache[name].shape[1])


def patch_by_layer(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    positions: "PositionSpec" = None,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    heads: Any = None,
    **kwargs: Any,
) -> SweepResult:
    """Patch a whole position set (e.g. ``layout.final_token()`` or ``layout.image_positions()``; None = every
    position) at one layer at a time.

    hook: short kind or ``{layer}`` template (decoder, vision tower ``"vision.blocks.{layer}.hook_resid_post"``...).
    heads: optionally restrict to these heads (head hooks only).
    Returns scores [n_layers] ([n_layers, B] per prompt); labels["layer"] lists the layers.
    """
    template = hook_template(hook)
    layer_ids = resolve_layers(model, template, layers)
    sites = [(template.format(layer=layer), positions, heads) for layer in layer_ids]
    res = patch_sweep(model, clean, corrupt, metric, sites=sites, desc=f"patching {hook} by layer", **kwargs)
    return _reshape(res, (len(layer_ids),), ("layer",), {"layer": layer_ids, "hook": template})


def patch_heads(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    positions: "PositionSpec" = None,
    hook: str = "z",
    layers: int | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Patch one attention head's output at a time (Wang et al. 2022; the head scores of Assouel et al. 2025).

    hook:      "z" (default, [batch, pos, head, d_head]), "result", "q", "k"/"v" (per key/value head), "pattern",
               or a ``{layer}`` template of such a hook (e.g. "vision.blocks.{layer}.attn.hook_z").
    positions: where to patch (e.g. ``layout.final_token()``; None = every position).
    heads:     which heads (default all of that hook's heads, read from the attention module).
    Returns scores [n_layers, n_heads] ([.., B] per prompt); labels["layer"], labels["head"].
    """
    template = hook_template(hook)
    layer_ids = resolve_layers(model, template, layers)
    n_heads = n_heads_of(model, template.format(layer=layer_ids[0]))
    head_ids = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    sites = [(template.format(layer=layer), positions, h) for layer in layer_ids for h in head_ids]
    res = patch_sweep(model, clean, corrupt, metric, sites=sites, desc=f"patching heads ({hook})", **kwargs)
    return _reshape(res, (len(layer_ids), len(head_ids)), ("layer", "head"),
                    {"layer": layer_ids, "head": head_ids, "hook": template})


def plot_patching(result: SweepResult, layout: Any = None, normalized: bool = True, **kwargs: Any):
    """Plotly figure for a sweep: [layer, pos] -> `plots.plot_layer_position` (needs `layout`), [layer, head] ->
    `plots.plot_heads`, [layer] -> a line over layers. Per-prompt results are averaged over prompts first."""
    from . import plots

    scores = result.normalized() if normalized else result.scores
    n_axes = len(result.dims)
    if scores.ndim > n_axes:
        scores = scores.nanmean(-1) if scores.is_floating_point() else scores.float().mean(-1)
    title = kwargs.pop("title", None) or f"{result.direction} patching ({'normalized' if normalized else 'metric'})"
    if result.dims == ("layer", "pos"):
        if layout is None:
            raise ValueError("a [layer, pos] heatmap needs the TokenLayout for its hover text")
        return plots.plot_layer_position(scores, layout, title=title, layers=result.labels.get("layer"), **kwargs)
    if result.dims == ("layer", "head"):
        return plots.plot_heads(scores, title=title, layers=result.labels.get("layer"), heads=result.labels.get("head"))
    if result.dims == ("layer",):
        return plots.plot_by_layer(scores, title=title, layers=result.labels.get("layer"))
    raise ValueError(f"no standard plot for a sweep with axes {result.dims}")
