"""Narrow-gate detector (Serra et al. 2024, arXiv 2412.06646) for `hooked-vlm bench-effects`: does image information
reach the text only through the end-of-image position?

The paper's two experiments (analyses/narrow_gate.py), on ``n`` training-distribution shape -> item prompts of the
Shapes task and their shape-swapped twins (the swap moves the queried shape onto the other object, so the answer
flips), on any Shapes organism:

1. **Knockout.** Attention from every text token after the image to the end-of-image position is zeroed in every
   layer and head (post-softmax, no renormalisation: the paper's protocol). Estimate: the share of prompts answered
   right at baseline that the knockout makes wrong. Control: the same knockout on a random ~2% of the image tokens
   (at least one), over 5 seeds, as the paper's random condition.
2. **Steering.** The end-of-image residual stream (resid_pre, every layer) is patched from the run on the shape-
   swapped image. Estimate: the share of eligible prompts (unsteered answer != the swapped image's answer) whose
   answer becomes the swapped image's answer. Control: the same patch at one random text position after the image
   (never the end-of-image position nor the answer position), over 5 seeds.

Where the family has no end-of-image token (LLaVA) the first text position after the image stands in, as the paper
does for LLaVA-1.5. Answers are the argmax over the items the context names (chance 0.5 for two objects).

Intervals: prompt-level Wilson intervals (analyses/toolkit/stats.py `rate`). A random control pools its seeds into
one share per prompt and takes the Wilson interval of that share at the number of PROMPTS, not prompts x seeds: the
seeds re-use the same prompts, so pooling them must not narrow the control's interval as if they were new prompts
(a control that never moves an answer on 64 prompts keeps an upper bound of 0.057, not 0.012).

Both estimates are shares of answers, oriented so that larger = more of the effect; `detect` returns them as
Findings (analyses/effects/base.py's rule: detected when the estimate's interval clears the control's). `record`
returns the full measurement organism.json keeps (`hooked-vlm bench-effects --write-record`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from hooked_vlm.organism import shapes as S

from .. import narrow_gate as NG
from ..metrics import final_logits
from ..toolkit import Estimate, rate
from .base import Finding

PAPER = "2412.06646"
SEED_OFFSET = 60_000  # prompts come from ShapesGenerator(SEED_OFFSET + seed): seed 0 = the prompts organism.json records
KNOCKOUT_EFFECT = "accuracy lost when text -> end-of-image attention is knocked out"
STEERING_EFFECT = "steering through the end-of-image residual moves answers"


@dataclass
class GateRun:
    """Per-prompt outcomes of one run of the protocol (bool arrays over the n prompts; [seeds, n] for controls)."""

    n_image: int  # image tokens per prompt
    k_random: int  # image tokens in the random knockout
    marker: bool  # True: a real end-of-image token; False: the first text position after the image stands in
    base: dict[str, np.ndarray]  # metric -> right at baseline
    eoi: dict[str, np.ndarray]  # metric -> right with text -> end-of-image knocked out
    rand: dict[str, np.ndarray]  # metric -> [seeds, n] right with text -> k random image tokens knocked out
    follows: np.ndarray  # under the end-of-image knockout the answer still differs between the image and its twin
    steer_flipped: np.ndarray
    steer_eligible: np.ndarray
    ctrl_flipped: np.ndarray  # [seeds, n]: the same patch at a random text position
    ctrl_eligible: np.ndarray  # [seeds, n]


def pooled_rate(hits: np.ndarray, confidence: float = 0.95) -> Estimate:
    """A random control's share over seeds x prompts (bool [seeds, n]) with the Wilson interval at n = the number of
    prompts: each prompt counts once, with its share over the seeds (module docstring)."""
    hits = np.asarray(hits, dtype=float)
    if hits.ndim != 2 or hits.shape[1] == 0:
        raise ValueError(f"pooled_rate: expected [seeds, prompts] outcomes, got shape {hits.shape}")
    from statistics import NormalDist

    n, p = hits.shape[1], float(hits.mean())
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, confidence, "wilson over prompts, seeds pooled")


def _inputs(model: Any, samples: Sequence[S.Sample]) -> dict[str, Any]:
    return dict(model.processor(images=[s.image for s in samples], text=[s.prompt for s in samples],
                                return_tensors="pt", padding=True))


def _random_text_positions(layout: Any, seed: int) -> Tensor:
    """Bool [batch, pos]: one random text position after the image per prompt, never the end-of-image position and
    never the last token (patching the answer position would move the answer by construction)."""
    allowed = layout.text_after_image() & ~layout.end_of_image() & ~layout.final_token()
    if not bool(allowed.any(1).all()):
        raise ValueError("steering control: a prompt has no text position after the image besides the end-of-image "
                         "position and the last token")
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(allowed)
    for b in range(allowed.shape[0]):
        idx = allowed[b].nonzero().flatten()
        out[b, idx[int(torch.randint(len(idx), (1,), generator=gen))]] = True
    return out


@torch.no_grad()
def run_protocol(model: Any, *, n: int = 64, seed: int = 0, random_seeds: int = 5, random_fraction: float = 0.02,
                 split: str = "train") -> GateRun:
    """The knockout and steering runs with their controls (module docstring), per prompt.

    split: "train" (default): training-distribution scenes. Not the held-out split: its held-out (colour, shape, slot)
    triples make the answer partly predictable from the text, so an image-blind model scores ~0.38 there rather than
    0.5 (measured on shapes_qwen2_vl_gate, 256 prompts, two seeds)."""
    if n < 1 or random_seeds < 1:
        raise ValueError(f"run_protocol: n and random_seeds must be >= 1, got n={n}, random_seeds={random_seeds}")
    pairs = S.ShapesGenerator(SEED_OFFSET + seed).pairs(n, "swap_shapes", "shape_item", split=split)
    clean, swapped = [p for p, _ in pairs], [q for _, q in pairs]
    tok = model.processor.tokenizer
    inputs, src = _inputs(model, clean), _inputs(model, swapped)
    mask = inputs.get("attention_mask")
    item_ids = torch.tensor(tok.convert_tokens_to_ids(list(S.ITEMS)))
    answers = np.array(tok.convert_tokens_to_ids([s.answer for s in clean]))

    def scores(logits: Tensor) -> dict[str, np.ndarray]:
        last = final_logits(logits, mask)
        two = []  # argmax over the items the context names: chance is 1 / (number of objects)
        for row, s in zip(last, clean):
            ids = tok.convert_tokens_to_ids(sorted(s.scene.items))
            two.append(ids[int(row[ids].argmax())])
        return {"two_item": np.array(two) == answers, "full_vocab": last.argmax(-1).numpy() == answers}

    layout = model.layout(inputs)
    n_image = int(layout.image_positions().sum(1).min())
    k = NG.random_key_count(layout, random_fraction)
    base = scores(model(**inputs))
    eoi_logits = NG.run_with_knockout(model, inputs, "end_of_image")
    eoi = scores(eoi_logits)
    src_eoi = NG.run_with_knockout(model, src, "end_of_image")
    follows = (final_logits(eoi_logits, mask).argmax(-1) != final_logits(src_eoi, src.get("attention_mask")).argmax(-1)).numpy()
    rand_runs = [scores(NG.run_with_knockout(model, inputs, layout.random_image_tokens(k, seed=s)))
                 for s in range(random_seeds)]
    rand = {m: np.stack([r[m] for r in rand_runs]) for m in base}

    target = tok.convert_tokens_to_ids([q.answer for q in swapped])

    def steer(positions: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        res = NG.steer_end_of_image(model, inputs, src, target, candidates=item_ids, positions=positions)
        return res.flipped.numpy(), (res.base_predictions != torch.tensor(target)).numpy()

    flipped, eligible = steer(None)
    ctrl = [steer(_random_text_positions(layout, s)) for s in range(random_seeds)]
    return GateRun(n_image, k, bool(layout.has_end_of_image_token), base, eoi, rand, follows, flipped, eligible,
                   np.stack([c[0] for c in ctrl]), np.stack([c[1] for c in ctrl]))


def _est(e: Estimate) -> dict[str, Any]:
    return {"value": round(e.value, 4), "ci_low": round(e.ci_low, 4), "ci_high": round(e.ci_high, 4), "n": e.n}


def _where(run: GateRun) -> str:
    return ("the end-of-image token" if run.marker else
            "the first text position after the image (no end-of-image token in this family, as the paper does for LLaVA)")


def findings(run: GateRun, metric: str = "two_item") -> list[Finding]:
    """The two Findings of a `run_protocol` run (module docstring), on `metric` ("two_item" or "full_vocab")."""
    right = run.base[metric]
    if not right.any():
        raise ValueError("narrow-gate detector: no prompt is answered right at baseline, so no accuracy can be lost; "
                         "is this a Shapes organism?")
    lost = rate(~run.eoi[metric][right])
    lost_ctrl = pooled_rate(~run.rand[metric][:, right])
    ko = Finding(PAPER, KNOCKOUT_EFFECT, lost.value, lost.ci_low, lost.ci_high, lost.n,
                 control_ci_high=lost_ctrl.ci_high, detail={
                     "estimate": "share of the prompts answered right at baseline that the knockout makes wrong "
                                 f"(text -> {_where(run)}, every layer and head, post-softmax zeroing without "
                                 f"renormalisation; {metric} accuracy)",
                     "control": f"the same with text -> {run.k_random} random of {run.n_image} image tokens "
                                f"(~2%, at least 1), {run.rand[metric].shape[0]} seeds pooled per prompt",
                     "control_estimate": _est(lost_ctrl),
                     "control_per_seed": [round(float((~r[right]).mean()), 4) for r in run.rand[metric]],
                     "baseline_accuracy": _est(rate(right)),
                     "knockout_accuracy": _est(rate(run.eoi[metric])),
                     "knockout_answer_follows_image": _est(rate(run.follows)),
                 })
    if not run.steer_eligible.any():
        raise ValueError("narrow-gate detector: every prompt already gives the swapped image's answer; steering "
                         "cannot be measured")
    moved = rate(run.steer_flipped[run.steer_eligible])
    ctrl_hits = np.where(run.ctrl_eligible, run.ctrl_flipped, False)  # an ineligible prompt cannot count as moved
    moved_ctrl = pooled_rate(ctrl_hits)
    st = Finding(PAPER, STEERING_EFFECT, moved.value, moved.ci_low, moved.ci_high, moved.n,
                 control_ci_high=moved_ctrl.ci_high, detail={
                     "estimate": f"resid_pre of {_where(run)} patched at every layer from the run on the shape-swapped "
                                 "image: share of eligible prompts (unsteered answer != the swapped image's answer) "
                                 "whose answer (argmax over the items) becomes the swapped image's answer",
                     "control": "the same patch at one random text position after the image (not the end-of-image "
                                f"position, not the last token), {run.ctrl_flipped.shape[0]} seeds pooled per prompt",
                     "control_estimate": _est(moved_ctrl),
                     "control_per_seed": [round(float(f[e].mean()) if e.any() else float("nan"), 4)
                                          for f, e in zip(run.ctrl_flipped, run.ctrl_eligible)],
                 })
    return [ko, st]


def detect(model: Any, *, n: int = 64, seed: int = 0) -> list[Finding]:
    """The narrow-gate Findings on a Shapes organism (module docstring): the knockout's lost accuracy and the
    steering success, each against its random control."""
    return findings(run_protocol(model, n=n, seed=seed))


@torch.no_grad()
def record(model: Any, *, n: int = 256, seed: int = 0, steer_layers: bool = True) -> dict[str, Any]:
    """The full measurement for organism.json (`hooked-vlm bench-effects --write-record`): accuracy (two-item and
    full-vocabulary argmax) at baseline, under the end-of-image knockout and under the random knockout; whether the
    knocked-out answer still follows the image; steering at every layer at once and (``steer_layers``) one layer at a
    time; the Findings and their controls. Every rate with a 95% Wilson interval."""
    run = run_protocol(model, n=n, seed=seed)
    out: dict[str, Any] = {
        "n_prompts": n, "prompts": f"shape_item, split 'train', ShapesGenerator({SEED_OFFSET + seed}), swap_shapes pairs",
        "end_of_image": _where(run),
        "accuracy_metric": "two_item = argmax over the items the context names (chance 0.5 for two objects); "
                           "full_vocab = argmax over the whole vocabulary"}
    for metric in ("two_item", "full_vocab"):
        out[metric] = {
            "baseline": _est(rate(run.base[metric])),
            "knockout_text_to_end_of_image": _est(rate(run.eoi[metric])),
            f"knockout_text_to_random_{run.k_random}_image_tokens": {
                **_est(pooled_rate(run.rand[metric])),
                "per_seed": [round(float(r.mean()), 4) for r in run.rand[metric]],
                "note": f"{run.k_random} of {run.n_image} image tokens (~2%, at least 1), {run.rand[metric].shape[0]} "
                        "seeds, each prompt's share over the seeds (Wilson interval over the prompts)"},
        }
    out["knockout_end_of_image_answer_follows_image"] = {
        **_est(rate(run.follows)),
        "note": "share of prompts whose answer (full-vocabulary argmax) under the text -> end-of-image knockout differs "
                "between the image and its shape-swapped twin: ~0 when the knockout leaves the text image-blind, ~1 "
                "when the text reads the image itself"}
    out["steering_end_of_image"] = {
        "all_layers": _est(rate(run.steer_flipped[run.steer_eligible])),
        "note": "resid_pre of the end-of-image position patched from the run on the shape-swapped image; share of "
                "eligible prompts (unsteered answer != swapped answer) whose answer (argmax over the items) becomes the "
                "swapped image's answer"}
    if steer_layers:
        pairs = S.ShapesGenerator(SEED_OFFSET + seed).pairs(n, "swap_shapes", "shape_item", split="train")
        tok = model.processor.tokenizer
        inputs, src = _inputs(model, [p for p, _ in pairs]), _inputs(model, [q for _, q in pairs])
        target = tok.convert_tokens_to_ids([q.answer for _, q in pairs])
        cands = torch.tensor(tok.convert_tokens_to_ids(list(S.ITEMS)))
        rows = NG.steering_sweep(model, inputs, src, target, candidates=cands)
        out["steering_end_of_image"]["per_layer"] = {str(r.layer): _est(r.flipped) for r in rows}
    out["findings"] = [f.to_dict() for f in findings(run)]
    return out
