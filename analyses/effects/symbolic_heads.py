"""Detector for visual symbolic mechanisms (Assouel et al., arXiv 2506.15871) on a Shapes organism.

The paper's task is scene description, "In this image there is a {colour} {shape} and a" -> the other object's
colour (the Shapes "scene" query), answered by three head types that pass a content-free position ID:
ID-retrieval heads (at the described object's words, fetch its position ID), ID-selection heads (at the final
token, turn it into the other object's ID) and feature-retrieval heads (at the final token, read the colour of
the object at that ID). The causal-mediation score of a head is
s = (M(c1*)[a1*] - M(c1*)[a1]) - (M(c1)[a1*] - M(c1)[a1]) with the head's output patched from the counterfactual
(analyses/heads.py). Every head is chosen on one split of prompts (A) and judged on another (B).

Findings (larger = more effect; detected = the interval clears its control, analyses/effects/base.py):

1. ID retrieval: swap the objects' positions, patch at the described-object words, a1* = the described object's
   own colour (what the answer becomes if the position IDs are exchanged). Estimate = the top head's (chosen on
   A) mean score on B in units of the clean answer margin (logit[a1] - logit[a1*]; 1 = a tie, 2 = reversed),
   95% bootstrap interval; control = the highest upper bound among every OTHER head's interval. Detected = the
   top head's interval excludes every other head's.
2. ID selection: the same at the final token.
3. Feature retrieval by position: the top feature-retrieval head (change the answer object's colour, final
   token, chosen on A) must read the object a position ID points to. On B the final token's residual stream at
   that head's layer input is patched from the positions-swapped run; estimate = the share of prompts whose head
   now puts more attention on the described object's patches than on the answer object's (Wilson); control = the
   same share when the residual comes from the colour-changed run (content moves, positions do not). The plain
   rank-1 score of this preset (a head that reads the answer colour exists in any model that answers) is in
   ``detail``, not the decision.
4. Intervention: the top ID-selection head (final-token score on the swapped-positions pairs of A, k = 1) gets
   alpha * (d_t - d_o) added at the final token, d_t / d_o = its mean output when the answer object sits in
   image slot 1 / slot 0 (A); judged on B's prompts whose answer object is in slot 0: share now answering the
   colour of the object in slot 1 (analyses/heads.py `intervention_protocol`, alpha = 1, Wilson) against 32
   draws of one random head (t interval over the draws).

Prompts are two-object scenes in the fixed layout (one object per 32x32 slot), ``split`` of the Shapes
generator (default "train").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .base import Finding

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

PAPER = "2506.15871"
ALPHAS = (1.0, 2.0)
ALPHA = 1.0  # the alpha the intervention finding reports: moves the head's mean output from slot 0's to slot 1's


def _labels(model: "HookedVLM") -> list[str]:
    n_h = model.cfg.n_heads
    return [f"L{i // n_h}H{i % n_h}" for i in range(model.cfg.n_layers * n_h)]


def _pairs(model: "HookedVLM", n: int, seed: int, kind: str, split: str) -> tuple[Any, Any]:
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    pairs = ShapesGenerator(seed).pairs(n, kind, "scene", split=split)
    return encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])


def _metric_values(model: "HookedVLM", metric: Any, inputs: dict[str, Any]) -> torch.Tensor:
    from hooked_vlm.analyses.toolkit import metric_values

    return metric_values(metric, model(**inputs)).detach().float()


@torch.no_grad()
def preset_scores(model: "HookedVLM", preset: str, clean: Any, cf: Any) -> tuple[torch.Tensor, float]:
    """(per-prompt scores [layer, head, batch] in units of the preset's scale, the scale in logits) of one of the
    paper's presets: "id_retrieval" / "id_selection" (clean, cf = swap_positions pairs; scale = the mean clean
    margin logit[a1] - logit[a1*]) or "feature_retrieval" (change_colour pairs; scale = the mean full effect of
    the counterfactual on logit[a1*] - logit[a1])."""
    from hooked_vlm.analyses import heads
    from hooked_vlm.analyses.metrics import LogitDiff
    from hooked_vlm.analyses.tasks import shapes_described_positions

    mask = clean.inputs["attention_mask"]
    if preset in ("id_retrieval", "id_selection"):
        metric = LogitDiff(clean.wrong, clean.answer, mask)  # a1* = the described object's colour
        scale = float(-_metric_values(model, metric, clean.inputs).mean())
        if preset == "id_retrieval":
            scores = heads.id_retrieval_scores(
                model, clean.inputs, cf.inputs, metric, per_prompt=True, progress=False,
                positions=shapes_described_positions(model, clean.inputs, clean.samples),
                corrupt_positions=shapes_described_positions(model, cf.inputs, cf.samples))
        else:
            scores = heads.id_selection_scores(model, clean.inputs, cf.inputs, metric, per_prompt=True, progress=False)
    elif preset == "feature_retrieval":
        metric = LogitDiff(cf.answer, clean.answer, mask)
        scale = float((_metric_values(model, metric, cf.inputs) - _metric_values(model, metric, clean.inputs)).mean())
        scores = heads.feature_retrieval_scores(model, clean.inputs, cf.inputs, metric, per_prompt=True, progress=False)
    else:
        raise ValueError(f"preset must be 'id_retrieval', 'id_selection' or 'feature_retrieval', got {preset!r}")
    return scores / (scale if scale > 0 else 1.0), scale


def _interval(values: np.ndarray, seed: int) -> Any:
    from hooked_vlm.analyses.toolkit.stats import bootstrap

    return bootstrap(values, seed=seed)


def rank_one(scores_a: torch.Tensor, scores_b: torch.Tensor, labels: Sequence[str], seed: int) -> dict[str, Any]:
    """The top head on split A and, on split B, its mean score's bootstrap interval against every other head's
    (paired resamples: the same prompts for every head), with its rank interval (toolkit rank_stability)."""
    from hooked_vlm.analyses.toolkit.stats import rank_stability

    top = int(scores_a.mean(-1).flatten().argmax())
    flat = scores_b.flatten(0, 1).T.double().numpy()  # [prompt, head]
    ests = [_interval(flat[:, i], seed) for i in range(flat.shape[1])]
    others = [i for i in range(flat.shape[1]) if i != top]
    rival = max(others, key=lambda i: ests[i].ci_high)
    stab = rank_stability(flat, 1, labels=list(labels), seed=seed)
    return {"top": labels[top], "top_index": top, "estimate": ests[top], "rival": labels[rival],
            "rival_estimate": ests[rival], "rank_on_b": int(stab.rank[top]),
            "rank_ci_on_b": [int(v) for v in stab.rank_ci[top]], "rank1_share_on_b": float(stab.in_top_k[top]),
            "mean_scores_b": {labels[i]: round(float(flat[:, i].mean()), 4) for i in range(flat.shape[1])}}


def _head_finding(effect: str, r: dict[str, Any], scale: float, n: int) -> Finding:
    e, rival = r["estimate"], r["rival_estimate"]
    return Finding(
        paper=PAPER, effect=effect, estimate=e.value, ci_low=min(e.ci_low, e.value), ci_high=max(e.ci_high, e.value),
        n=n, control_ci_high=rival.ci_high,
        detail={"top_head": r["top"], "best_other_head": r["rival"], "best_other_head_score": rival.to_dict(),
                "rank_on_b": r["rank_on_b"], "rank_ci_on_b": r["rank_ci_on_b"], "rank1_share_on_b": r["rank1_share_on_b"],
                "scale_logits": round(scale, 4), "mean_scores_b": r["mean_scores_b"],
                "units": "score / scale (the preset's scale in logits, see preset_scores)",
                "decision": "the top head (chosen on split A) has a bootstrap interval on split B above every other "
                            "head's"})


def _object_keys(model: "HookedVLM", inputs: dict[str, Any], samples: Sequence[Any], which: str) -> torch.Tensor:
    """[batch, pos] mask of the image tokens of each prompt's described ("described") or answer ("answer") object."""
    image = model.layout(inputs).image_positions()
    out = torch.zeros_like(image)
    for b, s in enumerate(samples):
        obj = s.target if which == "answer" else s.scene.partner(s.target)
        cols = image[b].nonzero().flatten()
        if len(cols) != 16:
            raise ValueError(f"expected the Shapes organisms' 16 image tokens per prompt, got {len(cols)}")
        out[b, cols[s.scene.object_patches(obj)]] = True
    return out


@torch.no_grad()
def position_read_switch(model: "HookedVLM", head: tuple[int, int], clean: Any, source: Any) -> np.ndarray:
    """Per prompt: does ``head`` put more attention (at the final token) on the described object's image tokens
    than on the answer object's, when the final token's resid_pre at the head's layer comes from ``source``?"""
    from hooked_vlm.analyses.heads import final_positions
    from hooked_vlm.analyses.toolkit import act_name, run_cached

    layer, h = head
    name = act_name("resid_pre", layer)
    _, cache = run_cached(model, source.inputs, [name])
    dst, src = final_positions(model, clean.inputs), final_positions(model, source.inputs)
    value = cache[name][src]  # [batch, d]
    pattern: dict[str, torch.Tensor] = {}

    def patch(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[dst.to(x.device)] = value.to(x.device, x.dtype)
        return x

    def grab(x: torch.Tensor, hook: Any) -> None:
        pattern["p"] = x[:, h].detach()

    with model.hooks(fwd_hooks=[(name, patch), (act_name("pattern", layer), grab)]):
        model(**clean.inputs)
    rows = pattern["p"][dst.to(pattern["p"].device)].float().cpu()  # [batch, key]
    described = (rows * _object_keys(model, clean.inputs, clean.samples, "described")).sum(-1)
    answer = (rows * _object_keys(model, clean.inputs, clean.samples, "answer")).sum(-1)
    return (described > answer).numpy()


def _slot_conditions(model: "HookedVLM", n: int, seed: int, split: str) -> tuple[Any, Any]:
    """(other, target) scene prompts: the answer object in image slot 0 / slot 1."""
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    samples = ShapesGenerator(seed).samples(3 * n, "scene", split=split)
    other = [s for s in samples if s.scene.slots[s.target] == 0][:n]
    target = [s for s in samples if s.scene.slots[s.target] == 1][:n]
    return encode(model.processor, other), encode(model.processor, target)


def detect(model: "HookedVLM", *, n: int = 64, seed: int = 0, split: str = "train", n_random: int = 32) -> list[Finding]:
    """The 2506.15871 protocol on a Shapes organism (module docstring): four Findings, each on ``n`` prompts of a
    held-out split B, heads chosen on split A."""
    from hooked_vlm.analyses.heads import intervention_protocol
    from hooked_vlm.analyses.metrics import LogitDiff
    from hooked_vlm.analyses.toolkit.stats import rate

    if n < 8:
        raise ValueError(f"symbolic_heads.detect: n must be >= 8 prompts per split, got {n}")
    labels = _labels(model)
    n_h = model.cfg.n_heads
    seeds = {"a": 1000 * seed + 101, "b": 1000 * seed + 202}
    pos = {k: _pairs(model, n, s, "swap_positions", split) for k, s in seeds.items()}
    col = {k: _pairs(model, n, s + 7, "change_colour", split) for k, s in seeds.items()}
    findings = []
    ranks = {}
    for preset, pairs, effect in (
            ("id_retrieval", pos, "ID-retrieval head (swap positions, described-object words): top head's score "
                                  "vs every other head"),
            ("id_selection", pos, "ID-selection head (swap positions, final token): top head's score vs every "
                                  "other head"),
            ("feature_retrieval", col, None)):
        sa, _ = preset_scores(model, preset, *pairs["a"])
        sb, scale = preset_scores(model, preset, *pairs["b"])
        ranks[preset] = rank_one(sa, sb, labels, seed)
        if effect is not None:
            findings.append(_head_finding(effect, ranks[preset], scale, n))
    fr = ranks["feature_retrieval"]
    head = divmod(fr["top_index"], n_h)
    moved = position_read_switch(model, head, pos["b"][0], pos["b"][1])
    content = position_read_switch(model, head, col["b"][0], col["b"][1])
    e, c = rate(moved.astype(float)), rate(content.astype(float))
    findings.append(Finding(
        paper=PAPER, n=n, estimate=e.value, ci_low=e.ci_low, ci_high=e.ci_high, control_ci_high=c.ci_high,
        effect="feature-retrieval head reads by position ID: its attention moves to the described object when the "
               "final token's residual comes from the positions-swapped run",
        detail={"head": fr["top"], "control": c.to_dict(),
                "control_means": "residual from the colour-changed run (same positions)",
                "rank1": {"top_head": fr["top"], "score": fr["estimate"].to_dict(), "best_other_head": fr["rival"],
                          "best_other_score": fr["rival_estimate"].to_dict(), "rank_ci_on_b": fr["rank_ci_on_b"],
                          "excludes_every_other_head": bool(fr["estimate"].ci_low > fr["rival_estimate"].ci_high),
                          "mean_scores_b": fr["mean_scores_b"]}}))
    clean_a, cf_a = pos["a"]
    other_a, target_a = _slot_conditions(model, n, seeds["a"] + 3, split)
    other_b, _ = _slot_conditions(model, n, seeds["b"] + 3, split)
    select = (clean_a.inputs, cf_a.inputs, LogitDiff(clean_a.wrong, clean_a.answer, clean_a.inputs["attention_mask"]))
    res = intervention_protocol(model, select, (other_a.inputs, target_a.inputs), (other_b.inputs, other_b.wrong),
                                k=1, alphas=ALPHAS, n_random=n_random, seed=seed, progress=False)
    eff, ctl = res.efficacy[ALPHA], res.random[ALPHA]
    findings.append(Finding(
        paper=PAPER, n=eff.n, estimate=eff.value, ci_low=eff.ci_low, ci_high=eff.ci_high, control_ci_high=ctl.ci_high,
        effect=f"alpha*(d_t - d_o) on the top ID-selection head (slot 0 -> slot 1, alpha {ALPHA:g}) switches answers "
               "vs one random head",
        detail={"heads": [f"L{l}H{h}" for l, h in res.heads], "random_draws": res.n_random,
                "random": ctl.to_dict(), "random_sd": ctl.sd,
                "per_alpha": [{k: (v if k == "alpha" else dict(v)) for k, v in row.items()} for row in res.rows()]}))
    return findings


def record(model: "HookedVLM", *, n: int = 64, seed: int = 0) -> dict[str, Any]:
    """The full measurement for organism.json (`hooked-vlm bench-effects --write-record`): the planted heads' attention
    masses and held-out interchange accuracies (analyses/effects/symbolic_record.py, 256 scene prompts) on a Shapes
    organism with the symbolic-heads stages, and the Findings with their details."""
    from .symbolic_record import planted_report

    return {"planted_heads": planted_report(model), "findings": [f.to_dict() for f in detect(model, n=n, seed=seed)]}
