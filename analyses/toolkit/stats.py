"""Uncertainty for every number an analysis reports: an `Estimate` is a value with a confidence interval and the
sample size it rests on.

- `bootstrap(values)`: a statistic of per-prompt values (default: the mean) with a percentile bootstrap interval
  over prompts. Resampling is paired: pass several aligned arrays and the statistic sees the same resampled prompts
  in each (e.g. an effect minus its control measured on the same prompts).
- `rate(successes)`: a proportion with the Wilson score interval. For a proportion the percentile bootstrap
  collapses to [1, 1] when every prompt succeeds, claiming a certainty 64 prompts cannot give; Wilson's interval
  does not, and covers at close to its nominal rate from n = 10 on (tested).
- `over_seeds(values)`: a random control repeated over seeds: mean with a t interval over the seeds (and the sd).
- `rank_stability(scores, k)`: how often each item (e.g. a head) is in the top k over bootstrap resamples of the
  prompts, and an interval on its rank.

Everything is seeded, so a report reproduces exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A value with its confidence interval [ci_low, ci_high] at `confidence`, from `n` units (prompts or seeds).
    `method` names the interval ("bootstrap", "wilson", "t over seeds"); `sd` is set where it is reported
    (over seeds)."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95
    method: str = "bootstrap"
    sd: float | None = None

    def to_dict(self) -> dict[str, float | int]:
        """{"value", "ci_low", "ci_high", "n"}: the form summary.json and bench rows use."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}

    def excludes(self, other: "Estimate | float") -> bool:
        """True when the two intervals do not overlap (or the number lies outside this interval)."""
        if isinstance(other, Estimate):
            return self.ci_low > other.ci_high or self.ci_high < other.ci_low
        return not self.ci_low <= float(other) <= self.ci_high

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.value:{spec}} [{self.ci_low:{spec}}, {self.ci_high:{spec}}] (n={self.n})"

    def __str__(self) -> str:
        return format(self)


def _as_array(values: Any, name: str = "values") -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().double().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected one value per unit (a non-empty [n, ...] array), got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name}: {int(np.isnan(arr).sum())} NaN values; drop the units that were not measured first")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a level in (0, 1), e.g. 0.95, got {confidence}")


def bootstrap(
    *values: Any, statistic: Callable[..., Any] | None = None, n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95, seed: int = 0,
) -> Estimate:
    """Percentile bootstrap over units (axis 0) of `statistic(*values)` (default: the mean of one array).

    Several arrays are resampled together (paired), e.g. `bootstrap(effect, control, statistic=lambda a, b:
    a.mean() - b.mean())`. The statistic takes numpy arrays and returns a float."""
    _check_confidence(confidence)
    if not values:
        raise ValueError("bootstrap: expected at least one array of per-unit values")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: expected a positive count, got {n_resamples}")
    arrays = [_as_array(v, f"values[{i}]") for i, v in enumerate(values)]
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"bootstrap: paired arrays need the same number of units, got {[a.shape[0] for a in arrays]}")
    stat = statistic or (lambda a: float(np.mean(a)))
    value = float(stat(*arrays))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    if statistic is None and len(arrays) == 1:  # the mean: vectorised over resamples
        draws = arrays[0][idx].mean(axis=1).reshape(n_resamples, -1)[:, 0] if arrays[0].ndim == 1 else \
            np.array([float(stat(arrays[0][i])) for i in idx])
    else:
        draws = np.array([float(stat(*(a[i] for a in arrays))) for i in idx])
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(value, float(lo), float(hi), n, confidence, "bootstrap")


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf((1 + confidence) / 2)


def rate(successes: Any, confidence: float = 0.95) -> Estimate:
    """The share of units that succeeded (bool or 0/1 values [n]) with the Wilson score interval."""
    _check_confidence(confidence)
    arr = _as_array(successes, "successes")
    if arr.ndim != 1 or not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"rate: expected a 1-D array of booleans or 0/1 values, got shape {arr.shape} with values "
                         f"{np.unique(arr)[:5].tolist()}")
    n, k = arr.shape[0], float(arr.sum())
    z = _z(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval always holds p: at p = 0 or 1 the bound is p itself, which round-off can miss by one ulp
    return Estimate(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), n, confidence, "wilson")


def over_seeds(values: Sequence[float] | Any, confidence: float = 0.95) -> Estimate:
    """Mean over repeated random draws (seeds) with a Student-t interval and the sd (one seed: a zero-width
    interval is not claimed; the interval is [-inf, inf] and the report says n=1)."""
    _check_confidence(confidence)
    arr = _as_array(values, "values").reshape(-1)
    n = arr.shape[0]
    mean = float(arr.mean())
    if n == 1:
        return Estimate(mean, -math.inf, math.inf, 1, confidence, "t over seeds", sd=float("nan"))
    sd = float(arr.std(ddof=1))
    t = _t_quantile((1 + confidence) / 2, n - 1)
    half = t * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, confidence, "t over seeds", sd=sd)


def _t_quantile(q: float, dof: int) -> float:
    """Student-t quantile by bisection on the regularised incomplete beta (no scipy dependency)."""
    if dof > 200:
        return _z(2 * q - 1)

    def cdf(t: float) -> float:
        x = dof / (dof + t * t)
        tail = 0.5 * _betainc(dof / 2, 0.5, x)
        return 1 - tail if t > 0 else tail

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes' Lentz form)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
    return front * f / a


@dataclass(frozen=True)
class RankStability:
    """Per item (e.g. a head): `in_top_k` = share of bootstrap resamples of the prompts in which it is among the
    top k; `rank` = its rank on all prompts (1 = largest score); `rank_ci` = (low, high) percentile interval of its
    rank over resamples. `labels` name the items."""

    labels: list[str]
    rank: np.ndarray
    in_top_k: np.ndarray
    rank_ci: np.ndarray
    k: int
    n: int

    def top(self, k: int | None = None) -> list[tuple[str, int, float, tuple[int, int]]]:
        """(label, rank, share in top k, rank interval) for the k best items, best first."""
        order = np.argsort(self.rank)[: k or self.k]
        return [(self.labels[i], int(self.rank[i]), float(self.in_top_k[i]), (int(self.rank_ci[i, 0]), int(self.rank_ci[i, 1])))
                for i in order]


def rank_stability(
    scores: Any, k: int, labels: Sequence[str] | None = None, n_resamples: int = 1000, confidence: float = 0.95,
    seed: int = 0, absolute: bool = False,
) -> RankStability:
    """Rank items by their mean score over prompts and measure how stable that ranking is.

    scores: [n_prompts, n_items] per-prompt scores (e.g. a head score per prompt). `absolute` ranks by |mean|."""
    _check_confidence(confidence)
    arr = _as_array(scores, "scores")
    if arr.ndim != 2:
        raise ValueError(f"scores: expected [n_prompts, n_items], got shape {arr.shape}")
    n, m = arr.shape
    if not 1 <= k <= m:
        raise ValueError(f"k: expected 1..{m} (the number of items), got {k}")
    labels = list(labels) if labels is not None else [str(i) for i in range(m)]
    if len(labels) != m:
        raise ValueError(f"labels: expected {m}, got {len(labels)}")

    def ranks(mean: np.ndarray) -> np.ndarray:
        key = np.abs(mean) if absolute else mean
        order = np.argsort(-key, kind="stable")
        r = np.empty(m, dtype=np.int64)
        r[order] = np.arange(1, m + 1)
        return r

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    all_ranks = np.stack([ranks(arr[i].mean(0)) for i in idx])
    lo, hi = np.quantile(all_ranks, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0, method="nearest")
    return RankStability(labels, ranks(arr.mean(0)), (all_ranks <= k).mean(0), np.stack([lo, hi], 1), k, n)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor / list -> float64 numpy (for per-prompt values coming out of the analyses)."""
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
