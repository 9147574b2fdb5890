"""Position / order probes of 2603.22278 (section 5.2.1) and its absolute-vs-relative control.

Labels come from the scene (each object's box, as fractions of the image) and `TokenLayout.in_box`, so they work
for any family and resolution: nothing here knows a grid size.

- `position_labels(layout, boxes, kind="order")`: per image token of an object, that object's ORDER among the
  prompt's objects along x (0 = leftmost): 2 objects -> 2 classes (which is left), 3 -> left / middle / right.
  kind="absolute": the band of the image (n_classes equal vertical bands) the object's centre lies in. -1 on
  background and text tokens (not probed).
- `position_probe(model, inputs, labels)`: the paper's probe: a linear layer (one column per class: a binary probe
  has TWO columns) trained with AdamW (lr 1e-3, weight decay 1e-4, 200 full-batch epochs) on the post-projection visual
  tokens (`hook_embed` at image positions = the projector / merger output placed in the sequence), split by
  prompt; held-out accuracy with a bootstrap interval over held-out prompts.
- `absolute_vs_relative(...)`: does the probe read an object's order among the objects (relative) or where it
  sits in the image (absolute)? See its docstring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .spatial_base import Probe, activations_at, split_prompts
from .toolkit import Estimate, bootstrap

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Box = Sequence[float | int]  # (x0, y0, x1, y1) as fractions of the image
ORDER_NAMES = {2: ("left", "right"), 3: ("left", "middle", "right")}


# ------------------------------------------------------------------------------------------------ labels
def _check_boxes(layout: Any, boxes: Sequence[Sequence[Box]]) -> int:
    b = layout.shape[0]
    if len(boxes) != b:
        raise ValueError(f"boxes: expected one list of object boxes per prompt ({b}), got {len(boxes)}")
    counts = {len(bx) for bx in boxes}
    if len(counts) != 1 or min(counts) < 1:
        raise ValueError(f"boxes: every prompt needs the same number (>= 1) of objects, got counts {sorted(counts)}")
    for bx in boxes:
        for box in bx:
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(f"boxes: expected (x0, y0, x1, y1) fractions of the image in [0, 1], got {tuple(box)}")
    return counts.pop()


def object_masks(layout: Any, boxes: Sequence[Sequence[Box]], image: int = 0, crop: int = 0) -> list[Bool[Tensor, "batch pos"]]:
    """Mask of object k's image tokens (patch centre inside its box), k = 0..n_objects-1."""
    n = _check_boxes(layout, boxes)
    return [layout.in_box([bx[k] for bx in boxes], image=image, crop=crop) for k in range(n)]


def pixel_boxes_to_fractions(boxes: Sequence[Box], size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) pixel boxes (x1, y1 exclusive) of an image of `size` = (width, height) -> fractions."""
    w, h = size
    return [(b[0] / w, b[1] / h, b[2] / w, b[3] / h) for b in boxes]


def object_classes(boxes: Sequence[Box], kind: str = "order", n_classes: int | None = None, axis: str = "x") -> list[int]:
    """Class of each object of one scene: "order" = rank of its centre along `axis` (0 = left / top),
    "absolute" = which of `n_classes` equal bands of the image its centre lies in."""
    i = {"x": 0, "y": 1}.get(axis)
    if i is None:
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    centre = np.array([(b[i] + b[i + 2]) / 2 for b in boxes])
    if kind == "order":
        if n_classes is not None and n_classes != len(boxes):
            raise ValueError(f"order labels have one class per object: n_classes={n_classes} but {len(boxes)} objects")
        return [int(r) for r in np.argsort(np.argsort(centre, kind="stable"), kind="stable")]
    if kind == "absolute":
        n = n_classes or len(boxes)
        return [int(min(n - 1, np.floor(c * n))) for c in centre]
    raise ValueError(f"kind must be 'order' or 'absolute', got {kind!r}")


def position_labels(
    layout: Any, boxes: Sequence[Sequence[Box]], kind: str = "order", n_classes: int | None = None, axis: str = "x",
    image: int = 0, crop: int = 0,
) -> Int[Tensor, "batch pos"]:
    """Per image token covered by an object: the object's class (`object_classes`); -1 elsewhere (background,
    text, and tokens two objects' boxes share). boxes: per prompt, its objects' (x0, y0, x1, y1) fractions."""
    masks = object_masks(layout, boxes, image, crop)
    out = torch.full(layout.shape, -1, dtype=torch.long)
    shared = torch.stack(masks).sum(0) > 1
    for bi, bx in enumerate(boxes):
        for k, cls in enumerate(object_classes(bx, kind, n_classes, axis)):
            out[bi, masks[k][bi]] = cls
    out[shared] = -1
    return out


# ------------------------------------------------------------------------------------------------ probe
def train_probe(
    x: Float[Tensor, "n d"], y: Int[Tensor, "n"], n_classes: int, *, lr: float | int = 1e-3,
    weight_decay: float | int = 1e-4, epochs: int = 200, batch_size: int | None = None, seed: int = 0,
) -> Probe:
    """The paper's probe: logits = x @ W + b (W: [d, n_classes], one column per class, so a binary probe has two
    columns) on the raw features, W and b drawn from N(0, 1/d), trained by AdamW (lr, weight_decay) on the
    cross-entropy for `epochs` full-batch steps (the authors' code; `batch_size` gives shuffled mini-batches
    instead, an option)."""
    x, y = x.float().cpu(), y.long().cpu()
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"train_probe: expected as many labels as rows (> 0), got {len(y)} labels for {len(x)} rows")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"train_probe: labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}")
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    W = (torch.randn(d, n_classes, generator=g) / d ** 0.5).requires_grad_(True)
    b = (torch.randn(n_classes, generator=g) / d ** 0.5).requires_grad_(True)
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in ([slice(None)] if batch_size is None else torch.randperm(len(y), generator=g).split(batch_size)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(x[idx] @ W + b, y[idx]).backward()
                opt.step()
    return Probe(W.detach().clone(), b.detach().clone(), torch.zeros(d), torch.ones(d))


def probe_columns(probe: Probe) -> Float[Tensor, "classes d"]:
    """The probe's class columns in the raw activation space (one row per class; both columns of a binary
    probe), as amplification projects on them."""
    return probe.columns()


@dataclass
class PositionProbeResult:
    """`test_acc`: accuracy on the held-out prompts' labelled tokens, with a bootstrap interval over those prompts
    (n = held-out prompts); `chance`: the majority class's share of the held-out tokens; `n_tokens`: (train,
    test) labelled tokens; `test_prompts`: the held-out prompts."""

    hook: str
    probe: Probe
    n_classes: int
    train_acc: float
    test_acc: Estimate
    chance: float
    n_tokens: tuple[int, int]
    test_prompts: Bool[Tensor, "batch"]

    def columns(self) -> Float[Tensor, "classes d"]:
        return probe_columns(self.probe)


def prompt_accuracy(correct: Tensor, prompt: Tensor, seed: int = 0) -> Estimate:
    """Token accuracy with a cluster bootstrap over prompts (tokens of one prompt are not independent)."""
    ids = prompt.unique()
    if len(ids) == 0:
        raise ValueError("no labelled tokens to score")
    hits = np.array([float(correct[prompt == p].sum()) for p in ids])
    counts = np.array([float((prompt == p).sum()) for p in ids])
    return bootstrap(hits, counts, statistic=lambda h, c: h.sum() / c.sum(), seed=seed)


def position_probes(
    model: "HookedVLM", inputs: dict[str, Any], labels: Int[Tensor, "batch pos"], hooks: Sequence[str] = ("hook_embed",),
    *, test_frac: float | int = 0.25, seed: int = 0, n_classes: int | None = None, **train: Any,
) -> dict[str, PositionProbeResult]:
    """`position_probe` for several hooks from one forward pass ({hook: result})."""
    labels = labels.cpu().long()
    if labels.shape != tuple(inputs["input_ids"].shape):
        raise ValueError(f"labels: expected one per token {tuple(inputs['input_ids'].shape)}, got {tuple(labels.shape)}")
    keep = labels >= 0
    if not keep.any():
        raise ValueError("labels: no labelled token (all -1); are the object boxes inside the image?")
    feats, prompt = activations_at(model, inputs, hooks, keep)
    y = labels[keep]
    n_classes = n_classes or int(y.max()) + 1
    test_prompts = split_prompts(labels.shape[0], test_frac, seed)
    test = test_prompts[prompt]
    if not test.any() or test.all():
        raise ValueError("position_probes: the split left no labelled token on one side; use more prompts")
    chance = float(torch.bincount(y[test], minlength=n_classes).max()) / int(test.sum())
    out = {}
    for h, x in feats.items():
        p = train_probe(x[~test], y[~test], n_classes, seed=seed, **train)
        correct = p.predict(x) == y
        out[h] = PositionProbeResult(h, p, n_classes, float(correct[~test].float().mean()),
                                     prompt_accuracy(correct[test], prompt[test], seed), chance,
                                     (int((~test).sum()), int(test.sum())), test_prompts)
    return out


def position_probe(
    model: "HookedVLM", inputs: dict[str, Any], labels: Int[Tensor, "batch pos"], hook: str = "hook_embed", **kw: Any,
) -> PositionProbeResult:
    """The paper's position / order probe on one hook (default: post-projection visual tokens). labels [batch,
    pos] from `position_labels` (-1 = not probed). kw: test_frac (0.25, split by prompt), seed, n_classes, and
    train_probe's lr (1e-3), weight_decay (1e-4), epochs (200), batch_size (None: full batch)."""
    return position_probes(model, inputs, labels, [hook], **kw)[hook]


# --------------------------------------------------------------------------------- absolute vs relative
@dataclass
class AbsRelResult:
    """`follows_relative` / `follows_absolute`: share of the held-out tokens whose two labels DISAGREE on which the
    probe predicts the relative (order) / the absolute (image band) label, with bootstrap intervals over prompts;
    `agree_acc`: its accuracy on held-out tokens where both labels agree (sanity)."""

    hook: str
    follows_relative: Estimate
    follows_absolute: Estimate
    agree_acc: Estimate
    n_disagree: int


def absolute_vs_relative(
    model: "HookedVLM", inputs: dict[str, Any], relative: Int[Tensor, "batch pos"], absolute: Int[Tensor, "batch pos"],
    hook: str = "hook_embed", *, test_frac: float | int = 0.5, seed: int = 0, **train: Any,
) -> AbsRelResult:
    """The absolute-vs-relative position control (the authors' shifted-squares control).

    An "order" probe could succeed by reading WHERE a token sits in the image (absolute position, which every
    patch carries from the vision encoder's position embeddings) instead of the object's order AMONG the objects
    (relative). The two agree in the canonical scenes (the left object is in the left of the image), so the
    probe's accuracy there cannot tell them apart. Here the probe is trained only on tokens where the relative
    label (`position_labels(kind="order")`) and the absolute label (`position_labels(kind="absolute")`, same
    number of classes) agree, on the training prompts, and read on held-out tokens where they DISAGREE (objects
    shifted so that, e.g., the left object of a pair lies in the right half): the share that follows each label.
    Needs scenes with disagreeing objects (shifted scenes, or a random layout)."""
    relative, absolute = relative.cpu().long(), absolute.cpu().long()
    if relative.shape != absolute.shape:
        raise ValueError(f"relative {tuple(relative.shape)} and absolute {tuple(absolute.shape)} labels differ in shape")
    if not torch.equal(relative >= 0, absolute >= 0):
        raise ValueError("relative and absolute labels must label the same tokens (build both from the same boxes)")
    keep = relative >= 0
    feats, prompt = activations_at(model, inputs, [hook], keep)
    x, r, a = feats[hook], relative[keep], absolute[keep]
    test = split_prompts(relative.shape[0], test_frac, seed)[prompt]
    agree = r == a
    if not (agree & ~test).any():
        raise ValueError("absolute_vs_relative: no training token where the two labels agree")
    if not (~agree & test).any():
        raise ValueError("absolute_vs_relative: no held-out token where the relative and absolute labels disagree; "
                         "use shifted scenes or a random layout")
    n_classes = int(max(r.max(), a.max())) + 1
    p = train_probe(x[agree & ~test], r[agree & ~test], n_classes, seed=seed, **train)
    pred = p.predict(x)
    dis = ~agree & test
    return AbsRelResult(hook, prompt_accuracy(pred[dis] == r[dis], prompt[dis], seed),
                        prompt_accuracy(pred[dis] == a[dis], prompt[dis], seed),
                        prompt_accuracy(pred[agree & test] == r[agree & test], prompt[agree & test], seed),
                        int(dis.sum()))
