"""analyses.stats: intervals that cover at their nominal rate, on synthetic data where the truth is known."""
import math

import numpy as np
import pytest
import torch

from hooked_vlm.analyses.toolkit.stats import Estimate, _t_quantile, bootstrap, over_seeds, rank_stability, rate


def test_wilson_interval_covers_a_binomial_rate_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    for p, n in [(0.3, 64), (0.9, 64), (0.5, 20)]:
        hits = [rate(rng.random(n) < p).excludes(p) is False for _ in range(2000)]
        cover = np.mean(hits)
        assert 0.93 <= cover <= 0.975, (p, n, cover)  # 2000 draws: sd of the coverage ~0.005


def test_bootstrap_interval_covers_a_mean_at_about_its_nominal_rate():
    rng = np.random.default_rng(1)
    hits = [not bootstrap(rng.normal(0.2, 1.0, 64), n_resamples=1000, seed=i).excludes(0.2) for i in range(600)]
    assert 0.91 <= np.mean(hits) <= 0.98, np.mean(hits)  # the percentile bootstrap runs slightly under nominal


def test_rate_never_claims_certainty_from_a_finite_sample():
    est = rate(torch.ones(64, dtype=torch.bool))
    assert est.value == 1.0 and est.ci_high == 1.0 and 0.93 < est.ci_low < 0.96  # Wilson: 0.943 at n = 64
    assert rate([0, 1, 1, 0]).to_dict() == {"value": 0.5, "ci_low": pytest.approx(0.150, abs=1e-3),
                                            "ci_high": pytest.approx(0.850, abs=1e-3), "n": 4}


def test_paired_bootstrap_of_a_difference():
    rng = np.random.default_rng(2)
    control = rng.normal(0, 1, 200)
    effect = control + 0.5 + rng.normal(0, 0.1, 200)  # a paired shift of 0.5 with little noise
    est = bootstrap(effect, control, statistic=lambda a, b: a.mean() - b.mean())
    assert est.ci_low < 0.5 < est.ci_high and est.ci_high - est.ci_low < 0.05  # pairing removes the shared noise


def test_t_quantiles_and_seed_intervals():
    assert _t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert _t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    est = over_seeds([0.66, 0.81, 0.70, 0.75, 0.72])
    assert est.n == 5 and est.sd == pytest.approx(np.std([0.66, 0.81, 0.70, 0.75, 0.72], ddof=1))
    assert est.ci_high - est.value == pytest.approx(2.776 * est.sd / math.sqrt(5), rel=1e-3)
    one = over_seeds([0.7])
    assert one.ci_low == -math.inf and one.ci_high == math.inf


def test_rank_stability_finds_a_planted_item_and_flags_noise():
    rng = np.random.default_rng(3)
    scores = rng.normal(0, 1, (64, 12))
    scores[:, 5] += 3.0  # the planted head
    rs = rank_stability(scores, k=3, labels=[f"H{i}" for i in range(12)])
    assert rs.top(1)[0][0] == "H5" and rs.in_top_k[5] == 1.0 and tuple(rs.rank_ci[5]) == (1, 1)
    noisy = np.delete(np.arange(12), 5)
    assert rs.in_top_k[noisy].max() < 0.9  # no noise item is reliably in the top 3


@pytest.mark.parametrize("bad,match", [
    (dict(values=[]), "non-empty"), (dict(values=[1.0, float("nan")]), "NaN"),
])
def test_bad_inputs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bootstrap(bad["values"])


def test_bad_rate_and_confidence():
    with pytest.raises(ValueError, match="0/1"):
        rate([0.5, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        rate([1, 0], confidence=95.0)
    with pytest.raises(ValueError, match="k: expected 1..3"):
        rank_stability(np.zeros((4, 3)), k=4)


def test_estimate_formats_and_compares():
    a, b = Estimate(0.8, 0.7, 0.9, 64), Estimate(0.1, 0.0, 0.2, 64)
    assert f"{a}" == "0.80 [0.70, 0.90] (n=64)" and a.excludes(b) and not a.excludes(0.75)


@pytest.mark.parametrize("n", [1, 7, 64, 128, 255, 1000])
def test_rate_interval_holds_its_estimate_at_the_extremes(n):
    for hits in (np.ones(n), np.zeros(n)):
        e = rate(hits)
        assert e.ci_low <= e.value <= e.ci_high and 0.0 <= e.ci_low and e.ci_high <= 1.0
