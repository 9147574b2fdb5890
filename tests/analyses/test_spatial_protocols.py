"""The paper protocols of 2603.22278 (analyses/spatial_probes.py, criss_cross.py, spatial_amplify.py) on hand-built
cases with known answers; the organism runs at the end."""
import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm import HookedVLM
from hooked_vlm.analyses import spatial
from hooked_vlm.analyses.criss_cross import (candidate_probs, criss_cross_pairs, interchange_hook, interchange_logits, pair_positions,
                                             regions)
from hooked_vlm.analyses.spatial_amplify import _score, column_projection
from hooked_vlm.analyses.spatial_probes import object_classes, prompt_accuracy
from hooked_vlm.analyses.toolkit import run_cached
from hooked_vlm.organism import CHECKPOINTS

LEFT, RIGHT = (0.0, 0.25, 0.25, 0.75), (0.75, 0.25, 1.0, 0.75)  # on the tiny 4 x 4 grid: column 0 / 3, rows 1-2


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, seed=0)
    return model, inputs, model.layout(inputs)


def squares_pixels(colours, size=32, patch=8):
    """[batch, 3, size, size]: per prompt a colour (3-vector) filling column 0 and one filling the last column,
    rows 1-2 (patch-aligned), zero elsewhere."""
    x = torch.zeros(len(colours), 3, size, size)
    for b, (a, c) in enumerate(colours):
        x[b, :, patch:3 * patch, :patch] = torch.tensor(a)[:, None, None]
        x[b, :, patch:3 * patch, size - patch:] = torch.tensor(c)[:, None, None]
    return x


# ------------------------------------------------------------------------------------------------ labels
def test_object_classes_order_and_absolute():
    assert object_classes([RIGHT, LEFT]) == [1, 0]
    thirds = [(0.7, 0, 0.9, 1), (0.05, 0, 0.2, 1), (0.4, 0, 0.6, 1)]
    assert object_classes(thirds) == [2, 0, 1] and object_classes(thirds, "absolute", 3) == [2, 0, 1]
    both_right = [(0.55, 0, 0.7, 1), (0.8, 0, 0.95, 1)]  # a shifted pair: order and image half disagree
    assert object_classes(both_right) == [0, 1] and object_classes(both_right, "absolute", 2) == [1, 1]
    with pytest.raises(ValueError, match="one class per object"):
        object_classes(thirds, "order", 2)


def test_position_labels_from_the_layout(tiny):
    model, inputs, layout = tiny
    lab = spatial.position_labels(layout, [[RIGHT, LEFT], [LEFT, RIGHT]])
    img = layout.image_positions()
    for b in range(2):
        col = layout.col[b][img[b]]
        row = layout.row[b][img[b]]
        got = lab[b][img[b]]
        inside = (row >= 1) & (row <= 2)
        assert (got[inside & (col == 0)] == 0).all() and (got[inside & (col == 3)] == 1).all()
        assert (got[~inside | (col == 1) | (col == 2)] == -1).all()
    assert (lab[~img] == -1).all() and int((lab >= 0).sum()) == 8  # 2 prompts x 2 objects x 2 tokens
    with pytest.raises(ValueError, match="fractions"):
        spatial.position_labels(layout, [[(0, 0, 2, 1)], [(0, 0, 1, 1)]])


# ------------------------------------------------------------------------------------------------ probes
def test_train_probe_defaults_are_the_papers():
    import inspect

    kw = {k: v.default for k, v in inspect.signature(spatial.train_probe).parameters.items()}
    assert (kw["lr"], kw["weight_decay"], kw["epochs"], kw["batch_size"]) == (1e-3, 1e-4, 200, None)


def test_train_probe_is_the_papers_two_column_probe():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g)
    w = torch.randn(10, generator=g)
    keep = (x @ w).abs() > 0.5
    x, y = x[keep], (x[keep] @ w > 0).long()
    p = spatial.train_probe(x[:200], y[:200], 2, epochs=2000)  # unit-scale features need more than the paper's 200
    assert p.W.shape == (10, 2) and p.columns().shape == (2, 10)  # a binary probe has two columns
    assert p.accuracy(x[200:], y[200:]) > 0.97
    with pytest.raises(ValueError, match="labels must lie"):
        spatial.train_probe(x[:5], torch.tensor([0, 1, 2, 0, 1]), 2)


def test_position_probe_recovers_a_planted_linear_label(tiny):
    """Labels planted as the sign of one coordinate of the projector output (tokens near the threshold left out):
    the held-out accuracy must be ~1 with an interval, far above chance."""
    model, inputs, layout = tiny
    inputs = {**inputs, "pixel_values": torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
              "input_ids": inputs["input_ids"][:1].expand(16, -1), "attention_mask": inputs["attention_mask"][:1].expand(16, -1)}
    layout = model.layout(inputs)
    img = layout.image_positions()
    feats, _ = spatial.activations_at(model, inputs, ["hook_embed"], img)
    v = feats["hook_embed"][:, 0]
    thr, margin = v.median(), 0.5 * v.std()
    lab = torch.full(layout.shape, -1)
    lab[img] = torch.where(v > thr + margin, 1, torch.where(v < thr - margin, 0, -1))
    res = spatial.position_probe(model, inputs, lab)
    assert res.test_acc.value > 0.9 and res.test_acc.ci_low > res.chance + 0.2  # 48-d features, ~150 training tokens
    assert res.test_acc.n == 4 and res.n_tokens[1] > 0


def test_prompt_accuracy_is_a_cluster_bootstrap():
    est = prompt_accuracy(torch.tensor([True, True, False, True]), torch.tensor([0, 0, 1, 1]))
    assert est.value == 0.75 and est.n == 2 and est.ci_low <= 0.75 <= est.ci_high


def test_absolute_vs_relative_follows_what_the_features_encode(tiny):
    """Features encode the 'absolute' label; the relative label disagrees on a third of the tokens: trained on
    agreeing tokens only, the probe follows the absolute label where they disagree."""
    model, inputs, _ = tiny
    n = 24
    inputs = {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
              "input_ids": inputs["input_ids"][:1].expand(n, -1), "attention_mask": inputs["attention_mask"][:1].expand(n, -1)}
    layout = model.layout(inputs)
    img = layout.image_positions()
    v = spatial.activations_at(model, inputs, ["hook_embed"], img)[0]["hook_embed"][:, 0]
    thr, margin = v.median(), 0.5 * v.std()
    absolute = torch.full(layout.shape, -1)
    absolute[img] = torch.where(v > thr + margin, 1, torch.where(v < thr - margin, 0, -1))
    relative = absolute.clone()
    flip = (torch.rand(layout.shape, generator=torch.Generator().manual_seed(5)) < 0.33) & (absolute >= 0)
    relative[flip] = 1 - relative[flip]
    res = spatial.absolute_vs_relative(model, inputs, relative, absolute, epochs=300)
    assert res.follows_absolute.value > 0.9 and res.follows_relative.value < 0.1 and res.n_disagree > 10
    with pytest.raises(ValueError, match="disagree"):
        spatial.absolute_vs_relative(model, inputs, absolute, absolute)


# ------------------------------------------------------------------------------------------ criss-cross
def test_regions_objects_and_strips(tiny):
    _, _, layout = tiny
    boxes = [[LEFT, RIGHT], [LEFT, RIGHT]]
    (a, b), valid = regions(layout, boxes, "object")
    assert valid.all() and int(a[0].sum()) == 2 and torch.equal(layout.col[0][a[0]], torch.tensor([0, 0]))
    (a, b), valid = regions(layout, boxes, "strip")
    assert int(a[0].sum()) == 4 and int(b[0].sum()) == 4 and torch.equal(layout.col[0][b[0]], torch.tensor([3] * 4))
    overlapping = [[(0, 0, 0.7, 1), (0.3, 0, 1, 1)]] * 2  # columns 0-2 and 1-3
    assert not regions(layout, overlapping, "strip")[1].any()
    pairs = pair_positions(layout, a, layout, b)
    assert [int(layout.row[0, d]) for d in pairs[0][0]] == [int(layout.row[0, s]) for s in pairs[0][1]]


def test_criss_cross_with_identical_runs_is_the_identity(tiny):
    """Identical clean and counterfactual runs, each region taken from itself: logits unchanged EXACTLY at every
    site; crossed instead, the interchange equals swapping the two regions inside the clean run."""
    model, inputs, layout = tiny
    boxes = [[LEFT, RIGHT]] * 2
    base = model(**inputs)
    sites = spatial.default_sites(model)
    _, cache = run_cached(model, inputs, sites)
    straight, _ = criss_cross_pairs(layout, layout, boxes, cross=False)
    for s in sites:
        assert torch.equal(interchange_logits(model, inputs, cache[s], straight, s), base)
    crossed, _ = criss_cross_pairs(layout, layout, boxes)
    (ra, rb), _ = regions(layout, boxes)
    swapped = interchange_logits(model, inputs, cache[sites[0]], crossed, sites[0])

    def swap(act, hook):
        out = act.clone()
        out[ra], out[rb] = act[rb], act[ra]
        return out

    with model.hooks(fwd_hooks=[(sites[0], swap)]):
        assert torch.equal(model(**inputs), swapped)
    assert not torch.allclose(swapped, base)
    cands = torch.tensor([[5, 9], [5, 9]])
    top = candidate_probs(base, inputs["attention_mask"], cands).argmax(1)
    res = spatial.criss_cross(model, inputs, inputs, straight, cands, top, top)
    assert all(torch.equal(res.probs[s], res.clean_probs) for s in sites)
    assert res.kept[sites[0]].value == 1.0 and res.flipped[sites[0]].n == 2


def test_criss_cross_moves_only_position():
    """Colour-reversed counterfactual of patch-aligned squares: with the vision tower's position embeddings zeroed,
    each token's features depend on its content alone, so clean-left <- cf-right (same colour) changes nothing at
    the LM input; with them, the moved tokens carry the other position and the logits change."""
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, seed=1)
    red, blue, green = (1.0, -0.5, -0.5), (-0.5, -0.5, 1.0), (-0.5, 1.0, -0.5)
    clean = {**inputs, "pixel_values": squares_pixels([(red, blue), (green, red)])}
    cf = {**inputs, "pixel_values": squares_pixels([(blue, red), (red, green)])}
    layout = model.layout(clean)
    pairs, valid = criss_cross_pairs(layout, model.layout(cf), [[LEFT, RIGHT]] * 2)
    site = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        model.vision.pos_embed.zero_()
        base = model(**clean)
        patched = interchange_logits(model, clean, run_cached(model, cf, [site])[1][site], pairs, site)
        assert valid.all() and (patched - base).abs().max() < 1e-4
        hf2 = tiny_llava()
        model = HookedVLM.from_hf(hf2)  # position embeddings back
        base = model(**clean)
        patched = interchange_logits(model, clean, run_cached(model, cf, [site])[1][site], pairs, site)
        assert (patched - base).abs().max() > 1e-2


def test_vision_ablation_identity_and_replacement(tiny):
    """References and empty image = the input itself: the ablation is the identity. With another empty image,
    the background tokens at the LM input become that image's tokens."""
    model, inputs, layout = tiny
    (ra, rb), _ = regions(layout, [[LEFT, RIGHT]] * 2)
    cands, ans = torch.tensor([[5, 9], [5, 9]]), torch.tensor([0, 1])
    res = spatial.vision_ablation(model, inputs, [ra, rb], [inputs, inputs], [ra, rb], inputs, cands, ans)
    assert torch.equal(res.clean_probs, res.ablated_probs) and res.clean_acc == res.ablated_acc
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    site = "blocks.0.hook_resid_pre"
    _, ref = run_cached(model, other, [site])
    _, mine = run_cached(model, inputs, [site])
    got = {}
    pairs = pair_positions(layout, layout.image_positions(), layout, layout.image_positions())
    hook = interchange_hook(ref[site], pairs)
    out = hook(mine[site])
    bg = layout.image_positions() & ~ra & ~rb
    assert torch.equal(out[bg], ref[site][bg]) and torch.equal(out[~layout.image_positions()], mine[site][~layout.image_positions()])
    del got


# ------------------------------------------------------------------------------------------ amplification
def test_column_projection_and_alpha_zero(tiny):
    model, inputs, _ = tiny
    w = torch.tensor([[3.0, 0, 0], [0, 0, 2.0]])
    h = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(column_projection(h, w), torch.tensor([[1.0, 0.0, 3.0]]))
    assert torch.allclose(column_projection(h, torch.tensor([[1.0, 1.0, 0]])), torch.tensor([[1.5, 1.5, 0.0]]))
    cols = torch.randn(2, model.cfg.d_model)
    assert torch.equal(spatial.amplify_columns(model, inputs, cols, 0.0), model(**inputs))
    assert not torch.allclose(spatial.amplify_columns(model, inputs, cols, 4.0), model(**inputs))


def test_fix_rates_on_a_hand_built_sweep():
    base = torch.tensor([False, False, False, True, True])
    correct = torch.tensor([[True, False, False, True, True],   # alpha 1: fixes 1 of 3
                            [False, True, True, False, True]])  # alpha 2: fixes 2 of 3, breaks 1 of 2
    s = _score(correct, base, [1.0, 2.0])
    assert s.best_alpha == 2.0 and s.fix_global.value == pytest.approx(2 / 3) and s.fix_global.n == 3
    assert s.fix_oracle.value == 1.0 and s.broken.value == 0.5 and len(s.accuracy) == 2


def test_amplification_protocol_counts_failures_and_controls(tiny):
    model, inputs, _ = tiny
    cands = torch.tensor([[5, 9], [5, 9]])
    with torch.no_grad():
        top = candidate_probs(model(**inputs), inputs["attention_mask"], cands).argmax(1)
    wrong = 1 - top  # every prompt is a failure by construction
    res = spatial.amplification_protocol(model, inputs, torch.randn(2, model.cfg.d_model), wrong, cands,
                                         alphas=(0.0, 50.0), control_seeds=(0, 1, 2))
    assert res.n_failures == 2 and res.baseline.value == 0.0 and res.probe.accuracy[0].value == 0.0
    assert len(res.controls) == 3 and res.control_fix_global.n == 3 and res.summary()["n_failures"] == 2


# ------------------------------------------------------------------------------------------------ organism
needs_random = pytest.mark.skipif(not (CHECKPOINTS / "shapes_llava_random" / "config.json").exists(),
                                  reason="no shapes_llava_random checkpoint")


@needs_random
def test_organism_criss_cross_answers_follow_the_moved_tokens_until_layer_1():
    """shapes_llava_random, "The {shape} is": interchanged at the LM input the answer follows the moved tokens
    (the object's content); from resid_post 1 on the final token has read the image and nothing flips."""
    from hooked_vlm.analyses import tasks
    from hooked_vlm.organism import load_organism

    model = load_organism("shapes_llava_random")
    res = tasks.shapes_criss_cross(model, n=24, seed=0, kind="object")
    assert res.flipped["blocks.0.hook_resid_pre"].value > 0.75
    assert res.flipped["blocks.1.hook_resid_post"].value == 0.0 and res.kept["blocks.3.hook_resid_post"].value == 1.0


needs_qwen = pytest.mark.skipif(not (CHECKPOINTS / "shapes_qwen2_vl" / "config.json").exists(),
                                reason="no shapes_qwen2_vl checkpoint")


@needs_qwen
def test_organism_qwen2_vl_m_rope_strips_and_ablation():
    """The M-RoPE organism (2x2 merger): strips interchanged at the LM input flip every golden pair and none from
    layer 1 on; the full-grid vision ablation keeps its accuracy (it needs no positions for "The {shape} is")."""
    from hooked_vlm.analyses import tasks
    from hooked_vlm.organism import load_organism

    model = load_organism("shapes_qwen2_vl")
    res = tasks.shapes_criss_cross(model, n=16, seed=0, layout="fixed", kind="strip")
    assert res.scored.sum() == 16 and res.flipped["blocks.0.hook_resid_pre"].value == 1.0
    assert res.flipped["blocks.1.hook_resid_post"].value == 0.0
    abl = tasks.shapes_vision_ablation(model, n=16, seed=0, layout="fixed")
    assert abl.clean_acc.value == 1.0 and abl.ablated_acc.value >= 0.9


def test_paper_stimuli_through_a_real_processor_any_resolution():
    """2603.22278's three squares (stimuli.spatial_scenes, 64 px) through LLaVA-OneVision's own processor (anyres
    crops): 3-class order labels follow the columns of the base grid, and the strip criss-cross pairs the left
    strip with the counterfactual's right one, on every layer's site."""
    from tiny import onevision_processor, tiny_llava_onevision

    from hooked_vlm.analyses.stimuli import colour_reversed, spatial_scenes, to_inputs

    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    model = HookedVLM.from_hf(hf, proc)
    stims = spatial_scenes(3, n_objects=3, image_size=64, seed=0)
    one = torch.ones(3, dtype=torch.long)
    clean = to_inputs(proc, stims, batch_num_images=one)
    cf = to_inputs(proc, [colour_reversed(s) for s in stims], batch_num_images=one)
    boxes = [[o.box for o in s.objects] for s in stims]
    lay = model.layout(clean)
    labels = spatial.position_labels(lay, boxes)
    for b in range(3):
        cols = [lay.col[b][labels[b] == k].float().mean() for k in range(3)]
        assert cols[0] < cols[1] < cols[2]
    pairs, valid = criss_cross_pairs(lay, model.layout(cf), boxes, 0, -1, "strip")
    assert valid.all()
    for b, (d, s) in enumerate(pairs):
        left = lay.col[b][d] < 2
        assert left.any() and (lay.col[b][s][left] >= 2).all() and (lay.col[b][s][~left] < 2).all()
    res = spatial.criss_cross(model, clean, cf, pairs, torch.tensor([[5, 9, 11]] * 3), torch.zeros(3).long(),
                              torch.ones(3).long(), valid=valid, golden=False)
    assert len(res.sites) == model.cfg.n_layers + 1 and all(p.shape == (3, 3) for p in res.probs.values())


def test_bad_inputs_get_clear_errors(tiny):
    model, inputs, layout = tiny
    with pytest.raises(ValueError, match="same number"):
        spatial.position_labels(layout, [[LEFT, RIGHT], [LEFT]])
    pairs, _ = criss_cross_pairs(layout, layout, [[LEFT, RIGHT]] * 2)
    cands = torch.tensor([[5, 9], [5, 9]])
    with pytest.raises(ValueError, match="one row per prompt"):
        spatial.criss_cross(model, inputs, inputs, pairs[:1], cands, torch.zeros(2).long(), torch.zeros(2).long())
    with pytest.raises(ValueError, match="no prompt to score"):
        spatial.criss_cross(model, inputs, inputs, pairs, cands, torch.zeros(2).long(), torch.zeros(2).long(),
                            valid=torch.zeros(2, dtype=torch.bool))
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
