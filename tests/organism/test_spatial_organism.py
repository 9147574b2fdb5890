"""The spatial-binding organism (issue 19, arXiv 2603.22278): training is deterministic (resume = a straight run), the
training-only image-token shuffle and its supervision targets are what the task says, and on the shipped checkpoints
the criss-cross detector (analyses/effects/spatial_binding.py) says yes on shapes_llava_random_spatial and no on its
matched negative shapes_llava_random."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.analyses.effects import spatial_binding as SB
from hooked_vlm.organism import load_organism, load_organism_hf, organism_record
from hooked_vlm.organism import shapes as S
from hooked_vlm.organism import state as ST
from hooked_vlm.organism import spatial as SP
from hooked_vlm.organism.train import TrainConfig, main, make_batch, train_organism

SPATIAL = dict(task="spatial", family="llava", layout="random", init_from="shapes_llava_random", supervise_steps=2,
               batch_size=2, eval_every=10**6, save_every=2, log_every=1)


def _train(tmp_path, state, steps=4, stop_after=None):
    return train_organism(tmp_path / "out", steps=steps, seed=3, resume=True, state_dir=tmp_path / state,
                          cfg=TrainConfig(**SPATIAL), progress=False, stop_after=stop_after)


def test_spatial_training_resumes_into_the_straight_run(tmp_path):
    # steps 1-2 supervised (L1H0 onto the left object's shuffled tokens), 3-4 free; the shuffle acts on every step
    _train(tmp_path, "straight", stop_after=4)
    for stop in (1, 3, 4):
        _train(tmp_path, "chunked", stop_after=stop)
    a, b = ST.saved_model(tmp_path / "straight"), ST.saved_model(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = ST.read_manifest(tmp_path / "straight")["log"]
    assert [e["supervised"] for e in log] == [True, True, False, False]


@pytest.mark.parametrize("argv,match", [
    (["--layout", "fixed"], "needs --layout random"),
    (["--layout", "random", "--family", "qwen2_vl"], "needs --family llava"),
])
def test_spatial_refuses_what_cannot_plant_it(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        main(["--task", "spatial", "--out", str(tmp_path / "out"), "--steps", "2", *argv])
    assert not (tmp_path / "out").exists()


def test_scenes_answers_and_mirror():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = SP.spatial_scene(rng, "any")
        a, b = scene.boxes
        assert abs(a[0] - b[0]) >= SP.MIN_DX  # x extents apart: "left" is defined
        sample = SP.spatial_sample(scene)
        left = SP.left_object(scene)
        assert scene.positions[left][0] < scene.positions[1 - left][0]
        assert (sample.answer, sample.wrong) == (scene.colours[left], scene.colours[1 - left])
        mirror = SP.mirror_scene(scene)
        assert SP.mirror_scene(mirror) == scene
        assert SP.spatial_sample(mirror).answer == sample.wrong  # mirrored: the other colour is on the left


def test_shuffle_permutes_projector_tokens_and_supervision_follows_them():
    model, _ = load_organism_hf("shapes_llava_random")
    cfg = TrainConfig(**{**SPATIAL, "batch_size": 3})
    task = SP.SPATIAL
    inputs, seqs = make_batch(np.random.default_rng(1), cfg)
    perms = task._perms.clone()
    assert not torch.equal(perms, torch.arange(S.NUM_IMAGE_TOKENS).expand_as(perms))
    seen = {}
    grab = lambda m, a, out: seen.__setitem__("out", out)  # noqa: E731
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        h = proj.register_forward_hook(grab)
        try:
            model(**inputs)
            plain = seen["out"]
            with task.forward_context(model, cfg, 0):
                h.remove()
                h = proj.register_forward_hook(grab)  # after the shuffle's hook
                model(**inputs)
        finally:
            h.remove()
    assert task._perms is None  # one batch, one forward
    for b in range(3):
        torch.testing.assert_close(seen["out"][b], plain[b, perms[b]], rtol=0, atol=0)
        last, keys = seqs[b].sup[SP.LOOKUP_LAYER][0]
        slots = torch.tensor(keys) - 1  # <bos> then the 16 image tokens
        left = SP.left_object(seqs[b].scene)
        assert sorted(perms[b][slots].tolist()) == seqs[b].scene.object_patches(left)
        assert last == len(seqs[b].ids) - 1


def test_mirror_pairs_cross_the_objects_and_control_takes_the_rest():
    model = load_organism("shapes_llava_random")
    pairs = SB._samples("position", 6, seed=4)
    inputs = SB._inputs(model, [c for c, _ in pairs])
    layout = model.layout(inputs)
    scenes = [c.scene for c, _ in pairs]
    objects, background = SB.mirror_pairs(layout, scenes), SB.mirror_pairs(layout, scenes, "background")
    for b, scene in enumerate(scenes):
        img = layout.image_positions()[b].nonzero().flatten()
        (d, s), (bd, bs) = objects[b], background[b]
        assert sorted(torch.cat([d, bd]).tolist()) == img.tolist()  # objects + background = every image token
        assert torch.equal(layout.row[b, d], layout.row[b, s]) and torch.equal(layout.col[b, d], 3 - layout.col[b, s])
        covered = {k for i in range(2) for k in scene.object_patches(i)}
        assert sorted((layout.row[b, d] * 4 + layout.col[b, d]).tolist()) == sorted(covered)
    # the mirrored image is the clean image flipped pixel for pixel
    cf = SB._inputs(model, [m for _, m in pairs], mirrored=True)
    torch.testing.assert_close(cf["pixel_values"], inputs["pixel_values"].flip(-1), rtol=0, atol=0)


def test_ground_truth_records():
    pos, neg = organism_record("shapes_llava_random_spatial"), organism_record("shapes_llava_random")
    assert pos["ground_truth"][SB.PAPER]["expected"] == "present" and "planted_mechanism" in pos
    assert neg["ground_truth"][SB.PAPER]["expected"] == "absent"
    assert pos["accuracy"]["heldout_combinations"]["spatial_left"] >= 0.95


@pytest.mark.parametrize("name,expected", [("shapes_llava_random_spatial", True), ("shapes_llava_random", False)])
def test_detector_on_shipped_checkpoints_fast(name, expected):
    finding, probe = SB.detect(load_organism(name), n=32)
    assert finding.detected is expected, finding.to_dict()
    assert probe.detected is expected, probe.to_dict()
    assert probe.detail["shuffled_label_control"]["value"] <= 0.75  # 8 test prompts: noisy around 0.5
    assert (probe.estimate >= 0.95) if expected else (probe.estimate <= 0.75)
    assert finding.detail["question"] == ("position" if expected else "content")
    assert finding.detail["control"]["value"] <= 0.05
    if expected:
        assert finding.estimate >= 0.8
    else:
        assert finding.estimate <= 0.05
        assert finding.detail["per_site"]["blocks.0.hook_resid_pre"]["content_move"]["value"] >= 0.8  # it reads objects


@pytest.mark.slow
@pytest.mark.parametrize("name,expected", [("shapes_llava_random_spatial", True), ("shapes_llava_random", False)])
def test_detector_on_shipped_checkpoints_default_n(name, expected):
    finding, probe = SB.detect(load_organism(name))
    assert finding.detected is expected and finding.n >= 100 and probe.detected is expected
    assert (finding.estimate >= 0.8) if expected else (finding.estimate <= 0.05)


def test_amplification_fixes_failures_of_the_undertrained_checkpoint_beyond_random_w(tmp_path):
    model = load_organism(SP.undertrained(tmp_path))
    res = SB.amplification(model, n=128)
    assert 0.6 <= res["base_accuracy"] <= 0.85 and res["failures"] >= SB.AMPLIFY_MIN_FAILURES
    assert res["fix_rate"]["ci_low"] > res["random_control"]["ci_high"], res
    assert SB.amplification(load_organism("shapes_llava_random_spatial"), n=32) is None  # nothing to fix
