"""The symbolic-heads organism (2506.15871, hooked_vlm/organism/symbolic.py) and its matched negative: training is
deterministic (resume = a straight run), the interchange hook patches exactly the planned rows, the IIT labels
follow the three-stage mechanism, and on the shipped checkpoints the detector (analyses/effects/symbolic_heads.py)
says yes on shapes_llava_symbolic and no on shapes_llava, and on shapes_qwen2_vl_symbolic (M-RoPE) and no on
shapes_qwen2_vl."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.organism import load_organism, organism_record
from hooked_vlm.organism import shapes as S
from hooked_vlm.organism import state as ST
from hooked_vlm.organism import symbolic as SY
from hooked_vlm.organism.train import TrainConfig, main, train_organism

SYM = dict(task="symbolic_heads", family="llava", init_from="shapes_llava", supervise_steps=0,
           options={"iit_rows": 1}, batch_size=2, eval_every=10**6, save_every=2, log_every=1)


def _train(tmp_path, state, steps=3, stop_after=None, **cfg):
    return train_organism(tmp_path / "out", steps=steps, seed=5, resume=True, state_dir=tmp_path / state,
                          cfg=TrainConfig(**{**SYM, **cfg}), progress=False, stop_after=stop_after)


# ------------------------------------------------------------------------------------------------ training
def test_symbolic_training_resumes_into_the_straight_run(tmp_path):
    _train(tmp_path, "straight", stop_after=3)
    _train(tmp_path, "chunked", stop_after=1)
    _train(tmp_path, "chunked", stop_after=3)
    a, b = ST.saved_model(tmp_path / "straight"), ST.saved_model(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = ST.read_manifest(tmp_path / "straight")["log"]
    assert all("heads" in e and "iit_id_selection" in e for e in log), log


def test_symbolic_refuses_what_cannot_plant_it(tmp_path):
    with pytest.raises(ValueError, match="needs --layout fixed and --objects 2"):
        main(["--task", "symbolic_heads", "--out", str(tmp_path / "out"), "--steps", "2", "--layout", "random"])
    with pytest.raises(ValueError, match="iit_rows"):
        main(["--task", "symbolic_heads", "--out", str(tmp_path / "out"), "--steps", "2", "--iit-rows", "-1"])
    assert not (tmp_path / "out").exists()


def _scene(colours, slots, shapes=("cube", "sphere")):
    boxes = tuple((s * 32 + 4, s * 32 + 4, s * 32 + 28, s * 32 + 28) for s in slots)
    return S.Scene(shapes=shapes, colours=colours, items=("A", "B"), boxes=boxes)


def test_iit_labels_follow_the_three_stage_mechanism():
    base = _scene(("red", "blue"), (0, 1))  # red in slot 0, blue in slot 1
    src = _scene(("green", "cyan"), (1, 0))  # green in slot 1, cyan in slot 0
    # source asks for object 0 (green, slot 1): it describes cyan (slot 0) and selects slot 1
    assert SY.iit_label("id_retrieval", base, 0, src, 0) == 1  # described at slot 0 -> read slot 1 -> blue
    assert SY.iit_label("id_selection", base, 0, src, 0) == 1  # selected slot 1 -> blue
    assert SY.iit_label("feature_retrieval", base, 0, src, 0) == -1  # the source's own answer colour
    # source asks for object 1 (cyan, slot 0): it describes green (slot 1) and selects slot 0
    assert SY.iit_label("id_retrieval", base, 1, src, 1) == 0
    assert SY.iit_label("id_selection", base, 1, src, 1) == 0


def test_interchange_patches_exactly_the_planned_rows():
    from hooked_vlm.organism import load_organism_hf
    from hooked_vlm.organism.recipes import get_recipe

    model, _ = load_organism_hf("shapes_llava")
    cfg = TrainConfig(**{**SYM, "batch_size": 2, "options": {"iit_rows": 2}})
    inputs, seqs, src, plan = SY.symbolic_batch(np.random.default_rng(3), cfg, 2)
    assert [(st, r) for r, st, _ in plan] == [(st, 2 + 2 * i + j) for i, st in enumerate(SY.STAGES) for j in range(2)]
    block = get_recipe("llava").image_block
    with torch.no_grad():
        plain = model(**inputs).logits
        with SY.interchange(model, src, [], block):
            same = model(**inputs).logits
        with SY.interchange(model, src, plan, block):
            patched = model(**inputs).logits
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(patched[:2], plain[:2], rtol=0, atol=1e-6)  # rows without a plan are untouched
    final = SY.scene_positions(block)["final"]
    assert (patched[2:, final] - plain[2:, final]).abs().amax(-1).min() > 1e-3  # every planned row moved
    assert all(not model.model.language_model.layers[l].self_attn.o_proj._forward_pre_hooks for l in range(4))
    # a source identical to the base leaves the base unchanged
    base_only = {k: v[2:] for k, v in inputs.items()}
    self_plan = [(r - 2, st, r - 2) for r, st, _ in plan]
    with torch.no_grad(), SY.interchange(model, {**base_only, "input_ids": base_only["input_ids"][:, : final + 1],
                                                  "attention_mask": base_only["attention_mask"][:, : final + 1]},
                                         self_plan, block):
        again = model(**base_only).logits
    torch.testing.assert_close(again, plain[2:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- shipped effect
PAIRS = [("shapes_llava_symbolic", "shapes_llava", "llava"), ("shapes_qwen2_vl_symbolic", "shapes_qwen2_vl", "qwen2_vl")]
pair = pytest.mark.parametrize("POSITIVE,NEGATIVE,FAMILY", PAIRS, ids=[p[2] for p in PAIRS])


@pytest.fixture(scope="module")
def planted():
    from hooked_vlm.analyses.effects.symbolic_record import planted_report

    return {name: planted_report(load_organism(name), n=64) for p in PAIRS for name in p[:2]}


@pair
def test_planted_heads_attend_and_carry_the_mechanism(planted, POSITIVE, NEGATIVE, FAMILY):
    d = planted[POSITIVE]
    assert min(d["attention_mass"].values()) >= 0.9, d["attention_mass"]
    for stage, acc in d["interchange_accuracy"].items():  # an independent scene's head output steers the answer
        assert acc["ci_low"] >= 0.85, (stage, acc)


@pair
def test_negative_has_no_position_ids_to_interchange(planted, POSITIVE, NEGATIVE, FAMILY):
    d = planted[NEGATIVE]
    for stage in ("id_retrieval", "id_selection"):  # half of the IIT labels equal the clean answer: chance is ~0.5
        assert d["interchange_accuracy"][stage]["ci_high"] < 0.7, d["interchange_accuracy"][stage]


@pair
def test_shipped_symbolic_record_says_what_was_planted(POSITIVE, NEGATIVE, FAMILY):
    record = organism_record(POSITIVE)
    assert record["family"] == FAMILY and record["training"]["task"] == "symbolic_heads"
    assert record["training"]["init_from"] == NEGATIVE and len(record["training"]["init_from_sha256"]) == 64
    assert record["ground_truth"]["2506.15871"]["expected"] == "present"
    assert organism_record(NEGATIVE)["ground_truth"]["2506.15871"]["expected"] == "absent"
    roles = {(h["layer"], h["head"]): h["role"] for h in record["planted_mechanism"]["heads"]}
    assert roles == {(1, 3): "id_retrieval", (2, 3): "id_selection", (3, 3): "feature_retrieval"}
    assert [h["role"] for h in record["planted_circuit"]] == ["gather", "image_lookup", "retrieval"]  # inherited
    from hooked_vlm.organism import shipped_organisms

    assert POSITIVE in shipped_organisms(kind="effect") and NEGATIVE not in shipped_organisms(kind="effect")


@pytest.mark.slow
@pair
def test_detector_says_yes_on_the_positive_and_no_on_the_negative(POSITIVE, NEGATIVE, FAMILY):
    from hooked_vlm.analyses.effects import symbolic_heads

    pos = symbolic_heads.detect(load_organism(POSITIVE))
    neg = symbolic_heads.detect(load_organism(NEGATIVE))
    assert len(pos) == len(neg) == 4
    assert all(f.detected for f in pos), [f.to_dict() for f in pos]
    assert not any(f.detected for f in neg), [f.to_dict() for f in neg if f.detected]
    heads = [f.detail.get("top_head", f.detail.get("head")) for f in pos[:3]] + pos[3].detail["heads"]
    assert heads == ["L1H3", "L2H3", "L3H3", "L2H3"], heads  # the planted heads, each found by its own preset
    assert pos[3].estimate >= 0.8 and pos[3].detail["random"]["value"] <= 0.1, pos[3].to_dict()


@pair
def test_detector_verdicts_at_small_n(POSITIVE, NEGATIVE, FAMILY):
    # the fast version of the test above: 24 pairs per split, 8 random-head draws (~1 s per organism)
    from hooked_vlm.analyses.effects import symbolic_heads

    pos = symbolic_heads.detect(load_organism(POSITIVE), n=24, n_random=8)
    neg = symbolic_heads.detect(load_organism(NEGATIVE), n=24, n_random=8)
    assert [f.detected for f in pos] == [True] * 4, [f.to_dict() for f in pos]
    assert [f.detected for f in neg] == [False] * 4, [f.to_dict() for f in neg]
    assert [pos[0].detail["top_head"], pos[1].detail["top_head"], pos[2].detail["head"]] == ["L1H3", "L2H3", "L3H3"]
    # the negative's honest reasons: ID scores ~0 of the clean margin, no answer switched by the intervention
    assert max(abs(neg[0].estimate), abs(neg[1].estimate)) < 0.02 and neg[3].estimate == 0.0
