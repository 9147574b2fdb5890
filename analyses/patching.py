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

A *site* is ``(hook name, positions, heads)``: a hook name (or short kind, see `analyses._hooks`), a position
mask (bool [batch, pos] or [pos]; None = every position; for vision hooks a mask over the activation's leading
dims, e.g. [n_img, patch]) and a head index or indices (None = all heads; only for q/k/v/z/result/pattern
hooks). Patching a site replaces exactly those entries of the activation.

Batching: the target inputs are repeated n times (`hooked_vlm.batching.repeat_inputs`), and slot j of the
repeated batch gets site j's patch, so n sites cost one forward of batch n*B. ``batch_size`` bounds n. Results
equal the one-forward-per-site loop (``batch_size=1``) up to float round-off (tested to 1e-5).

Every sweep returns a `PatchResult`: metric values (mean over prompts, or per prompt with the batch as the last
axis), and the clean and corrupt baselines, so ``result.normalized()`` gives
(value - corrupt) / (clean - corrupt): 1 = clean behaviour, 0 = corrupt behaviour.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from hooked_vlm.batching import repeat_inputs
from hooked_vlm.resume import capture, resume, safe_start

from ._progress import progress_bar
from ._hooks import (
    HEAD_FIRST,
    as_float,
    as_position_mask,
    check_hook,
    hook_template,
    metric_per_slot,
    n_heads_of,
    resolve_layers,
    site_mask,
    slot_patch_hooks,
)
from .metrics import normalized_score

Metric = Callable[[Tensor], Tensor]
DIRECTIONS = ("denoise", "noise")


@dataclass
class PatchResult:
    """Metric values of a patching sweep.

    scores:   the sweep's shape (e.g. [n_sites], [layer, pos], [layer], [layer, head]); with ``per_prompt`` a
              trailing batch axis is added. NaN marks entries that were not evaluated.
    clean:    metric on the clean run (scalar, or [batch] per prompt).
    corrupt:  metric on the corrupt run (scalar, or [batch] per prompt).
    direction: "denoise" or "noise".
    dims:     axis names of `scores`; `labels` holds what each axis enumerates (layers, positions, heads, sites).
    """

    scores: Tensor
    clean: Tensor
    corrupt: Tensor
    direction: str
    dims: tuple[str, ...] = ()
    labels: dict[str, Any] = field(default_factory=dict)

    def normalized(self) -> Tensor:
        """(scores - corrupt) / (clean - corrupt), broadcast per prompt when per-prompt."""
        return normalized_score(self.scores, self.clean, self.corrupt)

    def effect(self) -> Tensor:
        """scores minus the unpatched run's value (corrupt for denoising, clean for noising)."""
        return self.scores - (self.corrupt if self.direction == "denoise" else self.clean)


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _as_site(site: Any) -> tuple[str, Any, Any]:
    if isinstance(site, str):
        return site, None, None
    site = tuple(site)
    if not 1 <= len(site) <= 3:
        raise ValueError(f"a site is (hook, positions, heads); got {len(site)} fields")
    return tuple(site) + (None,) * (3 - len(site))  # type: ignore[return-value]


@torch.no_grad()
def patch_sweep(
    model: Any,
    clean_inputs: dict[str, Any],
    corrupt_inputs: dict[str, Any],
    metric: Metric,
    sites: Sequence[Any],
    *,
    direction: str = "denoise",
    batch_size: int = 16,
    per_prompt: bool = False,
    device: str | torch.device | None = None,
    alpha: float | int = 1.0,
    progress: bool = True,
    desc: str | None = None,
    reuse_prefix: bool = True,
) -> PatchResult:
    """Patch each site in turn and evaluate `metric`.

    model:          a HookedVLM (any family).
    clean_inputs, corrupt_inputs: model input dicts with the same batch size B (and, for decoder hooks, the same
                    sequence length).
    metric:         logits [B, pos, vocab] -> [B] (see analyses.metrics); always called on B prompts.
    sites:          (hook, positions, heads) tuples or bare hook names; see the module docstring.
    direction:      "denoise" (run corrupt, patch clean) or "noise" (run clean, patch corrupt).
    batch_size:     sites per forward (the forward batch is batch_size * B).
    per_prompt:     keep the prompt axis: scores [n_sites, B], baselines [B]; else means over prompts.
    device:         where the cached source activations live (e.g. "cpu" to save accelerator memory).
    alpha:          interpolation: the patched value is ``act + alpha * (source - act)``; 1 (default) replaces
                    the activation exactly. Small alphas give finite differences (see analyses.attribution).
    reuse_prefix:   for decoder sites (``blocks.{l}.*``) rerun only blocks l.. at positions p0.. (p0 = the
                    earliest patched position) from one saved target run (`hooked_vlm.resume`): no vision tower,
                    no earlier layers or positions. Equal to full forwards up to float round-off. False reruns
                    the whole model for every chunk.

    Returns a PatchResult with scores [n_sites] (or [n_sites, B]).
    """
    _check_direction(direction)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sites = [_as_site(s) for s in sites]
    names = sorted({hook_template(s[0]) for s in sites})
    for name in names:
        check_hook(model, name)
    source_inputs, target_inputs = (clean_inputs, corrupt_inputs) if direction == "denoise" else (corrupt_inputs, clean_inputs)
    _, cache = model.run_with_cache(**source_inputs, names_filter=names, device=device)
    sources = {name: cache[name] for name in names if name in cache.cache_dict}
    del cache
    missing = sorted(set(names) - set(sources))
    if missing:  # e.g. vision blocks deeper than the feature layer: they never run, so patching them does nothing
        warnings.warn(f"hooks {missing} did not run in the forward pass; patching them has no effect", stacklevel=2)
    slots = []
    for hook, positions, heads in sites:
        name = hook_template(hook)
        if name not in sources:
            slots.append((None, None))
            continue
        shape = sources[name].shape
        pos_dim = 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1
        n_pos = shape[pos_dim] if len(shape) > pos_dim else shape[0]
        slots.append((name, site_mask(name, shape, as_position_mask(positions, n_pos), heads)))
    combine = None if alpha == 1.0 else (lambda src, act: act + alpha * (src - act))
    plan = _plan_chunks(model, slots, batch_size, reuse_prefix)
    saved = capture(model, target_inputs) if any(start is not None for start, _ in plan) else None
    # baselines from plain forwards (the saved run is one, bit for bit): caching some hooks (hook_pattern,
    # hook_result) switches attention to its explicit path, which agrees with the fused one only to round-off
    target = as_float(metric(saved.logits if saved is not None else model(**target_inputs)))
    source = as_float(metric(model(**source_inputs)))
    clean, corrupt = (source, target) if direction == "denoise" else (target, source)
    values: list[Tensor | None] = [None] * len(slots)
    bar = progress_bar(total=len(slots), desc=desc or f"patching ({direction})", progress=progress)
    try:
        for start, idx in plan:
            chunk = [slots[i] for i in idx]
            if start is None:
                with model.hooks(fwd_hooks=slot_patch_hooks(sources, chunk, combine)):
                    out = model(**repeat_inputs(target_inputs, len(chunk)))
            else:
                layer, pos = start
                pos = safe_start(saved, pos)  # an image attending bidirectionally is recomputed whole
                sliced = {name: _from_position(name, sources[name], pos) for name, _ in chunk}
                chunk = [(name, None if m is None else _from_position(name, m, pos)) for name, m in chunk]
                with model.hooks(fwd_hooks=slot_patch_hooks(sliced, chunk, combine)):
                    out = resume(model, saved, layer, pos, len(chunk))
            for i, v in zip(idx, metric_per_slot(metric, out, len(chunk))):
                values[i] = v
            del out
            bar.update(len(chunk))
    finally:
        bar.close()
    scores = torch.stack(values) if values else torch.empty(0, int(clean.shape[0]))
    if not per_prompt:
        scores, clean, corrupt = scores.mean(-1), clean.mean(), corrupt.mean()
    return PatchResult(scores, clean, corrupt, direction, ("site",), {"site": [(h, p, hd) for h, p, hd in sites]})


def _position_axis(name: str) -> int:
    return 2 if name.rsplit(".", 1)[-1] in HEAD_FIRST else 1  # pattern / scores: the query axis


def _resume_point(name: str | None, mask: Tensor | None) -> tuple[int, int] | None:
    """(layer, earliest patched position) for a decoder-block site, None for other sites (full forward)."""
    m = re.fullmatch(r"blocks\.(\d+)\..+", name or "")
    if m is None:
        return None
    axis = _position_axis(name)
    if mask is None or mask.ndim <= axis or mask.shape[axis] == 1:
        return int(m.group(1)), 0
    hit = mask.movedim(axis, 0).reshape(mask.shape[axis], -1).any(-1).nonzero()
    return int(m.group(1)), int(hit[0]) if len(hit) else 0


def _plan_chunks(model: Any, slots: list, batch_size: int, reuse_prefix: bool) -> list[tuple[Any, list[int]]]:
    """Chunks of slot indices, each with its resume point (min layer, min position) or None (full forward).
    Resumable slots are sorted by (layer, position), so a chunk's slots share a layer and neighbouring positions
    (a chunk mixing layers would restart every slot at its lowest layer)."""
    points = [_resume_point(name, mask) if reuse_prefix else None for name, mask in slots]
    full = [i for i, p in enumerate(points) if p is None]
    late = sorted((i for i, p in enumerate(points) if p is not None), key=lambda i: points[i])
    plan: list[tuple[Any, list[int]]] = []
    for group, resumable in ((full, False), (late, True)):
        for k in range(0, len(group), batch_size):
            idx = group[k : k + batch_size]
            start = (min(points[i][0] for i in idx), min(points[i][1] for i in idx)) if resumable else None
            plan.append((start, idx))
    return plan


def _from_position(name: str, t: Tensor, pos: int) -> Tensor:
    """`t` (an activation of hook `name`, or a broadcastable mask) from sequence position `pos` on."""
    axis = _position_axis(name)
    return t if pos == 0 or t.ndim <= axis or t.shape[axis] == 1 else t.narrow(axis, pos, t.shape[axis] - pos)


def _reshape(res: PatchResult, shape: tuple[int, ...], dims: tuple[str, ...], labels: dict[str, Any]) -> PatchResult:
    extra = res.scores.shape[1:]
    return PatchResult(res.scores.reshape(shape + tuple(extra)), res.clean, res.corrupt, res.direction, dims, labels)


def _columns(positions: Any, n_pos: int) -> list[int]:
    """Which sequence positions to sweep: None = all; ints; or a bool mask [pos] / [batch, pos] (any prompt)."""
    if positions is None:
        return list(range(n_pos))
    mask = as_position_mask(positions, n_pos)
    if mask.ndim == 2:
        mask = mask.any(0)
    if mask.shape != (n_pos,):
        raise ValueError(f"positions mask {tuple(mask.shape)} does not match the sequence length {n_pos}")
    return mask.nonzero().flatten().tolist()


def patch_resid_by_layer_and_position(
    model: Any,
    clean_inputs: dict[str, Any],
    corrupt_inputs: dict[str, Any],
    metric: Metric,
    *,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    positions: Any = None,
    **kwargs: Any,
) -> PatchResult:
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
    n_pos = _seq_len(model, clean_inputs, template.format(layer=layer_ids[0]))
    cols = _columns(positions, n_pos)
    sites = []
    for layer in layer_ids:
        for p in cols:
            sites.append((template.format(layer=layer), [p], None))
    res = patch_sweep(model, clean_inputs, corrupt_inputs, metric, sites, desc=f"patching {hook} x position", **kwargs)
    extra = tuple(res.scores.shape[1:])
    full = torch.full((len(layer_ids), n_pos) + extra, math.nan, dtype=res.scores.dtype)
    full[:, cols] = res.scores.reshape((len(layer_ids), len(cols)) + extra)
    return PatchResult(full, res.clean, res.corrupt, res.direction, ("layer", "pos"),
                       {"layer": layer_ids, "pos": list(range(n_pos)), "swept": cols, "hook": template})


def _seq_len(model: Any, inputs: dict[str, Any], name: str) -> int:
    """Length of the position axis of hook `name` (the decoder's sequence, or a vision tower's patch axis)."""
    if not name.startswith("vision.") and not name.startswith("projector."):
        return int(inputs["input_ids"].shape[1])
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=[name])
    return int(cache[name].shape[1])


def patch_by_layer(
    model: Any,
    clean_inputs: dict[str, Any],
    corrupt_inputs: dict[str, Any],
    metric: Metric,
    *,
    positions: Any = None,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    heads: Any = None,
    **kwargs: Any,
) -> PatchResult:
    """Patch a whole position set (e.g. ``layout.final_token()`` or ``layout.image_positions()``; None = every
    position) at one layer at a time.

    hook: short kind or ``{layer}`` template (decoder, vision tower ``"vision.blocks.{layer}.hook_resid_post"``...).
    heads: optionally restrict to these heads (head hooks only).
    Returns scores [n_layers] ([n_layers, B] per prompt); labels["layer"] lists the layers.
    """
    template = hook_template(hook)
    layer_ids = resolve_layers(model, template, layers)
    sites = [(template.format(layer=layer), positions, heads) for layer in layer_ids]
    res = patch_sweep(model, clean_inputs, corrupt_inputs, metric, sites, desc=f"patching {hook} by layer", **kwargs)
    return _reshape(res, (len(layer_ids),), ("layer",), {"layer": layer_ids, "hook": template})


def patch_heads(
    model: Any,
    clean_inputs: dict[str, Any],
    corrupt_inputs: dict[str, Any],
    metric: Metric,
    *,
    positions: Any = None,
    hook: str = "z",
    layers: int | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    **kwargs: Any,
) -> PatchResult:
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
    res = patch_sweep(model, clean_inputs, corrupt_inputs, metric, sites, desc=f"patching heads ({hook})", **kwargs)
    return _reshape(res, (len(layer_ids), len(head_ids)), ("layer", "head"),
                    {"layer": layer_ids, "head": head_ids, "hook": template})


def plot_patching(result: PatchResult, layout: Any = None, normalized: bool = True, **kwargs: Any):
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
