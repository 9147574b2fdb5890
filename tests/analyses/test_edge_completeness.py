"""Completeness of gradient-based scores (analyses.completeness) and EAP-IG's adaptive step count (analyses.edge_ig).

Known totals: in a model made linear from hook_embed to the metric (MLPs zeroed, patterns and norm scales frozen)
the input edges' EAP scores sum exactly to M(corrupt) - M(clean) for every prompt, and the adaptive EAP-IG stops at
its first grid with the EAP scores; in the real (float64) tiny LLaVA the adaptive loop refines until the error is
under the bound, and warns with a small max_steps. Attribution patching's residual cut sums to the gap for a tiny
counterfactual."""
from __future__ import annotations

import warnings

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.analyses.attribution import attribution_patching
from hooked_vlm.analyses.completeness import Completeness
from hooked_vlm.analyses.edge_ig import input_nodes
from hooked_vlm.analyses.edges import eap, eap_ig
from hooked_vlm.analyses.metrics import LogitDiff
from test_edges import _vlm, hf, linear, setup  # noqa: F401  (the same fixtures: tiny LLaVA, pair, linear model)
from tiny import llava_inputs, tiny_llava

TOL = dict(rtol=1e-8, atol=1e-9)


def test_completeness_errors_by_hand():
    c = Completeness(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(c.abs_error, torch.tensor(0.5))  # |1.5 - 2|
    torch.testing.assert_close(c.rel_error, torch.tensor(0.25))
    torch.testing.assert_close(c.prompt_error, torch.tensor(0.25))  # (1 + 0) / 4
    cancel = Completeness(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(cancel.abs_error, torch.tensor(0.0))  # the batch mean is right ...
    torch.testing.assert_close(cancel.error(), torch.tensor(0.5))  # ... each prompt is not
    mean_only = Completeness(torch.tensor(3.0), torch.tensor(4.0), per_prompt=False)
    torch.testing.assert_close(mean_only.error(), torch.tensor(0.25))
    assert torch.isnan(mean_only.prompt_error) and "rel error 0.25" in repr(mean_only)


def _input_sum(graph, image_path=False):
    """Sum of the input edges' scores of a graph (batch mean, or [B] with per_prompt)."""
    rows = [graph.nodes.index(u) for u in input_nodes(graph.nodes, image_path)]
    return graph.scores[rows].nansum((0, 1))


def test_completeness_exact_on_linear_model(linear):
    model, clean, corrupt, metric, hooks = linear
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        total = metric(model(**corrupt)) - metric(model(**clean))
    assert total.abs().min() > 1e-2
    graph = eap(model, clean, corrupt, metric, fwd_hooks=hooks, per_prompt=True)
    c = graph.completeness
    torch.testing.assert_close(c.total, total, **TOL)
    torch.testing.assert_close(c.estimate, total, **TOL)  # linear: first order is exact
    torch.testing.assert_close(c.estimate, _input_sum(graph), **TOL)  # the estimate is the input edges' sum
    assert float(c.abs_error) < 1e-9 and float(c.error()) < 1e-9
    auto = eap_ig(model, clean, corrupt, metric, fwd_hooks=hooks, per_prompt=True)
    assert auto.steps == 6 and float(auto.completeness.error()) < 1e-9  # the first grid (5 intervals) is enough
    torch.testing.assert_close(auto.scores, graph.scores, equal_nan=True, **TOL)  # constant gradient: EAP


def test_completeness_of_fixed_steps_and_adaptive_bound(setup):
    model, clean, corrupt, metric = setup
    with torch.no_grad():
        total = (metric(model(**corrupt)) - metric(model(**clean)))
    eap1 = eap(model, clean, corrupt, metric)
    torch.testing.assert_close(eap1.completeness.estimate.mean(), _input_sum(eap1), **TOL)
    torch.testing.assert_close(eap1.completeness.total, total, **TOL)
    fixed = eap_ig(model, clean, corrupt, metric, steps=2, per_prompt=True)
    assert fixed.steps == 2
    torch.testing.assert_close(fixed.completeness.estimate, _input_sum(fixed), **TOL)
    tol = 1e-2
    start_err = float(eap_ig(model, clean, corrupt, metric, tol=1.0).completeness.error())
    assert start_err > tol  # the first grid is not enough: the loop has to refine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = eap_ig(model, clean, corrupt, metric, tol=tol, max_steps=200, per_prompt=True)
    assert not [w for w in caught if "completeness bound" in str(w.message)]  # reaching the bound does not warn
    c = auto.completeness
    assert 6 < auto.steps < 200 and float(c.error()) <= tol and auto.method.startswith("EAP-IG(adaptive")
    torch.testing.assert_close(c.estimate, _input_sum(auto), **TOL)
    torch.testing.assert_close(c.total, total, **TOL)
    with pytest.warns(UserWarning, match=r"did not reach the completeness bound: error .* > tol 1e-09 with max_steps=7"):
        capped = eap_ig(model, clean, corrupt, metric, tol=1e-9, max_steps=7)
    assert capped.steps == 7 and float(capped.completeness.error()) > 1e-9
    with pytest.raises(ValueError, match="steps must be 'auto'"):
        eap_ig(model, clean, corrupt, metric, steps="many")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_adaptive_image_path_per_prompt_grid(family):
    """With the image path the tower's input edges are split per prompt (LLaVA: one image row each; Qwen: the
    packed tower, split by image_grid_thw, images of different sizes), so the per-prompt error is defined and the
    batch-mean scores of the input edges sum to the mean estimate."""
    model, clean, corrupt, _, metric = _vlm(family)
    for graph in (eap(model, clean, corrupt, metric, image_path=True),
                  eap_ig(model, clean, corrupt, metric, tol=0.01, max_steps=100, image_path=True)):
        c = graph.completeness
        assert c.per_prompt and c.estimate.shape == (2,)
        torch.testing.assert_close(c.estimate.mean(), _input_sum(graph, image_path=True), **TOL)
    assert float(c.error()) <= 0.01
    with torch.no_grad():
        torch.testing.assert_close(c.total, metric(model(**corrupt)) - metric(model(**clean)), **TOL)


def test_attribution_patching_residual_cut():
    """A tiny counterfactual (pixels 1e-4 * noise away): each layer's resid_pre scores sum to the gap within 1%;
    other kinds carry no completeness (they are not cuts)."""
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf).double()
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    clean["pixel_values"] = clean["pixel_values"].double()
    noise = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    corrupt = dict(clean, pixel_values=clean["pixel_values"] + 1e-4 * noise)
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    for direction in ("noise", "denoise"):
        res = attribution_patching(model, clean, corrupt, metric, hooks=("resid_pre", "attn_out"), direction=direction)
        c = res.completeness["resid_pre"]
        assert set(res.completeness) == {"resid_pre"} and c.estimate.shape == (3, 2)
        gap = (res.corrupt - res.clean) if direction == "noise" else (res.clean - res.corrupt)
        torch.testing.assert_close(c.total.mean(-1), gap.expand(3), **TOL)
        torch.testing.assert_close(c.estimate.mean(-1), res.scores["resid_pre"].sum(-1), **TOL)
        assert gap.abs() > 1e-7 and float(c.rel_error.max()) < 0.01


def test_deepstack_inputs_are_part_of_the_cut():
    """Qwen3-VL: the DeepStack additions DS{l} are graph inputs, interpolated with hook_embed; for a counterfactual
    1e-4 * noise away in the pixels, EAP's input edges (embed_image, embed_text, DS0, DS1) sum to the gap within 1%,
    and without the DS rows they would not; the adaptive EAP-IG reaches its bound on the real counterfactual."""
    from tiny import qwen_inputs, tiny_qwen3_vl

    model = HookedVLM.from_hf(tiny_qwen3_vl()).double()
    clean = qwen_inputs([[(16, 16)], [(16, 8)]], seed=0)
    clean["pixel_values"] = clean["pixel_values"].double()
    noise = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    near = dict(clean, pixel_values=clean["pixel_values"] + 1e-4 * noise)
    graph = eap(model, clean, near, metric, per_prompt=True)
    c = graph.completeness
    assert "DS0" in input_nodes(graph.nodes, False) and float(c.total.abs().min()) > 1e-7
    assert float(c.error()) < 0.01
    ds = [graph.nodes.index(u) for u in ("DS0", "DS1")]
    without = c.estimate - graph.scores[ds].nansum((0, 1))
    assert float((without - c.total).abs().sum() / c.total.abs().sum()) > 0.05
    far = dict(clean, pixel_values=clean["pixel_values"] + noise)
    auto = eap_ig(model, clean, far, metric, tol=0.01, max_steps=100)
    assert float(auto.completeness.error()) <= 0.01
    torch.testing.assert_close(auto.completeness.estimate.mean(), _input_sum(auto), **TOL)


def test_adaptive_per_position_and_per_prompt_agree(setup):
    """The adaptive grid is deterministic: per-position scores (a second pass over the final grid) sum to the
    plain scores, and per-prompt scores average to them."""
    model, clean, corrupt, metric = setup
    plain = eap_ig(model, clean, corrupt, metric, tol=0.05)
    by_pos = eap_ig(model, clean, corrupt, metric, tol=0.05, per_position=True)
    by_prompt = eap_ig(model, clean, corrupt, metric, tol=0.05, per_prompt=True)
    assert plain.steps == by_pos.steps == by_prompt.steps > 6
    torch.testing.assert_close(by_pos.scores.sum(-1), plain.scores, equal_nan=True, **TOL)
    torch.testing.assert_close(by_prompt.scores.mean(-1), plain.scores, equal_nan=True, **TOL)
    torch.testing.assert_close(by_pos.completeness.estimate, plain.completeness.estimate, **TOL)
