"""Edits that move activations between positions (and runs): `transplant` and its sweep-engine form."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .metric import Metric
from .positions import as_positions, tile
from .sweep import EditFn, Site, check_batch_size, decoder_layer, run_sites

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Inputs = dict[str, Any]
Patch = tuple[str, "int | None"]  # (hook name, head index on dim 2, or None for the whole activation)


def transplant(
    dst: Tensor, src: Tensor, dst_mask: Bool[Tensor, "batch pos"], src_mask: Bool[Tensor, "batch pos2"] | None = None
) -> Tensor:
    """Copy of `dst` [batch, pos, ...] with the positions in dst_mask taken, in order, from src [batch, pos2, ...]
    at src_mask (default: the same mask). Each prompt must select as many positions in both masks."""
    src_mask = dst_mask if src_mask is None else src_mask
    dst_mask, src_mask = dst_mask.to(dst.device), src_mask.to(src.device)
    if dst_mask.shape != dst.shape[:2] or src_mask.shape != src.shape[:2]:
        raise ValueError(f"masks {tuple(dst_mask.shape)} / {tuple(src_mask.shape)} do not match activations "
                         f"{tuple(dst.shape[:2])} / {tuple(src.shape[:2])} (batch, pos)")
    nd, ns = dst_mask.sum(1), src_mask.sum(1)
    if not torch.equal(nd.cpu(), ns.cpu()):
        raise ValueError(f"destination and source positions differ in number per prompt: {nd.tolist()} vs {ns.tolist()}")
    out = dst.clone()
    out[dst_mask] = src[src_mask].to(dst.device, dst.dtype)
    return out


def transplant_edit(source: Tensor, positions: Bool[Tensor, "batch pos"],
                    source_positions: Bool[Tensor, "batch pos2"] | None = None, head: int | None = None) -> EditFn:
    """Sweep-engine edit: the activation at `positions` taken, in order, from `source` [batch, pos2, ...] at
    `source_positions` (default `positions`), on head `head` (dim 2) or the whole vector. In a resumed run
    (first position p0) the destination mask is read from p0 on; the source keeps every position."""
    src_mask = positions if source_positions is None else source_positions

    def fn(act: Tensor, first: int) -> Tensor:
        dst_mask = positions[:, first:] if first else positions
        if head is None:
            return transplant(act, source, dst_mask, src_mask)
        out = act.clone()
        out[:, :, head] = transplant(act[:, :, head], source[:, :, head], dst_mask, src_mask)
        return out

    return fn


def first_position(mask: Tensor) -> int:
    """The earliest position a [batch, pos] / [pos] mask selects in any prompt (0 if none)."""
    hit = (mask.any(0) if mask.ndim == 2 else mask).nonzero()
    return int(hit[0]) if len(hit) else 0


def _mask_for(positions: Any, inputs: Inputs, what: str) -> Tensor:
    b, n = inputs["input_ids"].shape
    m = as_positions(positions, int(n), int(b), what=what)
    if m is None:
        raise ValueError(f"{what}: a position set is needed (e.g. model.layout(inputs).final_token())")
    return tile(m, int(b), what)


@torch.no_grad()
def transplant_sweep(
    model: "HookedVLM",
    inputs: Inputs,
    source: dict[str, Tensor],
    patches: Sequence[Patch],
    metric: Metric,
    *,
    positions: Any,
    source_positions: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Float[Tensor, "n_patches batch"]:
    """metric of the run on `inputs` with ONE patch applied, for every patch in `patches`, on the sweep engine
    (batched, resuming decoder patches at their layer and first position).

    `source` maps hook names to activations of the source (counterfactual) run [batch, pos2, ...]; a patch
    (name, head) copies source[name] at source_positions into the run at `positions`, on dim 2 index `head`
    (or the whole vector when head is None). The two runs may differ in length; each prompt must select as
    many positions in both sets.
    """
    check_batch_size(batch_size)
    if not patches:
        raise ValueError("transplant_sweep: no patches given")
    dst = _mask_for(positions, inputs, "positions")
    src = None
    if source_positions is not None:
        name0 = patches[0][0]
        if name0 not in source:
            raise KeyError(f"transplant_sweep: {name0!r} is not in `source` (has {sorted(source)[:4]}...)")
        b, n2 = source[name0].shape[:2]
        src = tile(as_positions(source_positions, int(n2), int(b), what="source_positions"), int(b))
    first = first_position(dst)
    sites = []
    for name, head in patches:
        if name not in source:
            raise KeyError(f"transplant_sweep: no source activation for {name!r}")
        layer = decoder_layer(name)
        sites.append(Site([(name, transplant_edit(source[name], dst, src, head))],
                          None if layer is None else (layer, first), label=(name, head)))
    values, _ = run_sites(model, inputs, metric, sites, batch_size=batch_size, progress=progress, desc="transplant")
    return values
