"""Detector for binding IDs in VLMs (arXiv 2505.22200): mean interventions with PAIRED, PER-TOKEN Delta vectors, the
context frozen, on any fixed-layout two-object Shapes organism.

Protocol (after the authors' public code; /work/shared/notes/papers.md "Protocol details"):
- contexts are aligned as in the paper: the object in image block k (slot 0 upper-left, slot 1 lower-right) is the
  k-th the context mentions, so entity k = object slot k = colour slot k = item slot k;
- Delta_X is estimated from paired prompts in which the same thing sits in slot 1 in one prompt and in slot 0 in the
  other, per token of the slot and per layer (resid_pre), averaged over both directions of every pair:
  object: the image with the two objects' positions swapped (tokens of block 1 vs block 0, patch by patch);
  colour: the same image with the two context sentences in the other order (colour word and the token after it);
  item: the same image and sentences with the two item letters exchanged (the token before the letter and the letter);
- on other prompts, asking about each object in turn: slot 0 := clean + Delta and slot 1 := clean - Delta at every
  layer, every other context position (image and context sentences) held at its clean residual (frozen context);
- readout: the argmax over the two context items; the effect is the share of answers that become the other
  object's item; the control adds a random vector of the same norm per token and layer (same protocol).

LEAD: this module carries its own paired per-token estimator (`paired_deltas`, `mean_swap`) because analyses/binding.py
is being rewritten in parallel; switch these onto the new analyses/binding.py functions after merging.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Finding

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

PAPER = "2505.22200"
KINDS = ("object", "colour", "item")
SYMBOL = {"object": "O", "colour": "C", "item": "I"}
BLOCKS = {0: (0.0, 0.0, 0.5, 0.5), 1: (0.5, 0.5, 1.0, 1.0)}  # image fractions of the fixed layout's two blocks


def aligned(scene: Any) -> Any:
    """The scene with the block-0 object mentioned first (the paper's contexts)."""
    return replace(scene, mention_order=tuple(sorted(range(2), key=lambda i: scene.slots[i])))


def _prompts(model: "HookedVLM", scenes: Sequence[Any], targets: Sequence[int]) -> dict[str, Any]:
    from hooked_vlm.organism.shapes import prompt_text, render

    return dict(model.processor(images=[render(s) for s in scenes],
                                text=[prompt_text(s, "shape_item", t) for s, t in zip(scenes, targets)],
                                return_tensors="pt", padding=True))


def slot_masks(model: "HookedVLM", inputs: dict[str, Any], scenes: Sequence[Any]) -> dict[str, list[Tensor]]:
    """{kind: [slot 0 mask, slot 1 mask]} ([batch, pos] each) for aligned prompts: the image tokens of block k; the
    k-th colour word and the token after it; the token before the k-th item letter and the letter."""
    from hooked_vlm.analyses.toolkit import word_positions

    layout = model.layout(inputs)
    ids = inputs["input_ids"]
    out: dict[str, list[Tensor]] = {k: [] for k in KINDS}
    for k in (0, 1):
        out["object"].append(layout.in_box(*BLOCKS[k]).cpu())
        objs = [s.mention_order[k] for s in scenes]
        colour = word_positions(model, ids, [s.colours[i] for s, i in zip(scenes, objs)], 0)
        item = word_positions(model, ids, [s.items[i] for s, i in zip(scenes, objs)], 0)
        out["colour"].append(colour | torch.roll(colour, 1, 1))
        out["item"].append(item | torch.roll(item, -1, 1))
    counts = {kind: {int(m.sum(1).min()) for m in masks} | {int(m.sum(1).max()) for m in masks}
              for kind, masks in out.items()}
    for kind, c in counts.items():
        if len(c) != 1 or 0 in c:
            raise ValueError(f"binding_ids: the {kind} slots must hold the same number (> 0) of tokens in every prompt "
                             f"and both slots, got {sorted(c)}: is this a fixed-layout two-object Shapes organism?")
    return out


def _gather(cache: dict[str, Tensor], names: Sequence[str], mask: Tensor) -> Tensor:
    """[n_layers, batch, n_tok, d] of the cached residuals at the (equally many per prompt) masked positions."""
    b = mask.shape[0]
    return torch.stack([cache[n][mask.to(cache[n].device)].float().reshape(b, -1, cache[n].shape[-1]).cpu()
                        for n in names])


@torch.no_grad()
def paired_deltas(model: "HookedVLM", scenes: Sequence[Any]) -> dict[str, Tensor]:
    """{kind: Delta [n_layers, n_tok, d_model]}: the paired per-token binding-ID difference, slot 1 minus slot 0
    (module docstring), over ``scenes`` (aligned)."""
    from hooked_vlm.analyses.binding import resid_names
    from hooked_vlm.analyses.toolkit import run_cached

    names = resid_names(model)
    base = [aligned(s) for s in scenes]
    partners = {
        "object": [aligned(replace(s, boxes=s.boxes[::-1])) for s in base],
        "colour": [replace(s, mention_order=s.mention_order[::-1]) for s in base],
        "item": [replace(s, items=s.items[::-1]) for s in base],
    }
    targets = [0] * len(base)
    a_in = _prompts(model, base, targets)
    a_slots = slot_masks(model, a_in, base)
    _, a_cache = run_cached(model, a_in, names)
    out = {}
    for kind, other in partners.items():
        b_in = _prompts(model, other, targets)
        b_slots = slot_masks(model, b_in, other)
        _, b_cache = run_cached(model, b_in, names)
        # the same thing in slot 1 of one prompt and slot 0 of the other, both directions
        d1 = _gather(a_cache, names, a_slots[kind][1]) - _gather(b_cache, names, b_slots[kind][0])
        d2 = _gather(b_cache, names, b_slots[kind][1]) - _gather(a_cache, names, a_slots[kind][0])
        out[kind] = torch.cat([d1, d2], 1).mean(1)
    return out


def random_like(delta: Tensor, seed: int) -> Tensor:
    """Random directions with the norm of ``delta`` per layer and token (the paper's control)."""
    r = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed))
    return r / r.norm(dim=-1, keepdim=True) * delta.norm(dim=-1, keepdim=True)


@torch.no_grad()
def mean_swap(model: "HookedVLM", inputs: dict[str, Any], clean: dict[str, Tensor], slots: Sequence[Tensor],
              delta: Tensor, freeze: Tensor) -> Tensor:
    """Logits with slot 0 := clean + Delta and slot 1 := clean - Delta (per token and layer), the positions in
    ``freeze`` (the context) held at their clean residuals at every layer."""
    from hooked_vlm.analyses.binding import resid_names, run_with_resid

    names = resid_names(model)
    targets = {}
    for l, n in enumerate(names):
        x = clean[n].clone()
        for sign, mask in ((1.0, slots[0]), (-1.0, slots[1])):
            m = mask.to(x.device)
            x[m] = (x[m].reshape(m.shape[0], -1, x.shape[-1]) + sign * delta[l].to(x.device, x.dtype)).reshape(-1, x.shape[-1])
        targets[n] = x
    return run_with_resid(model, inputs, targets, freeze | slots[0] | slots[1])


def _two_item_choice(model: "HookedVLM", logits: Tensor, inputs: dict[str, Any], scenes: Sequence[Any]) -> np.ndarray:
    """Index (0 / 1) of the object whose item wins the argmax over the two context items."""
    from hooked_vlm.analyses.metrics import final_logits

    fl = final_logits(logits, inputs.get("attention_mask")).float().cpu()
    tok = model.tokenizer
    ids = torch.tensor([[tok.convert_tokens_to_ids(s.items[i]) for i in range(2)] for s in scenes])
    return fl.gather(1, ids).argmax(1).numpy()


@torch.no_grad()
def detect(model: "HookedVLM", *, n: int = 64, seed: int = 0) -> list[Finding]:
    """Delta_O, Delta_C, Delta_I at 1x (paired per-token, frozen context): the share of answers swapped to the other
    object's item, against a same-norm random-vector control. ``n`` scenes for the Deltas and ``n`` others asked
    about both objects (2n questions)."""
    from hooked_vlm.analyses.binding import resid_names
    from hooked_vlm.analyses.tasks import shapes_context
    from hooked_vlm.analyses.toolkit import run_cached
    from hooked_vlm.analyses.toolkit.stats import rate
    from hooked_vlm.organism.shapes import ShapesGenerator

    if n < 1:
        raise ValueError(f"binding_ids.detect: n must be >= 1, got {n}")
    gen = ShapesGenerator(seed)
    fit = [aligned(gen.scene()) for _ in range(n)]
    ev = [aligned(gen.scene()) for _ in range(n)]
    deltas = paired_deltas(model, fit)
    scenes = ev + ev
    targets = [s.mention_order[0] for s in ev] + [s.mention_order[1] for s in ev]  # slot 0 then slot 1 object
    inputs = _prompts(model, scenes, targets)
    slots = slot_masks(model, inputs, scenes)
    freeze = shapes_context(model, inputs)
    logits, clean = run_cached(model, inputs, resid_names(model))
    truth = np.array(targets)
    base = _two_item_choice(model, logits, inputs, scenes)
    base_acc = rate((base == truth).astype(float))
    findings = []
    for j, kind in enumerate(KINDS):
        res = {}
        for name, d in (("delta", deltas[kind]), ("random", random_like(deltas[kind], seed + 101 + j))):
            choice = _two_item_choice(model, mean_swap(model, inputs, clean, slots[kind], d, freeze), inputs, scenes)
            res[name] = rate((choice == 1 - truth).astype(float))
        e, c = res["delta"], res["random"]
        findings.append(Finding(
            paper=PAPER, effect=f"Delta_{SYMBOL[kind]} ({kind} slot) swaps answers at 1x", estimate=e.value,
            # the Wilson bound at a rate of 1 can come out as 1 - 1e-16: keep the estimate inside its interval
            ci_low=min(e.ci_low, e.value), ci_high=max(e.ci_high, e.value), n=e.n, control_ci_high=c.ci_high,
            detail={"control": "same-norm random vector per token and layer", "control_estimate": c.value,
                    "control_ci": [c.ci_low, c.ci_high], "baseline_accuracy": base_acc.value,
                    "baseline_ci": [base_acc.ci_low, base_acc.ci_high],
                    "delta_norm_per_layer": [round(float(x), 4) for x in deltas[kind].norm(dim=-1).mean(-1)],
                    "protocol": "paired per-token Delta (resid_pre, all layers), +Delta slot 0 / -Delta slot 1, "
                                "context frozen; readout argmax over the two context items; both objects asked"}))
    return findings


@torch.no_grad()
def paper_pattern(model: Any, n: int = 32, seed: int = 0) -> dict[str, Any]:
    """2505.22200's factorizability matrices and position independence on a Shapes organism (a HookedVLM), with the
    analyses/tasks.py functions on main (context frozen, slots in mention order)."""
    from hooked_vlm.analyses.tasks import shapes_factorizability, shapes_position_swap

    mats, rows, cols = shapes_factorizability(model, n=n, seed=seed)
    fr = (0.0, 0.5, 1.0)
    pos = {kind: shapes_position_swap(model, kind=kind, n=2 * n, seed=seed, fractions=fr)
           for kind in ("object", "colour", "item")}
    return {"factorizability": {"rows (questions)": rows, "columns (answers)": cols, "n_pairs": n,
                                "matrices": {k: [[round(float(x), 3) for x in r] for r in v] for k, v in mats.items()},
                                "note": "slot 0 of context c replaced by slot 0 of a disjoint context c' at every layer, "
                                        "context frozen; share of answers per candidate"},
            "position_swap": {"fractions": list(fr), "n": 2 * n,
                              **{k: {"kept": [round(x, 3) for x in v["kept"]], "swapped": [round(x, 3) for x in v["swapped"]]}
                                 for k, v in pos.items()},
                              "note": "keys of slots 0 and 1 re-rotated toward each other's positions, context frozen; "
                                      "questions about the slot-0 object"}}


def record(model: "HookedVLM", *, n: int = 64, seed: int = 0) -> dict[str, Any]:
    """The full measurement for organism.json (`hooked-vlm bench-effects --write-record`): the Findings with their
    details, and the paper's factorizability and position-independence pattern (`paper_pattern`)."""
    return {"findings": [f.to_dict() for f in detect(model, n=n, seed=seed)], "paper_pattern": paper_pattern(model)}
