"""Criss-cross interchange patching of 2603.22278 (Figs 6/7) and the vision-encoder full-grid ablation (Table 5).

Criss-cross: the clean image and a counterfactual with the objects' colours reversed (same boxes) are run; at one
hook, the clean run's tokens of region A are replaced by the counterfactual's tokens of region B and those of B
by the counterfactual's A (clean-left <- cf-right, clean-right <- cf-left). The counterfactual's right object has
the clean left object's colour, so what lands on the left region shows the SAME colour but was encoded at the
right: colour is kept, only the position the tokens carry moves. If the answer to "what colour is on the left?"
follows the moved tokens, position is read from the token content (vision-encoder signal); if it stays, from where
the tokens sit (the LM's own positions). Regions are the objects' tokens ("object") or the full columns under them
("strip"), at `blocks.0.hook_resid_pre` and at `hook_resid_post` of every layer; the readout is the probability of
each candidate colour at the final token, and the fraction of answers that flip to the counterfactual's answer.

Regions are paired token by token by their offset from the region's top-left (row, col) on the TokenLayout grid,
so nothing depends on a grid size or on the order the family lays image tokens out in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .metrics import final_logits
from .spatial_probes import Box, object_masks
from .toolkit import Estimate, act_name, rate, run_cached

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Inputs = dict[str, Any]


# ----------------------------------------------------------------------------------------------- regions
def _grid(layout: Any, bi: int, image: int, crop: int) -> tuple[Tensor, dict[tuple[int, int], int], tuple[int, int]]:
    img = layout.image_positions(image)[bi] & (layout.crop[bi] == crop)
    pos = img.nonzero().flatten()
    where = {(int(layout.row[bi, p]), int(layout.col[bi, p])): int(p) for p in pos}
    rows, cols = layout.grids[bi][int(layout.image_index[bi, pos[0]])][crop] if len(pos) else (0, 0)
    return img, where, (rows, cols)


def _rect(layout: Any, mask_row: Tensor, bi: int) -> tuple[int, int, int, int] | None:
    p = mask_row.nonzero().flatten()
    if len(p) == 0:
        return None
    r, c = layout.row[bi, p], layout.col[bi, p]
    return int(r.min()), int(c.min()), int(r.max()), int(c.max())


def regions(layout: Any, boxes: Sequence[Sequence[Box]], kind: str = "object", image: int = 0,
            crop: int = 0) -> tuple[list[Bool[Tensor, "batch pos"]], Bool[Tensor, "batch"]]:
    """(one token mask per object, valid [batch]). kind="object": the bounding rectangle of the object's tokens;
    "strip": every row of the columns under the object (the paper's vertical strips for left/right scenes). All
    regions of a prompt get the same height and width (the largest, kept inside the grid), so they pair token
    by token; a prompt whose regions overlap or miss is not valid."""
    if kind not in ("object", "strip"):
        raise ValueError(f"kind must be 'object' or 'strip', got {kind!r}")
    masks = object_masks(layout, boxes, image, crop)
    out = [torch.zeros(layout.shape, dtype=torch.bool) for _ in masks]
    valid = torch.ones(layout.shape[0], dtype=torch.bool)
    for bi in range(layout.shape[0]):
        _, where, (rows, cols) = _grid(layout, bi, image, crop)
        rects = [_rect(layout, m[bi], bi) for m in masks]
        if any(r is None for r in rects):
            valid[bi] = False
            continue
        h = rows if kind == "strip" else max(r[2] - r[0] + 1 for r in rects)
        w = max(r[3] - r[1] + 1 for r in rects)
        cells = []
        for k, (r0, c0, _, _) in enumerate(rects):
            r0 = 0 if kind == "strip" else min(r0, rows - h)
            c0 = min(c0, cols - w)
            cells.append({(r, c) for r in range(r0, r0 + h) for c in range(c0, c0 + w)})
            for rc in cells[-1]:
                if rc in where:
                    out[k][bi, where[rc]] = True
        if any(cells[i] & cells[j] for i in range(len(cells)) for j in range(i + 1, len(cells))):
            valid[bi] = False
    for m in out:
        m[~valid] = False
    return out, valid


def pair_positions(
    dst_layout: Any, dst: Bool[Tensor, "batch pos"], src_layout: Any, src: Bool[Tensor, "batch pos2"], image: int = 0,
    crop: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Per prompt (destination positions, source positions): each token of `dst` paired with the token of `src`
    at the same offset from the region's top-left (row, col), clamped into the source region's rectangle."""
    out = []
    for bi in range(dst.shape[0]):
        d_rect, s_rect = _rect(dst_layout, dst[bi], bi), _rect(src_layout, src[bi], bi)
        if d_rect is None or s_rect is None:
            out.append((torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
            continue
        _, where, _ = _grid(src_layout, bi, image, crop)
        dp = dst[bi].nonzero().flatten()
        sp = []
        for p in dp:
            r = min(max(int(dst_layout.row[bi, p]) - d_rect[0] + s_rect[0], s_rect[0]), s_rect[2])
            c = min(max(int(dst_layout.col[bi, p]) - d_rect[1] + s_rect[1], s_rect[1]), s_rect[3])
            sp.append(where[(r, c)])
        out.append((dp, torch.tensor(sp, dtype=torch.long)))
    return out


def criss_cross_pairs(
    clean_layout: Any, cf_layout: Any, boxes: Sequence[Sequence[Box]], a: int = 0, b: int = -1, kind: str = "object",
    cross: bool = True,
) -> tuple[list[tuple[Tensor, Tensor]], Bool[Tensor, "batch"]]:
    """(per prompt (clean positions, counterfactual positions), valid): objects a and b's regions (`regions`, from
    the boxes both images share), clean-a <- cf-b and clean-b <- cf-a (cross=False: clean-a <- cf-a, clean-b <- cf-b,
    an identity when the two runs are identical)."""
    two = [[bx[a], bx[b]] for bx in boxes]  # only the two interchanged objects need disjoint, equal regions
    (ra, rb), valid = regions(clean_layout, two, kind)
    (fa, fb), valid_cf = regions(cf_layout, two, kind)
    valid = valid & valid_cf
    sa, sb = (fb, fa) if cross else (fa, fb)
    one, two = pair_positions(clean_layout, ra, cf_layout, sa), pair_positions(clean_layout, rb, cf_layout, sb)
    return [(torch.cat([d1, d2]), torch.cat([s1, s2])) for (d1, s1), (d2, s2) in zip(one, two)], valid


# -------------------------------------------------------------------------------------------- interchange
def interchange_hook(source: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]):
    """Forward hook: act[b, dst] = source[b, src] for each prompt's (dst, src) positions."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        out = act.clone()
        for bi, (d, s) in enumerate(pairs):
            if len(d):
                out[bi, d.to(act.device)] = source[bi, s.to(source.device)].to(act.device, act.dtype)
        return out

    return hook


@torch.no_grad()
def interchange_logits(model: "HookedVLM", clean: Inputs, source: Tensor, pairs: Sequence[tuple[Tensor, Tensor]],
                       hook_name: str) -> Float[Tensor, "batch pos vocab"]:
    """Logits of the clean run with `interchange_hook(source, pairs)` at hook_name."""
    with model.hooks(fwd_hooks=[(hook_name, interchange_hook(source, pairs))]):
        return model(**clean)


def default_sites(model: "HookedVLM") -> list[str]:
    """The paper's sites: the LM input (resid_pre of layer 0) and resid_post of every layer."""
    return [act_name("resid_pre", 0)] + [act_name("resid_post", l) for l in range(model.cfg.n_layers)]


def candidate_probs(logits: Tensor, attention_mask: Tensor | None, candidates: Int[Tensor, "batch k"]) -> Tensor:
    """Probabilities (softmax over the whole vocabulary) of each prompt's candidate tokens at its final token."""
    p = final_logits(logits, attention_mask).float().softmax(-1)
    return p.gather(1, candidates.to(p.device).long()).cpu()


@dataclass
class CrissCrossResult:
    """`probs[site]`: [batch, k] candidate probabilities after the interchange at that hook; `clean_probs`,
    `cf_probs` unpatched; `flipped[site]` / `kept[site]`: share of the scored prompts whose top candidate becomes
    the counterfactual's answer / stays the clean answer (Wilson intervals); scored = valid regions and, with
    `golden`, both unpatched runs right (the paper scores pairs the model answers correctly)."""

    sites: list[str]
    probs: dict[str, Tensor]
    clean_probs: Tensor
    cf_probs: Tensor
    scored: Bool[Tensor, "batch"]
    flipped: dict[str, Estimate] = field(default_factory=dict)
    kept: dict[str, Estimate] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [dict(site=s, flipped=self.flipped[s].to_dict(), kept=self.kept[s].to_dict()) for s in self.sites]


@torch.no_grad()
def criss_cross(
    model: "HookedVLM", clean: Inputs, counterfactual: Inputs, pairs: Sequence[tuple[Tensor, Tensor]],
    candidates: Int[Tensor, "batch k"], clean_answer: Int[Tensor, "batch"], cf_answer: Int[Tensor, "batch"],
    *, sites: Sequence[str] | None = None, valid: Bool[Tensor, "batch"] | None = None, golden: bool = True,
) -> CrissCrossResult:
    """Criss-cross interchange at each site (default `default_sites`: resid_pre 0 and resid_post of every layer),
    one site at a time. pairs: per prompt (clean positions, counterfactual positions), from `criss_cross_pairs`;
    candidates: token ids of the candidate answers (e.g. the scene's colours) per prompt; clean_answer /
    cf_answer: the index (into candidates) of each run's right answer."""
    sites = list(sites or default_sites(model))
    b = clean["input_ids"].shape[0]
    if len(pairs) != b or candidates.shape[0] != b:
        raise ValueError(f"pairs ({len(pairs)}) and candidates ({candidates.shape[0]}) need one row per prompt ({b})")
    mask_c, mask_f = clean.get("attention_mask"), counterfactual.get("attention_mask")
    logits_cf, cache = run_cached(model, counterfactual, sites)
    clean_probs = candidate_probs(model(**clean), mask_c, candidates)
    cf_probs = candidate_probs(logits_cf, mask_f, candidates)
    ca, fa = clean_answer.cpu().long(), cf_answer.cpu().long()
    scored = torch.ones(b, dtype=torch.bool) if valid is None else valid.cpu().bool()
    if golden:
        scored = scored & (clean_probs.argmax(1) == ca) & (cf_probs.argmax(1) == fa)
    if not scored.any():
        raise ValueError("criss_cross: no prompt to score (regions invalid, or the model gets no pair right with "
                         "golden=True); pass golden=False to score every valid prompt")
    res = CrissCrossResult(sites, {}, clean_probs, cf_probs, scored)
    for s in sites:
        p = candidate_probs(interchange_logits(model, clean, cache[s], pairs, s), mask_c, candidates)
        res.probs[s] = p
        top = p.argmax(1)[scored]
        res.flipped[s], res.kept[s] = rate(top == fa[scored]), rate(top == ca[scored])
    return res


# -------------------------------------------------------------------------------- vision-encoder ablation
@dataclass
class VisionAblationResult:
    """Accuracy (top candidate = answer) before and after the ablation, Wilson intervals, on the same prompts."""

    clean_acc: Estimate
    ablated_acc: Estimate
    clean_probs: Tensor
    ablated_probs: Tensor


@torch.no_grad()
def vision_ablation(
    model: "HookedVLM", inputs: Inputs, object_regions: Sequence[Bool[Tensor, "batch pos"]],
    references: Sequence[Inputs], reference_regions: Sequence[Bool[Tensor, "batch pos"]], empty: Inputs,
    candidates: Int[Tensor, "batch k"], answer: Int[Tensor, "batch"], hook_name: str = "blocks.0.hook_resid_pre",
) -> VisionAblationResult:
    """The full-grid vision-encoder ablation (2603.22278 sec. 5.3.1, Table 5): remove the layout the vision encoder
    writes into the image tokens while keeping what each object is, at the LM input.

    At `hook_name` (default the LM's layer-0 input, where image tokens hold only the projected vision features;
    the LM's own positions enter later through RoPE) EVERY image token of the first image's base grid is replaced
    (other crops and images are left alone): background tokens by the
    same grid cell of a background-only image (`empty`), object k's tokens (`object_regions[k]`) by the tokens of
    a reference image holding object k alone at the canvas centre (`references[k]`, its tokens
    `reference_regions[k]`, paired by offset from the region's top-left). Identity survives, the layout signal
    (which the encoder spreads over object AND background tokens) does not. What it controls for: a drop in
    accuracy means the model read positions from the vision features; accuracy kept means it reads them from
    the LM's token positions (or, as on the Shapes organisms, needs no position at all). Scored by the top
    candidate (candidates [batch, k], answer = index into candidates)."""
    if len(object_regions) != len(references) or len(references) != len(reference_regions):
        raise ValueError("object_regions, references and reference_regions need one entry per object")
    layout = model.layout(inputs)
    empty_layout = model.layout(empty)
    base = lambda lay: lay.image_positions(0) & (lay.crop == 0)  # noqa: E731  (the first image's base grid)
    empty_pairs = pair_positions(layout, base(layout), empty_layout, base(empty_layout))
    names = [hook_name]
    _, empty_cache = run_cached(model, empty, names)
    edits: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]] = [(empty_cache[hook_name], empty_pairs)]
    for region, ref, ref_region in zip(object_regions, references, reference_regions):
        _, c = run_cached(model, ref, names)
        edits.append((c[hook_name], pair_positions(layout, region, model.layout(ref), ref_region)))
    hooks = [(hook_name, interchange_hook(src, pairs)) for src, pairs in edits]  # in order: background, objects
    mask = inputs.get("attention_mask")
    clean = candidate_probs(model(**inputs), mask, candidates)
    with model.hooks(fwd_hooks=hooks):
        ablated = candidate_probs(model(**inputs), mask, candidates)
    a = answer.cpu().long()
    return VisionAblationResult(rate(clean.argmax(1) == a), rate(ablated.argmax(1) == a), clean, ablated)
