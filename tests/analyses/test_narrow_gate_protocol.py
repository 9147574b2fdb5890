"""The narrow-gate paper's protocol (2412.06646) with intervals: knockout conditions with and without
renormalisation beside a control, random 2% over seeds, the per-layer steering sweep, and the descriptive
analyses (cross-modal attention mass, modality separation, neighbourhood overlap), on hand-checkable cases."""
import math

import pytest
import torch
from tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen_vl

from hooked_vlm.analyses.metrics import Accuracy, LogitDiff
from hooked_vlm.analyses.modality import (cross_modal_attention, modality_separation, neighbourhood_overlap,
                               overlap_with_labels)
from hooked_vlm.analyses.narrow_gate import knockout_protocol, knockout_table, steering_sweep
from hooked_vlm import HookedVLM


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=4, pad_left=1, seed=0)
    other = dict(inputs, pixel_values=llava_inputs(hf, batch=4, pad_left=1, seed=1)["pixel_values"])
    return model, inputs, other


def test_end_of_image_is_never_an_image_position_in_any_family(setup):
    model, inputs, _ = setup
    lay = model.layout(inputs)
    assert not lay.has_end_of_image_token and not (lay.end_of_image() & lay.is_image).any()
    assert (lay.end_of_image().int().argmax(1) == lay.last_image_token().int().argmax(1) + 1).all()
    qwen = HookedVLM.from_hf(tiny_qwen_vl("qwen2_vl"))
    q_in = qwen_inputs([[(16, 16)], [(8, 24)]])
    q_lay = qwen.layout(q_in)
    assert q_lay.has_end_of_image_token and not (q_lay.end_of_image() & q_lay.is_image).any()


def test_knockout_protocol_rows_match_the_tables_and_carry_intervals(setup):
    model, inputs, _ = setup
    metric = LogitDiff(torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8, 9, 10]), inputs["attention_mask"])
    control = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
    rows = knockout_protocol(model, inputs, metric, control_inputs=control, control_metric=metric, n_seeds=3,
                             batch_size=4, progress=False)
    conds = [(r.condition, r.renormalize) for r in rows]
    assert conds[0] == ("baseline", False) and len(rows) == 9  # baseline + 4 conditions x 2 renormalisations
    random = [r for r in rows if r.condition.startswith("random") and not r.renormalize][0]
    assert random.n_keys == 1 and len(random.per_seed) == 3  # 2% of 16 image tokens -> 1 token, 3 seeds
    lay = model.layout(inputs)
    for s, value in enumerate(random.per_seed):  # each seed's mean is the table's for that key set
        t = knockout_table(model, inputs, metric, {"r": lay.random_image_tokens(1, seed=s)}, per_prompt=True,
                           progress=False)
        assert value == pytest.approx(float(t.scores[0].mean()), abs=1e-5)
    assert random.estimate.value == pytest.approx(sum(random.per_seed) / 3, abs=1e-6)
    assert random.estimate.ci_low <= random.estimate.value <= random.estimate.ci_high
    eoi = [r for r in rows if r.condition == "end_of_image" and not r.renormalize][0]
    direct = knockout_table(model, inputs, metric, ("end_of_image",), per_prompt=True, progress=False).table()["end_of_image"]
    assert eoi.estimate.value == pytest.approx(float(direct.mean()), abs=1e-5) and eoi.estimate.n == 4
    assert eoi.control is not None and eoi.to_dict()["control"]["n"] == 4
    assert rows[0].estimate.method == "bootstrap"  # logit differences: bootstrap; accuracies: Wilson
    acc = knockout_protocol(model, inputs, Accuracy(torch.tensor([3, 4, 5, 6]), inputs["attention_mask"]),
                            renormalize=(False,), n_seeds=2, progress=False)
    assert all(r.estimate.method in ("wilson", "t over seeds") for r in acc)
    with pytest.raises(ValueError, match="together"):
        knockout_protocol(model, inputs, metric, control_inputs=control)
    with pytest.raises(ValueError, match="fraction"):
        knockout_protocol(model, inputs, metric, random_fraction=2.0)


def test_steering_sweep_identity_and_variants(setup):
    model, inputs, other = setup
    with torch.no_grad():
        base = model(**inputs)[:, -1].argmax(-1)
    # the source is the same run: nothing changes at any layer, in either variant
    for variant in ("resid", "attn_input"):
        rows = steering_sweep(model, inputs, inputs, base + 1, variant=variant)
        assert [r.layer for r in rows] == [0, 1, 2]
        assert all(r.changed.value == 0.0 and r.flipped.value == 0.0 for r in rows)
    rows = steering_sweep(model, inputs, other, torch.tensor([3, 4, 5, 6]), layers=[0, -1])
    assert [r.layer for r in rows] == [0, 2] and all(0 <= r.changed.value <= 1 for r in rows)
    with pytest.raises(ValueError, match="variant"):
        steering_sweep(model, inputs, other, 3, variant="mlp")


def test_cross_modal_attention_matches_the_cached_patterns(setup):
    model, inputs, _ = setup
    out = cross_modal_attention(model, inputs, layers=[0, 2])
    _, cache = model.run_with_cache(**inputs, names_filter=["blocks.2.attn.hook_pattern"])
    lay = model.layout(inputs)
    q = lay.text_positions() & (torch.arange(lay.shape[1])[None] > lay.last_image_token().int().argmax(1)[:, None])
    p = cache["blocks.2.attn.hook_pattern"].mean(1)
    manual = torch.stack([(p[b][q[b]][:, lay.is_image[b]].sum(-1)).mean() for b in range(4)])
    assert out["image"][2].value == pytest.approx(float(manual.mean()), abs=1e-5)
    assert out["image"][2].n == 4 and 0 <= out["end_of_image"][0].value <= 1


def test_modality_separation_and_neighbourhood_overlap(setup):
    model, inputs, _ = setup
    sep = modality_separation(model, inputs, layers=[0, -1])
    assert set(sep) == {"centroid_cosine", "homogeneity_gap"} and set(sep["centroid_cosine"]) == {0, 2}
    assert all(-1 <= e.value <= 1 for e in sep["centroid_cosine"].values())
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert neighbourhood_overlap(x, x * 3.0, k=5).value == 1.0  # cosine neighbourhoods ignore scale
    rnd = neighbourhood_overlap(x, torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), k=5)
    assert rnd.value < 0.4  # unrelated: about k / (n - 1) = 0.13
    labels = torch.arange(40) % 2
    clustered = torch.randn(40, 8) * 0.05 + labels[:, None].float() * torch.ones(8) * 3 - 1.5 * torch.ones(8)
    assert overlap_with_labels(clustered, labels, k=5).value == 1.0
    with pytest.raises(ValueError, match="k: expected"):
        neighbourhood_overlap(x, x, k=40)
    assert math.isfinite(sep["homogeneity_gap"][0].value)
