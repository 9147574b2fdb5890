"""The binding-ID organism (issue 19, arXiv 2505.22200): training is deterministic (resume = a straight run), the
training-only mask forbids what it says and nothing else, the ID invariant (structural zeros) holds, and on the shipped
checkpoints the paired per-token Delta detector (analyses/effects/binding_ids.py) says yes on
shapes_llava_binding_ids and no on its matched negative shapes_llava."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.organism import load_organism, organism_record
from hooked_vlm.organism import state as ST
from hooked_vlm.organism.train import TrainConfig, main, train_organism

BIND = dict(task="binding_ids", family="llava", supervise_steps=0, options={"mask_steps": 2},
            batch_size=2, eval_every=10**6, save_every=2, log_every=1)
TEXT = dict(task="binding_ids_text", options={"text_mask_steps": 2})
POSITIVE, NEGATIVE = "shapes_llava_binding_ids", "shapes_llava"
POSITIVE_TEXT = "shapes_llava_binding_ids_text"


def _train(tmp_path, state, steps=4, stop_after=None, **cfg):
    return train_organism(tmp_path / "out", steps=steps, seed=5, resume=True, state_dir=tmp_path / state,
                          cfg=TrainConfig(**{**BIND, **cfg}), progress=False, stop_after=stop_after)


@pytest.mark.parametrize("variant", [{}, TEXT], ids=["binding_ids", "binding_ids_text"])
def test_binding_ids_training_resumes_into_the_straight_run(tmp_path, variant):
    # steps 1-2 masked, 3-4 free (forbidden-attention penalty): both phases
    _train(tmp_path, "straight", stop_after=4, **variant)
    _train(tmp_path, "chunked", stop_after=1, **variant)
    _train(tmp_path, "chunked", stop_after=3, **variant)
    _train(tmp_path, "chunked", stop_after=4, **variant)
    a, b = ST.saved_model(tmp_path / "straight"), ST.saved_model(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = ST.read_manifest(tmp_path / "straight")["log"]
    assert [("forbid" in e, "sup" in e and "id" in e) for e in log] == [(False, True)] * 2 + [(True, True)] * 2


@pytest.mark.parametrize("argv,match", [
    (["--family", "qwen2_vl"], "needs --family llava"),
    (["--supervise-steps", "10"], "pass --supervise-steps 0"),
])
def test_binding_ids_refuses_what_cannot_plant_it(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        main(["--task", "binding_ids", "--out", str(tmp_path / "out"), "--steps", "2", *argv])
    assert not (tmp_path / "out").exists()


def test_mask_forbids_colour_words_to_questions_and_content_to_items():
    from hooked_vlm.organism import binding_ids as B
    from hooked_vlm.organism.train import build_model

    task = B.BINDING_IDS
    cfg = TrainConfig(**{**BIND, "batch_size": 3})
    inputs, seqs = task.make_batch(np.random.default_rng(0), cfg)
    model = build_model(0, 0.1, "llava")
    B.impose_id_invariant(model)
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True).attentions
        with task.forward_context(model, cfg, 0):
            masked = model(**inputs, output_attentions=True).attentions
    forbidden = task._forbidden[0]
    assert all(f is forbidden for f in task._forbidden)
    s = seqs[0]
    last = s.bind["blocks"][0][2]
    assert forbidden[0, :, last, list(s.bind["colour"].values())].all()  # no head of a question reads a colour word
    item = s.bind["item"][0]
    assert forbidden[0, :2, item, s.bind["colour"][0]].all() and not forbidden[0, 2:, item, s.bind["colour"][0]].any()
    assert B.forbidden_penalty(plain, task._forbidden) > 0.1
    for m in masked:
        assert float((m * forbidden).sum()) == 0.0
    # the image side is untouched by the mask
    img = slice(1, 17)
    for p, m in zip(plain, masked):
        torch.testing.assert_close(m[:, :, img], p[:, :, img], rtol=0, atol=1e-6)
    assert all(v == 0.0 for v in B.check_id_invariant(model).values())
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, -1] = 1.0
        with task.forward_context(model, cfg, 0):  # re-imposes the invariant before every forward
            pass
    assert all(v == 0.0 for v in B.check_id_invariant(model).values())


def test_text_variant_mask_lets_only_the_order_head_and_the_id_heads_through():
    from hooked_vlm.organism import binding_ids_text as T

    task = T.BINDING_IDS_TEXT
    inputs, seqs = task.make_batch(np.random.default_rng(1), TrainConfig(**{**BIND, **TEXT, "batch_size": 2}))
    s, f = seqs[0], task._forbidden
    bind = s.bind
    stops = sorted(p + 5 for p in bind["colour"].values())
    item2 = max(bind["item"].values())  # the second sentence's item
    allowed = (~f[0][0, T.ORDER_HEAD[1], item2, : item2 + 1]).nonzero().flatten().tolist()
    assert allowed == [0, stops[0]]  # <bos> and the first sentence's '.'
    last = bind["blocks"][0][2]
    colours = list(bind["colour"].values())
    for layer in range(4):
        assert not f[layer][0, 2:, last, colours].any() and f[layer][0, :2, last, colours].all()
    model = __import__("hooked_vlm.organism.train", fromlist=["build_model"]).build_model(0, 0.1, "llava")
    task.impose(model)
    assert all(v == 0.0 for v in task.check_invariant(model).values())


@pytest.mark.parametrize("name", [POSITIVE, POSITIVE_TEXT])
def test_shipped_binding_ids_keeps_its_invariant(name):
    from hooked_vlm.organism import load_organism_hf, shipped_organisms
    from hooked_vlm.organism.task_api import get_task

    rec = organism_record(name)
    model, _ = load_organism_hf(name)
    assert all(v == 0.0 for v in get_task(rec["training"]["task"]).check_invariant(model).values())
    assert rec["ground_truth"]["2505.22200"]["expected"] == "present"
    assert organism_record(NEGATIVE)["ground_truth"]["2505.22200"]["expected"] == "absent"
    assert rec["accuracy"]["heldout_combinations"]["shape_item"] >= 0.95
    assert name in shipped_organisms("effect") and NEGATIVE not in shipped_organisms("effect")


def test_zero_delta_is_the_identity():
    from hooked_vlm.analyses.binding import resid_names
    from hooked_vlm.analyses.effects import binding_ids as D
    from hooked_vlm.analyses.tasks import shapes_context
    from hooked_vlm.analyses.toolkit import run_cached
    from hooked_vlm.organism.shapes import ShapesGenerator

    model = load_organism(NEGATIVE)
    gen = ShapesGenerator(3)
    scenes = [D.aligned(gen.scene()) for _ in range(4)]
    inputs = D._prompts(model, scenes, [0] * 4)
    slots = D.slot_masks(model, inputs, scenes)
    logits, clean = run_cached(model, inputs, resid_names(model))
    zero = torch.zeros(len(resid_names(model)), int(slots["object"][0][0].sum()), model.cfg.d_model)
    out = D.mean_swap(model, inputs, clean, slots["object"], zero, shapes_context(model, inputs))
    torch.testing.assert_close(out, logits, rtol=0, atol=1e-5)
    assert [int(m[0].sum()) for m in (slots["object"][0], slots["colour"][0], slots["item"][0])] == [4, 2, 2]


@pytest.mark.parametrize("name,expected", [
    (POSITIVE, {"Delta_O": True, "Delta_C": False, "Delta_I": True}),  # the question never reads the colour words
    (POSITIVE_TEXT, {"Delta_O": True, "Delta_C": True, "Delta_I": True}),
    (NEGATIVE, {"Delta_O": False, "Delta_C": False, "Delta_I": False}),
])
def test_detector_says_yes_on_the_positives_and_no_on_the_negative(name, expected):
    from hooked_vlm.analyses.effects.binding_ids import detect

    findings = {f.effect.split()[0]: f for f in detect(load_organism(name), n=24)}
    assert {k: f.detected for k, f in findings.items()} == expected
    per_effect = organism_record(name)["ground_truth"]["2505.22200"]["per_effect"]  # what bench-effects expects
    assert {k: v == "present" for k, v in per_effect.items()} == expected
    for k, f in findings.items():
        assert f.estimate >= 0.8 if expected[k] else f.estimate <= 0.1
        assert f.detail["control_estimate"] <= 0.1
