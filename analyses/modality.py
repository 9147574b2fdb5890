"""How image and text representations meet, per layer: the descriptive analyses of the narrow-gate paper
(2412.06646, its Figs 2-4), for any family, each value with an interval over prompts.

- `cross_modal_attention`: per layer, the attention mass that text queries after the image put on the image
  tokens and on the end-of-image position (mean over heads and queries; per prompt, then over prompts).
- `modality_separation`: per layer, how separate the image-token and text-token representations are: the cosine
  similarity of their centroids, and the mean within-modality cosine minus the mean cross-modality cosine
  ("homogeneity gap": > 0 when each modality is closer to itself than to the other).
- `neighbourhood_overlap` / `overlap_with_labels`: the share of a point's k nearest neighbours (cosine) that two
  representations of the same points have in common (or that share its label): e.g. the end-of-image token's
  representation at layer l against the image's content labels, to see where image semantics collect.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .toolkit import Estimate, bootstrap, hook_template, resolve_layers

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


def _layout_sets(model: "HookedVLM", inputs: dict[str, Any]) -> tuple[Any, Tensor, Tensor, Tensor]:
    """(layout, text queries after the image as the knockout uses them, image positions, end-of-image position)."""
    from .narrow_gate import text_after_image

    layout = model.layout(inputs)
    return layout, text_after_image(layout), layout.image_positions(), layout.end_of_image()


@torch.no_grad()
def cross_modal_attention(model: "HookedVLM", inputs: dict[str, Any], layers: int | Sequence[int] | None = None
                          ) -> dict[str, dict[int, Estimate]]:
    """{"image": {layer: Estimate}, "end_of_image": {layer: Estimate}}: per prompt, the attention weight that the
    text queries after the image put on all image tokens (summed over keys) or on the end-of-image position,
    averaged over heads and queries; the Estimate is over prompts (bootstrap)."""
    layout, queries, image, eoi = _layout_sets(model, inputs)
    if not bool(queries.any(1).all()):
        raise ValueError("cross_modal_attention: every prompt needs text after its image (the queries)")
    template = hook_template("pattern")
    layer_ids = resolve_layers(model, template, layers)
    per_prompt: dict[str, dict[int, Tensor]] = {"image": {}, "end_of_image": {}}

    def record(layer: int):
        def fn(pattern: Tensor, hook: Any = None) -> None:
            p = pattern.float().mean(1).cpu()  # [batch, query, key], mean over heads
            for name, keys in (("image", image), ("end_of_image", eoi)):
                mass = (p * keys[:, None, :]).sum(-1)  # [batch, query]
                per_prompt[name][layer] = (mass * queries).sum(1) / queries.sum(1)
        return fn

    with model.hooks(fwd_hooks=[(template.format(layer=l), record(l)) for l in layer_ids]):
        model(**inputs)
    return {name: {l: bootstrap(v) for l, v in d.items()} for name, d in per_prompt.items()}


def _cos(a: Tensor, b: Tensor) -> Tensor:
    a, b = torch.nn.functional.normalize(a.float(), dim=-1), torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


@torch.no_grad()
def modality_separation(model: "HookedVLM", inputs: dict[str, Any], layers: int | Sequence[int] | None = None,
                        hook: str = "resid_post") -> dict[str, dict[int, Estimate]]:
    """{"centroid_cosine": {layer: Estimate}, "homogeneity_gap": {layer: Estimate}} over prompts: per prompt and
    layer, the cosine similarity of the image tokens' and the text tokens' mean representation, and (mean cosine
    within image tokens + within text tokens) / 2 - mean cosine between them."""
    layout, _, image, _ = _layout_sets(model, inputs)
    text = layout.text_positions()
    template = hook_template(hook)
    layer_ids = resolve_layers(model, template, layers)
    out: dict[str, dict[int, list[float]]] = {"centroid_cosine": {}, "homogeneity_gap": {}}

    def record(layer: int):
        def fn(x: Tensor, hook: Any = None) -> None:
            cent, gap = [], []
            for b in range(x.shape[0]):
                xi, xt = x[b, image[b]].float().cpu(), x[b, text[b]].float().cpu()
                if len(xi) < 2 or len(xt) < 2:
                    raise ValueError(f"modality_separation: prompt {b} needs at least 2 image and 2 text tokens")
                cent.append(float(_cos(xi.mean(0, keepdim=True), xt.mean(0, keepdim=True))))
                within = (_off_diagonal_mean(_cos(xi, xi)) + _off_diagonal_mean(_cos(xt, xt))) / 2
                gap.append(within - float(_cos(xi, xt).mean()))
            out["centroid_cosine"][layer], out["homogeneity_gap"][layer] = cent, gap
        return fn

    with model.hooks(fwd_hooks=[(template.format(layer=l), record(l)) for l in layer_ids]):
        model(**inputs)
    return {name: {l: bootstrap(v) for l, v in d.items()} for name, d in out.items()}


def _off_diagonal_mean(m: Tensor) -> float:
    n = m.shape[0]
    return float((m.sum() - m.diagonal().sum()) / (n * n - n))


def _knn(x: Tensor, k: int) -> Tensor:
    sim = _cos(x, x)
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def _check_k(n: int, k: int) -> None:
    if not 1 <= k < n:
        raise ValueError(f"k: expected 1 <= k < {n} (the number of points), got {k}")


def neighbourhood_overlap(x: Tensor, y: Tensor, k: int = 10) -> Estimate:
    """Share of each point's k nearest neighbours (cosine) in representation `x` [n, d] that are also among its k
    nearest in `y` [n, d'] (the same n points), bootstrapped over points. 1 = the same neighbourhoods; about
    k / (n - 1) for unrelated ones."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"neighbourhood_overlap: x has {x.shape[0]} points, y {y.shape[0]}")
    _check_k(x.shape[0], k)
    nx, ny = _knn(x, k), _knn(y, k)
    shared = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nx, ny)])
    return bootstrap(shared)


def overlap_with_labels(x: Tensor, labels: Tensor | Sequence[int], k: int = 10) -> Estimate:
    """Share of each point's k nearest neighbours (cosine) in `x` [n, d] that carry its label, bootstrapped over
    points (the label version of the neighbourhood overlap). Chance is about the label's frequency."""
    labels = torch.as_tensor(labels)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"overlap_with_labels: {x.shape[0]} points but {labels.shape[0]} labels")
    _check_k(x.shape[0], k)
    nn_idx = _knn(x, k)
    return bootstrap((labels[nn_idx] == labels[:, None]).float().mean(1))


@torch.no_grad()
def end_of_image_label_overlap(model: "HookedVLM", inputs: dict[str, Any], labels: Tensor | Sequence[int], k: int = 10,
                               layers: int | Sequence[int] | None = None) -> dict[int, Estimate]:
    """{layer: overlap_with_labels(end-of-image representation at resid_post of that layer, labels)}: where the
    image's content (e.g. the queried object's shape) becomes readable at the end-of-image position."""
    _, _, _, eoi = _layout_sets(model, inputs)
    template = hook_template("resid_post")
    layer_ids = resolve_layers(model, template, layers)
    reps: dict[int, Tensor] = {}

    def record(layer: int):
        def fn(x: Tensor, hook: Any = None) -> None:
            reps[layer] = x[eoi.to(x.device)].float().cpu()
        return fn

    with model.hooks(fwd_hooks=[(template.format(layer=l), record(l)) for l in layer_ids]):
        model(**inputs)
    return {l: overlap_with_labels(r, labels, k) for l, r in reps.items()}
