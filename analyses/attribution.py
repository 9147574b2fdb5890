"""Attribution patching: a first-order (linear) estimate of activation patching from two forwards and one backward.

Nanda 2023 ("Attribution patching: activation patching at industrial scale"), Syed et al. 2023 (arXiv
2310.10348). For a metric M and an activation a, patching a from its corrupt value a* to its clean value a is
approximated by the first-order Taylor expansion around the corrupt run:

    M(corrupt with a := a_clean) - M(corrupt)  ~=  (a_clean - a_corrupt) . dM/da |_corrupt

so one clean forward (cache), one corrupt forward (cache, with the graph kept) and one backward give the estimate
for every layer, position and head at once. ``direction="noise"`` expands around the clean run instead:
M(clean with a := a_corrupt) - M(clean) ~= (a_corrupt - a_clean) . dM/da |_clean.

The estimates are *differences* from the unpatched run (the corrupt metric for denoising, the clean metric for
noising), comparable to `PatchResult.effect()`. They are exact for small activation differences (tested against a
finite difference) and only a guide for large ones (e.g. a whole residual stream at layer 0).

Per-prompt gradients come from one backward of the summed metric: prompts in a batch never interact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .toolkit.hooks import HEAD_FIRST, HEAD_THIRD, check_hook, frozen_parameters, hook_template, resolve_layers
from .toolkit.metric import as_float, check_metric_output, metric_values
from .toolkit.inputs import DIRECTIONS
from .toolkit import Metric
from .completeness import Completeness

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM



@dataclass
class AttributionResult:
    """Attribution-patching estimates.

    scores: {hook kind: tensor}. For a ``{layer}`` hook without heads: [layer, pos] (summed over the model
            dimension); for head hooks (z, result, q, k, v): [layer, head] summed over the chosen positions, and
            under "<kind>_by_pos" the unsummed [layer, pos, head]; for a plain hook name (e.g.
            "projector.hook_out"): [pos]. With ``per_prompt`` a trailing batch axis is added, else prompts are
            averaged.
    clean, corrupt: metric baselines (scalars, or [batch] per prompt).
    completeness: {kind: Completeness} for the decoder's residual-stream kinds (resid_pre / resid_mid /
            resid_post): each layer's residual is a cut, so its scores summed over positions estimate the whole
            clean-corrupt gap (clean - corrupt denoising, corrupt - clean noising); estimate and total [layer, batch]
            (NaN on DeepStack models at layers before the last image addition). See `analyses.completeness`.
    """

    scores: dict[str, Tensor]
    clean: Tensor
    corrupt: Tensor
    direction: str
    labels: dict[str, Any] = field(default_factory=dict)
    completeness: dict[str, Completeness] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.scores[key]

    def normalized(self, key: str) -> Tensor:
        """Estimate / (clean - corrupt): the estimated fraction of the clean-corrupt gap a patch closes (denoising;
        comparable to PatchResult.normalized()) or, negated, opens (noising; comparable to normalized() - 1)."""
        return self.scores[key] / (self.clean - self.corrupt)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _names(model: "HookedVLM", hooks: Sequence[str], layers: Any) -> dict[str, list[str]]:
    """kind -> hook names (one per layer, or one for a plain hook name)."""
    out: dict[str, list[str]] = {}
    for kind in hooks:
        template = hook_template(kind)
        if "{layer}" in template:
            out[kind] = [template.format(layer=layer) for layer in resolve_layers(model, template, layers)]
        else:
            out[kind] = [check_hook(model, template)]
    return out


def _capture_hooks(store: dict[str, Tensor]) -> Callable:
    """A forward hook recording the activation so that its gradient can be taken. Activations that do not
    require grad (nothing upstream does) become leaves that do; this cuts no path, since none existed."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
        store[hook.name] = act
        return act

    return hook


def gradients(
    model: "HookedVLM", inputs: dict[str, Any], metric: Metric, names: Sequence[str]
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """One forward with the graph kept and one backward of sum(metric).

    Returns (metric [batch], activations {name: tensor}, gradients {name: dM/d activation}), detached. Gradients
    flow only to the activations (parameters accumulate nothing); an activation the metric does not depend on
    gets a zero gradient.
    """
    store: dict[str, Tensor] = {}
    hook = _capture_hooks(store)
    with torch.enable_grad(), frozen_parameters(model), model.hooks(fwd_hooks=[(name, hook) for name in names]):
        values = metric(model(**inputs))
        tensors = [store[name] for name in names]
        unique: dict[int, Tensor] = {}
        for t in tensors:
            unique.setdefault(id(t), t)
        grads = torch.autograd.grad(values.sum(), list(unique.values()), allow_unused=True)
    by_id = {k: (g if g is not None else torch.zeros_like(t)) for (k, t), g in zip(unique.items(), grads)}
    acts = {name: store[name].detach() for name in names}
    return values.detach(), acts, {name: by_id[id(store[name])].detach() for name in names}


def attribution_patching(
    model: "HookedVLM",
    clean: dict[str, Any],
    corrupt: dict[str, Any],
    metric: Metric,
    *,
    hooks: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
    layers: int | Sequence[int] | None = None,
    positions: Tensor | None = None,
    direction: str = "denoise",
    per_prompt: bool = False,
) -> AttributionResult:
    """Linear estimate of patching every (layer, position) of each hook kind, and every head.

    hooks:     short kinds ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "result", "q",
               "k", "v"), ``{layer}`` templates ("vision.blocks.{layer}.hook_resid_post") or plain hook names
               ("projector.hook_out") whose activations are [batch(or image), pos, ...] or [n_image_tokens, d]
               (projector.hook_out: one score per image token, reading order).
    layers:    restrict the ``{layer}`` hooks to these layers.
    positions: bool [batch, pos] / [pos]: head scores sum only over these positions (default all).
    direction: "denoise" (gradient at the corrupt run, delta = clean - corrupt) or "noise" (gradient at the clean
               run, delta = corrupt - clean).

    Returns an AttributionResult; see its docstring for the shapes.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    kinds = _names(model, hooks, layers)
    for kind, names in kinds.items():
        if _leaf(names[0]) in HEAD_FIRST:
            raise ValueError(f"{kind}: attribution over attention patterns is not supported (use z or result)")
    all_names = [n for names in kinds.values() for n in names]
    base_inputs, grad_inputs = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    with torch.no_grad():
        base_logits, cache = model.run_with_cache(**base_inputs, names_filter=all_names)
        base_metric = metric_values(metric, base_logits)
    grad_metric, acts, grads = gradients(model, grad_inputs, metric, all_names)
    grad_metric = as_float(check_metric_output(grad_metric, int(grad_inputs["input_ids"].shape[0]), metric))
    clean, corrupt = (base_metric, grad_metric) if direction == "denoise" else (grad_metric, base_metric)

    scores: dict[str, Tensor] = {}
    completeness: dict[str, Completeness] = {}
    for kind, names in kinds.items():
        per_layer = []
        head = _leaf(names[0]) in HEAD_THIRD
        for name in names:
            delta = cache[name].to(acts[name].device, acts[name].dtype) - acts[name]
            if delta.shape != grads[name].shape:
                raise ValueError(f"{name}: the two runs' activations differ in shape {tuple(cache[name].shape)} vs "
                                 f"{tuple(acts[name].shape)}")
            prod = delta * grads[name]
            if prod.ndim == 2:  # [n_image_tokens, d] (projector.hook_out): one row of image tokens
                prod = prod[None]
            # [batch, pos, head, d] -> [batch, pos, head]; [batch, pos, d...] -> [batch, pos]
            if prod.ndim < 3:
                raise ValueError(f"{name}: attribution needs [batch, pos, ...] activations, got {tuple(prod.shape)}")
            red = prod.sum(-1) if head else prod.flatten(2).sum(-1)
            per_layer.append(as_float(red))
        stacked = torch.stack(per_layer)  # [layer, batch, pos(, head)]
        if head:
            by_pos = stacked.permute(0, 2, 3, 1)  # [layer, pos, head, batch]
            if positions is not None:
                mask = positions.bool().cpu()
                mask = mask[None].expand(stacked.shape[1], -1) if mask.ndim == 1 else mask
                summed = (stacked * mask[None, :, :, None]).sum(2)  # [layer, batch, head]
            else:
                summed = stacked.sum(2)
            summed = summed.permute(0, 2, 1)  # [layer, head, batch]
            pairs = {kind: summed, f"{kind}_by_pos": by_pos}
        else:
            pairs = {kind: stacked.permute(0, 2, 1)}  # [layer, pos, batch]
            cut = _residual_cut(model, names)
            if cut is not None:
                est = stacked.sum(2).masked_fill(~cut[:, None], float("nan"))  # [layer, batch]
                gap = (clean - corrupt) if direction == "denoise" else (corrupt - clean)
                completeness[kind] = Completeness(est, gap.expand_as(est).masked_fill(~cut[:, None], float("nan")))
        for key, value in pairs.items():
            if len(names) == 1 and "{layer}" not in hook_template(kind):
                value = value[0]
            scores[key] = value if per_prompt else value.mean(-1)
    if not per_prompt:
        clean, corrupt = clean.mean(), corrupt.mean()
    labels = {kind: names for kind, names in kinds.items()}
    return AttributionResult(scores, clean, corrupt, direction, labels, completeness)


def _residual_cut(model: "HookedVLM", names: list[str]) -> Tensor | None:
    """For decoder residual hooks ``blocks.{l}.hook_resid_*``: [layer] bool, True where the residual is a cut of the
    model (every later input is downstream of it: on DeepStack models only after the last image addition, which
    enters before ``hook_resid_post`` of its layer); None for other hooks."""
    last = max(model.cfg.deepstack_layers, default=-1)
    out = []
    for name in names:
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in ("hook_resid_pre", "hook_resid_mid",
                                                                       "hook_resid_post"):
            return None
        layer = int(parts[1])
        out.append(layer >= last if parts[2] == "hook_resid_post" else layer > last)
    return torch.tensor(out)


def plot_attribution(result: AttributionResult, key: str, layout: Any = None, **kwargs: Any):
    """Plotly figure of one kind: [layer, pos] heatmap (needs `layout`) or [layer, head] heatmap."""
    from . import plots

    scores = result.scores[key]
    title = kwargs.pop("title", None) or f"attribution patching: {key} ({result.direction})"
    if key in result.labels and _leaf(result.labels[key][0]) in HEAD_THIRD:
        return plots.plot_heads(scores, title=title)
    if scores.ndim == 2:
        if layout is None:
            raise ValueError("a [layer, pos] heatmap needs the TokenLayout for its hover text")
        return plots.plot_layer_position(scores, layout, title=title, **kwargs)
    raise ValueError(f"no standard plot for {key} with shape {tuple(scores.shape)}")
