"""The one sweep engine of the analyses: sites -> chunks -> (resume from the saved run | full forward) -> metric.

A *site* is one intervention, evaluated on its own: a list of edits ``(hook name, fn)`` where
``fn(act, first_pos) -> act'`` replaces this site's copy of the hooked activation (``first_pos``: the sequence
position the activation starts at; 0 in a full forward, p0 in a resumed one), and where it may resume from
(`Site.start` = (layer, first changed position), or None for a full forward). Activation patching, head
transplants, attention knockouts, spatial edits and path patching are all sites (see `patch_site`,
`transplant_site` and the paper modules).

Batching: a chunk of n sites runs the target inputs repeated n times (`hooked_vlm.batching.repeat_inputs`,
copy j = site j) in one forward, or resumes n copies of one saved target run (`hooked_vlm.resume`) at the
chunk's earliest (layer, position): no vision tower, no earlier layers, no earlier positions. A site's position
inside a bidirectional group (Gemma 3: one image's tokens see each other) moves to the group's first position
(`hooked_vlm.resume.safe_start`), since earlier tokens of the group read the later ones.

Chunks are planned by a cost model (`plan_chunks`): a chunk costs ``(L - l0) * (n * (S - p0) + overhead)``
token-layers (l0, p0: its earliest layer and position; `overhead`: the fixed cost of one block call in tokens,
larger on accelerators where small batches leave the device idle). Sites are sorted by (layer, position) and
cut into the chunks that minimise the total (an exact dynamic programme over the sorted order): rows whose
resume points are close share a chunk, far ones get their own, so each site pays close to the exact limit
(L - l)/L x (S - p)/S of a forward.

Results equal one full forward per site up to float round-off (tests/analyses/test_patching.py).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.batching import repeat_inputs
from hooked_vlm.resume import SavedRun, capture, resume, safe_start

from .hooks import HEAD_FIRST, repeat_axis
from .metric import Metric, metric_per_slot, metric_values
from hooked_vlm.progress import progress_bar

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

EditFn = Callable[[Tensor, int], Tensor]


@dataclass
class Site:
    """One intervention: `edits` [(hook name, fn(act, first_pos) -> new act)] on this site's copy of each
    activation; `start` = (layer, first position) it may resume from (None: a full forward); `like`: the shape
    of one copy of an edited activation in a full forward, for hooks whose copies are not stacked on dim 0
    (packed vision towers); `label`: what the site is, kept in results."""

    edits: Sequence[tuple[str, EditFn]]
    start: tuple[int, int] | None = None
    like: dict[str, tuple[int, ...]] = field(default_factory=dict)
    label: Any = None


def position_axis(name: str) -> int:
    """The sequence axis of hook `name`'s activation: the query axis (2) for pattern / score hooks, else 1."""
    return 2 if name.rsplit(".", 1)[-1] in HEAD_FIRST else 1


def from_position(name: str, t: Tensor | None, pos: int) -> Tensor | None:
    """`t` (an activation of hook `name`, or a broadcastable mask) from sequence position `pos` on."""
    if t is None or pos == 0:
        return t
    axis = position_axis(name)
    return t if t.ndim <= axis or t.shape[axis] == 1 else t.narrow(axis, pos, t.shape[axis] - pos)


def patch_edit(name: str, source: Tensor, mask: Tensor | None,
               combine: Callable[[Tensor, Tensor], Tensor] | None = None) -> EditFn:
    """Edit replacing the entries of `mask` (None: all) by `source` (one copy of the activation), or by
    ``combine(source, act)`` there."""
    def fn(act: Tensor, first: int) -> Tensor:  # called once per forward: nothing is kept between chunks
        s = from_position(name, source, first).to(act.device, act.dtype)
        m = from_position(name, mask, first)
        new = s if combine is None else combine(s, act)
        return new if m is None else torch.where(m.to(act.device), new, act)

    return fn


def decoder_layer(name: str) -> int | None:
    """l for a ``blocks.{l}.*`` hook name, else None (vision tower, projector, embeddings)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def resume_start(name: str, mask: Tensor | None) -> tuple[int, int] | None:
    """(layer, earliest position the mask touches) for a decoder-block hook, None for other hooks."""
    layer = decoder_layer(name)
    if layer is None:
        return None
    axis = position_axis(name)
    if mask is None or mask.ndim <= axis or mask.shape[axis] == 1:
        return layer, 0
    hit = mask.movedim(axis, 0).reshape(mask.shape[axis], -1).any(-1).nonzero()
    return layer, int(hit[0]) if len(hit) else 0


def default_overhead(device: Any) -> int:
    """Fixed cost of one block call, in tokens of work: small on a CPU, large on an accelerator (where a short
    batch leaves most of the device idle)."""
    return 32 if torch.device(device).type == "cpu" else 2048


def plan_chunks(starts: Sequence[tuple[int, int] | None], batch_size: int, n_layers: int, seq_len: int,
                overhead: int) -> list[tuple[tuple[int, int] | None, list[int]]]:
    """Chunks [(resume point or None, site indices)] of at most `batch_size` sites, minimising the cost model of
    the module docstring over the sites sorted by (layer, position). Full-forward sites (start None) are
    chunked in order."""
    full = [i for i, s in enumerate(starts) if s is None]
    late = sorted((i for i, s in enumerate(starts) if s is not None), key=lambda i: starts[i])
    plan: list[tuple[tuple[int, int] | None, list[int]]] = [
        (None, full[k : k + batch_size]) for k in range(0, len(full), batch_size)]
    n = len(late)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        p_min = seq_len
        for j in range(k - 1, max(0, k - batch_size) - 1, -1):  # chunk late[j:k]
            layer, pos = starts[late[j]]
            p_min = min(p_min, pos)
            l_min = starts[late[j]][0]  # sorted by layer first
            cost = best[j] + (n_layers - l_min) * ((k - j) * (seq_len - p_min) + overhead)
            if cost < best[k]:
                best[k], cut[k] = cost, j
    chunks, k = [], n
    while k > 0:
        idx = late[cut[k] : k]
        chunks.append(((starts[idx[0]][0], min(starts[i][1] for i in idx)), idx))
        k = cut[k]
    return plan + chunks[::-1]


def _chunk_hooks(sites: Sequence[Site], first: int | None) -> list[tuple[str, Callable]]:
    """One hook per edited name; copy j of the activation gets site j's edits. `first`: the resumed run's first
    position (None: a full forward, whose copies may be packed on another axis than 0)."""
    by_name: dict[str, list[tuple[int, EditFn, tuple | None]]] = defaultdict(list)
    for j, site in enumerate(sites):
        for name, fn in site.edits:
            by_name[name].append((j, fn, site.like.get(name)))
    n = len(sites)

    def make(name: str, items: list[tuple[int, EditFn, tuple | None]]) -> Callable:
        def hook(act: Tensor, hook: Any = None) -> Tensor:
            like = items[0][2]
            try:
                axis = 0 if first is not None or like is None else repeat_axis(like, act.shape, n)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            if act.shape[axis] % n:
                raise ValueError(f"{name}: an activation of shape {tuple(act.shape)} is not {n} copies of a batch")
            v = act.shape[axis] // n
            out = act.clone()
            for j, fn, _ in items:
                part = act.narrow(axis, j * v, v)
                out.narrow(axis, j * v, v).copy_(fn(part, first or 0))
            return out

        return hook

    return [(name, make(name, items)) for name, items in by_name.items()]


@torch.no_grad()
def run_sites(
    model: "HookedVLM",
    inputs: dict[str, Any],
    metric: Metric,
    sites: Sequence[Site],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "sweep",
    reuse_prefix: bool = True,
    overhead: int | None = None,
) -> tuple[Float[Tensor, "n_sites batch"], Float[Tensor, "batch"]]:
    """metric of the run on `inputs` with each site applied alone -> (values [n_sites, batch], the unedited
    run's metric [batch]). Sites with a `start` resume from one saved run of `inputs` (``reuse_prefix=False``
    reruns the whole model for every chunk instead)."""
    batch_size = check_batch_size(batch_size)
    starts = [s.start if reuse_prefix else None for s in sites]
    saved: SavedRun | None = capture(model, inputs) if any(st is not None for st in starts) else None
    if saved is not None:  # inside a bidirectional group (Gemma 3's image tokens) resume from the group's start
        starts = [None if st is None else (st[0], safe_start(saved, st[1])) for st in starts]
    n_layers = len(model.blocks)
    seq_len = int(inputs["input_ids"].shape[1])
    if overhead is None:
        overhead = default_overhead(model.embed.weight.device)
    plan = plan_chunks(starts, batch_size, n_layers, seq_len, overhead)
    base = metric_values(metric, saved.logits if saved is not None else model(**inputs))
    values: list[Tensor | None] = [None] * len(sites)
    bar = progress_bar(total=len(sites), desc=desc, progress=progress)
    try:
        for start, idx in plan:
            chunk = [sites[i] for i in idx]
            with model.hooks(fwd_hooks=_chunk_hooks(chunk, None if start is None else start[1])):
                if start is None:
                    out = model(**repeat_inputs(inputs, len(chunk)))
                else:
                    out = resume(model, saved, start[0], start[1], len(chunk))
            for i, v in zip(idx, metric_per_slot(metric, out, len(chunk))):
                values[i] = v
            del out
            bar.update(len(chunk))
    finally:
        bar.close()
    scores = torch.stack(values) if values else torch.empty(0, int(base.shape[0]))
    return scores, base


def check_batch_size(batch_size: Any, what: str = "batch_size") -> int:
    """A positive int, or a ValueError naming what came (0 or a negative size would drop all work)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{what} must be a positive integer (sites per forward); got {batch_size!r}")
    return batch_size
