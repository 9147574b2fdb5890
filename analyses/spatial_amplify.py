"""Amplification of 2603.22278 (Table 2) as the paper ran it.

h += alpha * sum_k proj_{w_k}(h) with proj_w(h) = (h . w / |w|^2) w, for every column w_k of the position probe
(`spatial_probes.probe_columns`: both columns of a binary probe), at the LM's layer-0 input
(`blocks.0.hook_resid_pre`), on image tokens only. The metric is the FIX RATE: among the prompts the unedited
model gets wrong (its failures), the share answered right after the edit, at the best single alpha for all
prompts (global) and at each prompt's best alpha (per-item oracle: fixed at any alpha of the sweep). The control
is a separately drawn random W (same shape, Gaussian, one draw per seed) swept over the same alphas and scored the
same way; the projection does not depend on the columns' norms, so the draw's scale does not matter.

The older `spatial.amplify(..., control_seed=...)` (one direction per binary probe, a norm-matched random addition)
stays as a documented option.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .criss_cross import candidate_probs
from .metrics import final_logits
from .spatial_base import as_sequence
from .toolkit import Estimate, over_seeds, rate

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Inputs = dict[str, Any]
DEFAULT_ALPHAS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def column_projection(h: Float[Tensor, "*rows d"], columns: Float[Tensor, "k d"]) -> Float[Tensor, "*rows d"]:
    """sum_k (h . w_k / |w_k|^2) w_k: the sum of h's projections on each column (not an orthogonal projection
    on their span when the columns are not orthogonal, as in the paper)."""
    w = columns.float().to(h.device)
    norm2 = (w * w).sum(-1).clamp_min(1e-24)
    return ((h.float() @ w.T) / norm2) @ w


def random_columns(k: int, d: int, seed: int) -> Float[Tensor, "k d"]:
    """The control: k Gaussian columns, drawn from `seed` (independent of the probe)."""
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def amplify_columns(
    model: "HookedVLM", inputs: Inputs, columns: Float[Tensor, "k d"], alpha: float | int,
    positions: Bool[Tensor, "batch pos"] | None = None, hook_name: str = "blocks.0.hook_resid_pre",
) -> Float[Tensor, "batch pos vocab"]:
    """Logits with h += alpha * column_projection(h, columns) at `positions` (default: image tokens) of hook_name."""
    layout = model.layout(inputs)
    positions = layout.image_positions() if positions is None else positions

    def hook(x: Tensor, hook: Any) -> Tensor:
        seq, back = as_sequence(x, layout)
        new = (seq.float() + alpha * column_projection(seq, columns)).to(seq.dtype)
        return back(torch.where(positions.to(seq.device)[..., None], new, seq))

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        return model(**inputs)


@dataclass
class SweepScores:
    """One W swept over alphas: `correct` [alpha, batch]; fix rates on the baseline's failures at the best global
    alpha (`best_alpha`) and at the per-item oracle; `broken`: share of the baseline's successes lost at best_alpha;
    `accuracy` per alpha."""

    correct: Tensor
    best_alpha: float
    fix_global: Estimate | None
    fix_oracle: Estimate | None
    broken: Estimate | None
    accuracy: list[Estimate]


def _score(correct: Tensor, base: Tensor, alphas: Sequence[float | int]) -> SweepScores:
    fail = ~base
    fixed = correct[:, fail]  # [alpha, n_fail]
    best = int(fixed.float().sum(1).argmax()) if fail.any() else 0
    return SweepScores(
        correct, float(alphas[best]),
        rate(fixed[best]) if fail.any() else None,
        rate(fixed.any(0)) if fail.any() else None,
        rate(~correct[best, base]) if base.any() else None,
        [rate(c) for c in correct])


@dataclass
class AmplificationResult:
    """`baseline`: accuracy without the edit; `probe`: the probe's W swept; `controls`: one per seed;
    `control_fix_global` / `control_fix_oracle`: the controls' fix rates, mean and t interval over seeds."""

    alphas: list[float]
    baseline: Estimate
    n_failures: int
    probe: SweepScores
    controls: list[SweepScores] = field(default_factory=list)
    control_fix_global: Estimate | None = None
    control_fix_oracle: Estimate | None = None

    def summary(self) -> dict[str, Any]:
        d = lambda e: None if e is None else e.to_dict()  # noqa: E731
        return dict(baseline=d(self.baseline), n_failures=self.n_failures, best_alpha=self.probe.best_alpha,
                    fix_global=d(self.probe.fix_global), fix_oracle=d(self.probe.fix_oracle),
                    broken=d(self.probe.broken), control_fix_global=d(self.control_fix_global),
                    control_fix_oracle=d(self.control_fix_oracle))


@torch.no_grad()
def amplification_protocol(
    model: "HookedVLM", inputs: Inputs, columns: Float[Tensor, "k d"], answer: Int[Tensor, "batch"],
    candidates: Int[Tensor, "batch n"] | None = None, *, alphas: Sequence[float | int] = DEFAULT_ALPHAS,
    control_seeds: Sequence[int] = (0, 1, 2, 3, 4), positions: Bool[Tensor, "batch pos"] | None = None,
    hook_name: str = "blocks.0.hook_resid_pre",
) -> AmplificationResult:
    """The paper's amplification experiment. columns: the probe's class columns [k, d_model] (`probe_columns`).
    answer: with `candidates` [batch, n] the index of the right candidate (the prediction is the top candidate),
    without them the right token id (the prediction is the argmax over the vocabulary)."""
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas: expected at least one value")
    mask = inputs.get("attention_mask")
    answer = answer.cpu().long()

    def right(logits: Tensor) -> Tensor:
        if candidates is None:
            return final_logits(logits, mask).argmax(-1).cpu() == answer
        return candidate_probs(logits, mask, candidates).argmax(1) == answer

    base = right(model(**inputs))
    sweep = lambda w: torch.stack([right(amplify_columns(model, inputs, w, a, positions, hook_name))  # noqa: E731
                                   for a in alphas])
    res = AmplificationResult(alphas, rate(base), int((~base).sum()), _score(sweep(columns), base, alphas))
    k, d = columns.shape
    for s in control_seeds:
        res.controls.append(_score(sweep(random_columns(k, d, s)), base, alphas))
    if res.controls and res.n_failures:
        res.control_fix_global = over_seeds([c.fix_global.value for c in res.controls])
        res.control_fix_oracle = over_seeds([c.fix_oracle.value for c in res.controls])
    return res
