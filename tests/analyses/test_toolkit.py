"""analyses.toolkit: the position-set normaliser and the Metric check with every input form, hook names, the one
caching path (behind the size guard) and the sweep engine's chunk planner."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm.analyses.patching import patch_sweep
from hooked_vlm.analyses.toolkit import (act_name, as_positions, check_batch_size, hook_template, metric_values, plan_chunks,
                              random_count, run_cached, tile)
from hooked_vlm import HookedVLM
from tiny import llava_inputs, tiny_llava

N = 6
EXPECT = torch.tensor([False, True, False, True, True, False])


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    return model, inputs


# ------------------------------------------------------------------------------------------------ positions
@pytest.mark.parametrize("given", [
    EXPECT,                                   # bool tensor
    EXPECT.tolist(),                          # list of bools
    EXPECT.numpy(),                           # numpy bool array
    EXPECT.long(),                            # 0/1 int tensor as long as the sequence: a mask, not indices 0 and 1
    EXPECT.int().tolist(),                    # 0/1 int list
    EXPECT.numpy().astype(np.int64),          # 0/1 numpy int array
    torch.tensor([1, 3, 4]),                  # int tensor of indices
    [4, 1, 3],                                # list of indices (any order)
    np.array([1, 3, 4]),                      # numpy indices
    (1, 3, 4),                                # tuple of indices
], ids=["bool", "list_bool", "np_bool", "int01_tensor", "int01_list", "np_int01", "idx_tensor", "idx_list", "np_idx",
        "idx_tuple"])
def test_position_forms_1d(given):
    torch.testing.assert_close(as_positions(given, N), EXPECT)


def test_position_forms_2d_and_layout(setup):
    model, inputs = setup
    am = inputs["attention_mask"]  # [2, pos] of 0/1 ints with left padding: read as a mask
    n = am.shape[1]
    out = as_positions(am, n, batch=2)
    assert out.dtype == torch.bool and torch.equal(out, am.bool())
    assert not out[:, 0].all()  # the padded first position stays out (indices would have put 0 and 1 in)
    nested = am.bool().tolist()
    assert torch.equal(as_positions(nested, n, 2), am.bool())
    assert torch.equal(as_positions(am.numpy(), n, 2), am.bool())
    lay = model.layout(inputs)
    img = lay.image_positions()  # a TokenLayout mask [batch, pos]
    assert torch.equal(as_positions(img, n, 2), img)
    assert torch.equal(tile(as_positions([0, 2], n), 4), torch.zeros(4, n, dtype=torch.bool).index_fill_(1, torch.tensor([0, 2]), True))
    assert as_positions(None, n) is None
    assert torch.equal(as_positions(3, n), torch.arange(n) == 3)


@pytest.mark.parametrize("given, error, match", [
    ([0.5], TypeError, "fraction is not a position"),
    (torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), TypeError, "float32 values"),
    (np.array([0.25]), TypeError, "float64"),
    ([-1], ValueError, "negative indices are refused"),
    ([6], ValueError, r"indices \[6\] are outside a sequence of length 6"),
    ([1, 1, 2], ValueError, "repeated indices"),
    ([], ValueError, "empty list"),
    (torch.tensor([], dtype=torch.long), ValueError, "no positions given"),
    (torch.ones(5, dtype=torch.bool), ValueError, "mask of length 5 .* sequence length 6"),
    (torch.ones(3, N, dtype=torch.bool), ValueError, "is for 3 prompts; the inputs have 2"),
    (torch.tensor([[0, 2], [1, 3]]), ValueError, "0/1 mask"),
    (torch.ones(2, 2, N, dtype=torch.bool), ValueError, r"\[pos\] or \[batch, pos\]"),
    ("random_3", TypeError, "string 'random_3'"),
    (True, TypeError, "single bool"),
    ({1, 2}, TypeError, "got set"),
])
def test_position_errors(given, error, match):
    with pytest.raises(error, match=match):
        as_positions(given, N, batch=2)


def test_random_spec():
    assert random_count("random_10") == 10
    assert random_count("all_image") is None
    for bad in ("random_-3", "random_0", "random_x", "random_"):
        with pytest.raises(ValueError, match="expected 'random_<k>' with k a positive integer"):
            random_count(bad)


# --------------------------------------------------------------------------------------------------- metric
def test_metric_contract():
    logits = torch.randn(3, 5, 10)
    ok = metric_values(lambda x: x[:, -1, 0], logits)
    assert ok.shape == (3,) and ok.dtype == torch.float32
    with pytest.raises(ValueError, match=r"shape \[batch\] = \(3,\); got shape \(\) \(a scalar"):
        metric_values(lambda x: x[:, -1, 0].mean(), logits)
    with pytest.raises(ValueError, match=r"got shape \(3, 10\) \(one row per prompt"):
        metric_values(lambda x: x[:, -1], logits)
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        metric_values(lambda x: x[0, :, 0], logits)
    with pytest.raises(TypeError, match="got float"):
        metric_values(lambda x: 1.0, logits)
    with pytest.raises(TypeError, match="callable|Metric"):  # (the test suite's runtime type checker says "Metric")
        metric_values("logit_diff", logits)


def test_sweep_refuses_a_bad_metric_before_sweeping(setup):
    model, inputs = setup
    for bad, match in ((lambda x: x[:, -1, 3].sum(), r"got shape \(\)"), (lambda x: x[:, -1], r"got shape \(2, 64\)")):
        with pytest.raises(ValueError, match=match):
            patch_sweep(model, inputs, inputs, bad, sites=["blocks.0.hook_resid_pre"],
                        progress=False)
        assert not any(hp.fwd_hooks or hp._forward_hooks for hp in model.hook_dict.values())


# ----------------------------------------------------------------------------------------- hooks and cache
def test_hook_names_follow_transformer_lens(setup):
    model, inputs = setup
    assert act_name("resid_pre", 2) == "blocks.2.hook_resid_pre"
    assert act_name("z", 1) == "blocks.1.attn.hook_z"
    assert act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert act_name("mlp_post", 1) == "blocks.1.mlp.hook_post"
    assert hook_template("attn_out") == "blocks.{layer}.hook_attn_out"
    assert hook_template("vision.blocks.{layer}.hook_resid_post") == "vision.blocks.{layer}.hook_resid_post"
    assert act_name("projector.hook_out") == "projector.hook_out"
    with pytest.raises(ValueError, match="needs a layer"):
        act_name("resid_pre")
    for name in (act_name(k, 1) for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k",
                                          "v", "result", "pattern", "attn_scores", "mlp_post")):
        assert name in model.hook_dict, name
    logits, cache = run_cached(model, inputs, [act_name("resid_pre", 1)])
    _, tl_cache = model.run_with_cache(**inputs, names_filter=[act_name("resid_pre", 1)])
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], tl_cache["resid_pre", 1], rtol=0, atol=0)
    torch.testing.assert_close(logits, model(**inputs))


def test_run_cached_is_behind_the_size_guard(setup):
    model, inputs = setup
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    old = model.max_cache_bytes
    model.max_cache_bytes = 100
    try:
        with pytest.raises(ValueError, match="max_cache_bytes=100"):
            run_cached(model, inputs, names)
    finally:
        model.max_cache_bytes = old
    with pytest.raises(ValueError, match="did not run"):
        run_cached(model, inputs, ["vision.blocks.2.hook_resid_post"])
    with pytest.raises(ValueError, match="no hook names"):
        run_cached(model, inputs, [])


# ------------------------------------------------------------------------------------------------- engine
def test_batch_size_must_be_positive(setup):
    model, inputs = setup
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            check_batch_size(bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            check_batch_size(bad)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            patch_sweep(model, inputs, inputs, LogitDiff([3], [4]), sites=["blocks.0.hook_resid_pre"], batch_size=bad,
                        progress=False)


def test_plan_chunks_groups_near_resume_points():
    # far-apart image positions: each its own chunk; neighbouring ones share a chunk (up to batch_size)
    starts = [(0, 10), (0, 500), (0, 11), (0, 12), (1, 900), None, (0, 501)]
    plan = plan_chunks(starts, batch_size=2, n_layers=4, seq_len=1000, overhead=32)
    seen = sorted(i for _, idx in plan for i in idx)
    assert seen == list(range(len(starts)))
    assert all(len(idx) <= 2 for _, idx in plan)
    chunks = {tuple(sorted(idx)): start for start, idx in plan}
    assert chunks[(5,)] is None  # the full-forward site
    assert chunks[(1, 6)] == (0, 500)  # neighbours share a resume point
    assert chunks[(4,)] == (1, 900)  # a late site is never pulled back to an early resume point
    assert any(set(k) <= {0, 2, 3} and len(k) == 2 for k in chunks)
    # a large per-call overhead (accelerators) merges more
    big = plan_chunks([(0, p) for p in range(0, 1000, 100)], batch_size=16, n_layers=4, seq_len=1000, overhead=10**6)
    assert len(big) == 1 and big[0][0] == (0, 0)
    small = plan_chunks([(0, p) for p in range(0, 1000, 100)], batch_size=16, n_layers=4, seq_len=1000, overhead=1)
    assert len(small) == 10
