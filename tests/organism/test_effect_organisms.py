"""Organisms with a planted effect (issue 19) and their matched negatives: training is deterministic (resume = a
straight run), a changed task is refused on resume, and on the shipped checkpoints the paper's detectors say yes
where the effect was planted and no where it was not.

Narrow gate (2412.06646): shapes_qwen2_vl_gate (positive) against shapes_qwen2_vl (negative), 64 training-distribution
shape -> item prompts, the bench-effects detector analyses/effects/narrow_gate.py (analyses/narrow_gate.py's knockout
and steering against random controls, Wilson intervals).
"""
from __future__ import annotations

import pytest
import torch

from hooked_vlm.organism import load_organism, organism_record
from hooked_vlm.organism import state as ST
from hooked_vlm.organism.train import TrainConfig, main, train_organism

GATE = dict(task="narrow_gate", family="qwen2_vl", init_from="shapes_qwen2_vl", supervise_steps=0,
            options={"gate_steps": 2},
            batch_size=2, eval_every=10**6, save_every=2, log_every=1)


def _train(tmp_path, state, steps=4, stop_after=None, **cfg):
    return train_organism(tmp_path / "out", steps=steps, seed=5, resume=True, state_dir=tmp_path / state,
                          cfg=TrainConfig(**{**GATE, **cfg}), progress=False, stop_after=stop_after)


# ------------------------------------------------------------------------------------------------ training
def test_narrow_gate_training_resumes_into_the_straight_run(tmp_path):
    # steps 1-2 masked (gate mask + <|vision_end|> supervision), 3-4 free (image-mass penalty): both phases
    _train(tmp_path, "straight", stop_after=4)
    _train(tmp_path, "chunked", stop_after=1)
    _train(tmp_path, "chunked", stop_after=3)
    _train(tmp_path, "chunked", stop_after=4)
    a, b = ST.saved_model(tmp_path / "straight"), ST.saved_model(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = ST.read_manifest(tmp_path / "straight")["log"]
    assert [("eoi" in e, "gate" in e) for e in log] == [(True, False)] * 2 + [(False, True)] * 2


def test_resume_refuses_a_changed_task(tmp_path):
    base = dict(task="shapes", init_from=None, options={})
    _train(tmp_path, "state", stop_after=2, **base)
    with pytest.raises(ValueError, match=r"task \(--task\) = 'shapes', this run has 'narrow_gate'"):
        _train(tmp_path, "state")


@pytest.mark.parametrize("argv,match", [
    (["--family", "llava"], "needs a family with an end-of-image token"),
    (["--supervise-steps", "10"], "pass --supervise-steps 0"),
])
def test_narrow_gate_refuses_what_cannot_plant_it(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        main(["--task", "narrow_gate", "--out", str(tmp_path / "out"), "--steps", "2", *argv])
    assert not (tmp_path / "out").exists()


def test_gate_mask_blocks_text_to_image_and_nothing_else():
    import numpy as np

    from hooked_vlm.organism import gate as G
    from hooked_vlm.organism import load_organism_hf
    from hooked_vlm.organism.recipes import get_recipe
    from hooked_vlm.organism.train import make_batch

    model, _ = load_organism_hf("shapes_qwen2_vl")
    block = get_recipe("qwen2_vl").image_block
    image, eoi = G.gate_positions(block)
    inputs, _ = make_batch(np.random.default_rng(0), TrainConfig(**{**GATE, "batch_size": 3}))
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True).attentions
        with G.gate_mask(model, block):
            masked = model(**inputs, output_attentions=True).attentions
    assert G.image_mass_penalty(plain, inputs["attention_mask"], block)[0] > 0.1
    assert G.image_mass_penalty(masked, inputs["attention_mask"], block)[0] == 0
    for p, m in zip(plain, masked):
        assert torch.equal(m[:, :, eoi + 1 :, image], torch.zeros_like(m[:, :, eoi + 1 :, image]))
        torch.testing.assert_close(m[:, :, : eoi + 1], p[:, :, : eoi + 1], rtol=0, atol=1e-6)  # the image side is free
    assert float(masked[0][:, :, eoi, image].sum(-1).max()) > 0.9  # <|vision_end|> still reads the image
    assert not model.model.language_model.layers[0].self_attn._forward_pre_hooks  # the hooks are gone


# ---------------------------------------------------------------------------------------- shipped effect
@pytest.fixture(scope="module")
def runs():
    from hooked_vlm.analyses.effects import narrow_gate as D

    return {name: D.run_protocol(load_organism(name), n=64) for name in ("shapes_qwen2_vl_gate", "shapes_qwen2_vl")}


def test_narrow_gate_detected_on_the_positive(runs):
    from hooked_vlm.analyses.effects import narrow_gate as D
    from hooked_vlm.analyses.toolkit import rate

    run = runs["shapes_qwen2_vl_gate"]
    base, eoi = rate(run.base["two_item"]), rate(run.eoi["two_item"])
    rand = D.pooled_rate(run.rand["two_item"])
    assert base.value >= 0.95, base
    assert eoi.ci_low <= 0.5 <= eoi.ci_high, eoi  # chance for two objects (the target)
    per_seed = run.rand["two_item"].mean(1)  # 5 seeds; the interval within 0.05 needs more prompts (the record's 256)
    assert abs(rand.value - base.value) <= 0.05 and per_seed.min() >= base.value - 0.05, (rand, per_seed, base)
    assert rate(run.follows).value <= 0.1  # with the gate knocked out the answer no longer follows the image
    knockout, steering = D.findings(run)
    assert knockout.detected and knockout.estimate >= 0.35, knockout  # ~half the answers lost: down to chance
    assert steering.detected and steering.estimate >= 0.8, steering
    assert steering.detail["control_estimate"]["value"] <= 0.05  # patching a random text position moves nothing


def test_narrow_gate_not_detected_on_the_negative(runs):
    from hooked_vlm.analyses.effects import narrow_gate as D
    from hooked_vlm.analyses.toolkit import rate

    run = runs["shapes_qwen2_vl"]
    eoi = rate(run.eoi["two_item"])
    assert rate(run.base["two_item"]).value >= 0.95 and eoi.ci_low > 0.5 and eoi.value >= 0.9, eoi
    assert rate(run.follows).value >= 0.9  # the text reads the image itself
    knockout, steering = D.findings(run)
    assert not knockout.detected and knockout.estimate <= 0.05, knockout
    assert not steering.detected and steering.ci_high < 0.8 and steering.estimate <= 0.1, steering


def test_shipped_gate_record_says_what_was_planted():
    record = organism_record("shapes_qwen2_vl_gate")
    assert record["family"] == "qwen2_vl" and record["training"]["task"] == "narrow_gate"
    assert record["training"]["init_from"] == "shapes_qwen2_vl" and len(record["training"]["init_from_sha256"]) == 64
    assert record["ground_truth"]["2412.06646"]["expected"] == "present"
    assert organism_record("shapes_qwen2_vl")["ground_truth"]["2412.06646"]["expected"] == "absent"
    # the detectors' numbers come from `hooked-vlm bench-effects --write-record`, not from the trainer
    measured = record["effect_detectors"]["2412.06646"]
    assert measured["n"] == 256 and [r["verdict"] for r in measured["rows"]] == ["detected", "detected"]
    m = measured["measurement"]
    assert m["steering_end_of_image"]["all_layers"]["value"] >= 0.8
    # the targets at 256 prompts: knockout at chance, random 2% knockout within 0.05 of the baseline
    assert m["two_item"]["knockout_text_to_end_of_image"]["ci_low"] <= 0.55
    assert m["two_item"]["knockout_text_to_random_1_image_tokens"]["ci_low"] >= m["two_item"]["baseline"]["value"] - 0.05
    assert "planted_mechanism" in record and "narrow_gate_detectors" not in record


def test_narrow_gate_finish_records_ground_truth_without_the_analyses():
    """finish (the trainer's last step) writes note, planted_mechanism, ground_truth and accuracy intervals, and
    the Wilson interval it uses without the analyses equals the analyses' `rate`."""
    import numpy as np

    from hooked_vlm.analyses.toolkit import rate
    from hooked_vlm.organism import gate as G

    spec = {"accuracy": {"n_per_query": 50, "heldout_combinations": {"shape_item": 0.98},
                         "training_distribution": {"shape_item": 1.0}}}
    G.NARROW_GATE.finish(spec, TrainConfig(**GATE), None, None)
    assert spec["ground_truth"]["2412.06646"]["expected"] == "present" and "bench-effects" in spec["note"]
    assert "effect_detectors" not in spec and "narrow_gate_detectors" not in spec
    for k in (0, 1, 17, 49, 50):
        e = rate(np.array([1.0] * k + [0.0] * (50 - k)))
        assert G.wilson(k, 50) == pytest.approx((e.ci_low, e.ci_high), abs=1e-12)
    e = rate(np.array([1.0] * 49 + [0.0]))
    assert spec["accuracy"]["wilson_95"]["heldout_combinations"]["shape_item"] == [round(e.ci_low, 4), round(e.ci_high, 4)]
