"""analyses.narrow_gate: attention knockout identities (no renormalisation, empty set = identity, a fully knocked-out
query row has zero head output, no image route left = output independent of the image), the batched knockout table,
and end-of-image steering (exact when the end-of-image token is the only route from the image)."""
from __future__ import annotations

import pytest
import torch

from hooked_vlm.analyses.metrics import LogitDiff, final_logits
from hooked_vlm.analyses.toolkit import SweepResult
from hooked_vlm.analyses.narrow_gate import (
    KNOCKOUT_CONDITIONS,
    key_positions,
    knockout_hooks,
    knockout_table,
    plot_knockout_table,
    run_with_knockout,
    steer_end_of_image,
    text_after_image,
)
from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR
from tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    other = dict(inputs, pixel_values=llava_inputs(hf, batch=2, pad_left=1, seed=1)["pixel_values"])
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), inputs["attention_mask"])
    return model, inputs, other, metric


def test_position_sets(setup):
    model, inputs, _, _ = setup
    lay = model.layout(inputs)
    q = text_after_image(lay)
    eoi = lay.end_of_image().int().argmax(1)
    for b in range(2):
        idx = q[b].nonzero().flatten()
        # LLaVA has no marker: the queries are every text token after the image, its end-of-image position first
        assert len(idx) and int(idx.min()) == int(eoi[b]) and not lay.is_image[b, idx].any()
        assert int(idx.max()) == int(lay.final_token()[b].int().argmax())
    assert (key_positions(lay, "random_10", seed=1).sum(1) == 10).all()
    assert (key_positions(lay, "random_10", seed=1) <= lay.image_positions()).all()
    assert torch.equal(key_positions(lay, "all_image"), lay.image_positions())
    assert not key_positions(lay, "none").any()
    with pytest.raises(ValueError, match="unknown knockout condition"):
        key_positions(lay, "everything")
    # malformed specs are errors (issue 15: "random_-3" used to knock out all but 3 image tokens)
    for bad in ("random_-3", "random_0", "random_ten"):
        with pytest.raises(ValueError, match="malformed position spec"):
            key_positions(lay, bad)
    # a 0/1 integer mask is a mask, never indices 0 and 1
    assert torch.equal(key_positions(lay, lay.image_positions().long()), lay.image_positions())
    with pytest.raises(ValueError, match="does not match the sequence length"):
        key_positions(lay, torch.ones(2, 3, dtype=torch.bool))


def test_knockout_table_rejects_bad_sizes_and_empty_conditions(setup):
    model, inputs, _, _ = setup
    metric = LogitDiff([3], [4])
    for bad in (0, -2):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            knockout_table(model, inputs, metric, batch_size=bad, progress=False)
    with pytest.raises(ValueError, match="no conditions"):
        knockout_table(model, inputs, metric, conditions=(), progress=False)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        knockout_table(model, inputs, lambda x: x[:, -1, 3].sum(), progress=False)


def test_empty_key_set_is_identity(setup):
    model, inputs, _, metric = setup
    # a pattern hook puts attention on its explicit path: compare with identity hooks on every decoder layer
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        base = model(**inputs)
        explicit = model.run_with_hooks(**inputs, fwd_hooks=[(n, lambda p, hook: p) for n in names])
    out = run_with_knockout(model, inputs, "none")
    torch.testing.assert_close(out, explicit, rtol=0, atol=0)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)  # explicit vs fused attention: round-off only
    table = knockout_table(model, inputs, metric, conditions=("none",), per_prompt=True, progress=False)
    torch.testing.assert_close(table.scores[0], table.clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table.effect(), torch.zeros(1, 2), rtol=0, atol=1e-5)


def test_full_row_knockout_zeroes_the_head_output(setup):
    """Every key of a query row knocked out for one head: that head's z at that row is exactly 0 (no
    renormalisation), other heads and rows are untouched."""
    model, inputs, _, _ = setup
    lay = model.layout(inputs)
    layer, head = model.cfg.n_layers - 1, 1
    final = lay.final_token()
    hooks = knockout_hooks(model, final, torch.ones(lay.shape, dtype=torch.bool), layers=[layer], heads=[head])
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, ref = model.run_with_cache(**inputs, names_filter=[name])
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(**inputs, names_filter=[name])
    rows = torch.arange(2)
    last = final.int().argmax(1)
    z, z0 = cache[name], ref[name]
    assert (z[rows, last, head] == 0).all()
    assert (z0[rows, last, head].abs() > 0).any()
    others = [h for h in range(model.cfg.n_heads) if h != head]
    torch.testing.assert_close(z[rows, last][:, others], z0[rows, last][:, others], rtol=1e-6, atol=1e-6)
    keep = ~final
    torch.testing.assert_close(z[keep], z0[keep], rtol=1e-6, atol=1e-6)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_no_renormalisation(setup):
    """After knockout each row sums to 1 minus the attention it had on the knocked-out keys."""
    model, inputs, _, _ = setup
    lay = model.layout(inputs)
    q, k = text_after_image(lay), lay.image_positions()
    name = "blocks.0.attn.hook_pattern"
    with torch.no_grad():
        _, ref = model.run_with_cache(**inputs, names_filter=[name])
        with model.hooks(fwd_hooks=knockout_hooks(model, q, k, layers=[0])):
            _, cache = model.run_with_cache(**inputs, names_filter=[name])  # caching hook runs after the knockout
    before, after = ref[name], cache[name]
    lost = (before * k[:, None, None, :]).sum(-1)  # [batch, head, query]
    expected = torch.where(q[:, None, :], 1 - lost, before.sum(-1))
    torch.testing.assert_close(after.sum(-1), expected, rtol=1e-5, atol=1e-6)
    assert (lost[q[:, None, :].expand_as(lost)] > 0).all()


def test_knockout_subtracts_the_keys_contributions(setup):
    """At layer 0 (inputs untouched), a knocked-out row's head output is the full output minus
    sum_k pattern[q, k] v[k] over the knocked-out keys, exactly what zeroing without renormalising means."""
    model, inputs, _, _ = setup
    lay = model.layout(inputs)
    q, k = text_after_image(lay), key_positions(lay, "random_10", seed=2)
    names = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z"]
    with torch.no_grad():
        _, ref = model.run_with_cache(**inputs, names_filter=names)
        with model.hooks(fwd_hooks=knockout_hooks(model, q, k, layers=[0])):
            _, ko = model.run_with_cache(**inputs, names_filter=names[-1:])
    rep = model.cfg.n_heads // model.cfg.n_key_value_heads
    v = ref[names[1]].repeat_interleave(rep, dim=2)  # [batch, key, head, d_head]
    removed = torch.einsum("bhqk,bkhd->bqhd", ref[names[0]] * k[:, None, None, :], v)
    expected = ref[names[2]] - removed * q[:, :, None, None]
    torch.testing.assert_close(ko[names[2]], expected, rtol=1e-5, atol=1e-6)
    assert (removed[q].abs() > 0).any()


def test_renormalised_knockout_removes_the_image(setup):
    """Zeroing weights without renormalising leaves the image in the softmax denominators, so answers still
    depend on pixels; masking the scores instead (renormalize=True) removes every route from the image."""
    model, inputs, other, _ = setup
    q = text_after_image(model.layout(inputs))
    a = run_with_knockout(model, inputs, "all_image", renormalize=True)
    b = run_with_knockout(model, other, "all_image", renormalize=True)
    torch.testing.assert_close(a[q], b[q], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (model(**inputs)[q] - model(**other)[q]).abs().max() > 1e-2
    a0 = run_with_knockout(model, inputs, "all_image")
    b0 = run_with_knockout(model, other, "all_image")
    assert (a0[q] - b0[q]).abs().max() > 1e-3
    # knocking out all image tokens is not the same as knocking out the end-of-image token only
    c = run_with_knockout(model, inputs, "end_of_image")
    assert (a0[q] - c[q]).abs().max() > 1e-3


def test_table_batched_equals_single_runs(setup):
    model, inputs, _, metric = setup
    lay = model.layout(inputs)
    results = [knockout_table(model, inputs, metric, per_prompt=True, batch_size=bs, seed=3, progress=False) for bs in (1, 3)]
    # the toolkit's one result type: scores [condition, batch], the unedited run as `clean`, no counterfactual
    res = results[0]
    assert isinstance(res, SweepResult) and res.dims == ("condition",) and res.direction == "noise"
    assert res.labels["condition"] == list(KNOCKOUT_CONDITIONS) and res.scores.shape == (len(KNOCKOUT_CONDITIONS), 2)
    torch.testing.assert_close(res.clean, metric(model(**inputs)), rtol=0, atol=1e-5)
    assert res.corrupt.isnan().all()
    tables = [r.table() for r in results]
    assert list(tables[0]) == ["baseline", *KNOCKOUT_CONDITIONS]
    for i, label in enumerate(KNOCKOUT_CONDITIONS):
        torch.testing.assert_close(tables[0][label], tables[1][label], rtol=0, atol=1e-5)
        single = metric(run_with_knockout(model, inputs, label, seed=3))
        torch.testing.assert_close(tables[0][label], single, rtol=0, atol=1e-5)
        torch.testing.assert_close(res.effect()[i], single - res.clean, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one labelled axis"):
        SweepResult(torch.zeros(2, 3), res.clean, res.corrupt, dims=("layer", "pos")).table()
    mean = knockout_table(model, inputs, metric, seed=3, progress=False)  # not per prompt: means over prompts
    torch.testing.assert_close(mean.scores, res.scores.mean(-1), rtol=0, atol=1e-6)
    assert mean.clean.ndim == 0
    # LLaVA has no end-of-image marker: its end-of-image position is the first text token after the image (the
    # paper's choice), a different key from the last image token
    assert not lay.has_end_of_image_token
    assert (lay.end_of_image() & lay.is_image).sum() == 0 and (lay.end_of_image() & lay.last_image_token()).sum() == 0
    # chosen layers / heads and custom key sets
    custom = knockout_table(model, inputs, metric, conditions={"eoi_L0H0": lay.end_of_image()}, layers=[0], heads=[0],
                            progress=False)
    ref = metric(run_with_knockout(model, inputs, lay.end_of_image(), layers=[0], heads=[0])).mean()
    torch.testing.assert_close(custom.table()["eoi_L0H0"], ref, rtol=0, atol=1e-5)
    assert custom.labels["layers"] == [0] and custom.labels["heads"] == [0]
    fig = plot_knockout_table(results[0])
    assert list(fig.data[0].x) == ["baseline", *KNOCKOUT_CONDITIONS]


def test_steering(setup):
    model, inputs, other, _ = setup
    mask = inputs["attention_mask"]
    # steering from the same image changes nothing
    with torch.no_grad():
        base_pred = final_logits(model(**inputs), mask).argmax(-1)
    r = steer_end_of_image(model, inputs, inputs, base_pred)
    assert r.fraction_changed == 0.0 and torch.equal(r.predictions, r.base_predictions)
    # with every other image token knocked out, the end-of-image token is the only route from the image, so
    # steering it reproduces the other image's answers exactly
    lay = model.layout(inputs)
    keys = lay.image_positions() & ~lay.end_of_image()
    ko = knockout_hooks(model, text_after_image(lay), keys, renormalize=True)
    with torch.no_grad(), model.hooks(fwd_hooks=ko):
        src_pred = final_logits(model(**other), mask).argmax(-1)
        r = steer_end_of_image(model, inputs, other, src_pred)
    assert torch.equal(r.predictions, src_pred)
    assert r.fraction == 1.0 or (r.base_predictions == src_pred).all()
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    # restricted candidates
    r = steer_end_of_image(model, inputs, other, torch.tensor([3, 4]), candidates=[3, 4, 5])
    assert set(r.predictions.tolist()) <= {3, 4, 5}


def test_qwen2_vl_end_of_image_marker():
    """Qwen2-VL closes each image with <|vision_end|>: that is the end-of-image key, it is not an image token and
    not a query; knockout with an empty set is still the identity on the explicit path."""
    from tiny import QWEN_VEND, qwen_inputs, tiny_qwen_vl

    model = HookedVLM.from_hf(tiny_qwen_vl())
    inputs = qwen_inputs([[(16, 16)], [(16, 8)]], seed=0)
    lay = model.layout(inputs)
    eoi, last = lay.end_of_image(), lay.last_image_token()
    assert (inputs["input_ids"][eoi] == QWEN_VEND).all()
    assert torch.equal(eoi.int().argmax(1), last.int().argmax(1) + 1)
    q = text_after_image(lay)
    assert not (q & eoi).any() and not (q & lay.image_positions()).any()
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), inputs["attention_mask"])
    table = knockout_table(model, inputs, metric, conditions=("none", "end_of_image", "last_image_token", "random_2"),
                           per_prompt=True, progress=False).table()
    torch.testing.assert_close(table["none"], table["baseline"], rtol=1e-5, atol=1e-5)
    assert (table["end_of_image"] - table["last_image_token"]).abs().max() > 1e-4


needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no shipped organism")


@needs_organism
def test_organism_has_no_narrow_gate():
    """The Shapes organism reads the image directly from the final token (planted L1H0), like LLaVA in the paper:
    knocking out the end-of-image token keeps accuracy, all image tokens drop it to about chance, and steering
    the end-of-image token rarely changes answers."""
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = HookedVLM.from_pretrained(str(ORGANISM_DIR))
    pairs = ShapesGenerator(5).pairs(16, "swap_shapes", "shape_item")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    table = knockout_table(model, clean.inputs, clean.accuracy(), progress=False).table()
    assert table["baseline"] >= 0.9 and table["end_of_image"] >= 0.9
    assert table["all_image"] <= 0.7
    steer = steer_end_of_image(model, clean.inputs, cf.inputs, cf.answer)
    assert steer.fraction <= 0.25
