"""analyses.spatial: probes, last-token patching, strip swaps and amplification; mathematics on tiny models,
real effects on the Shapes organism when it exists."""
import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm.analyses.spatial import (activations_at, amplification, amplify, as_sequence, fit_probe, last_token_patching,
                              plot_amplification, plot_layer_patching, plot_probe_accuracy, plot_strip_swaps,
                              probe_hooks, split_prompts, strip_mask, strip_swap_matrix, swap_strips)
from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR

METRIC = LogitDiff([9], [5])


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, seed=0)
    with torch.no_grad():
        base = model(**inputs)
    return model, inputs, model.layout(inputs), base


def test_probe_reaches_100_percent_on_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g) * 3 + 1
    w = torch.randn(12, generator=g)
    score = x @ w
    keep = score.abs() > 0.5 * score.std()  # a margin
    x, y = x[keep], (score[keep] > 0).long()
    test = split_prompts(len(y), 0.3, seed=1)
    p = fit_probe(x[~test], y[~test])
    assert p.accuracy(x[test], y[test]) == 1.0 and p.accuracy(x[~test], y[~test]) == 1.0
    d = p.directions()
    assert d.shape == (1, 12) and torch.cosine_similarity(d[0], w, dim=0) > 0.9
    # three well separated classes
    y3 = torch.randint(0, 3, (len(y),), generator=g)
    x3 = torch.randn(len(y), 12, generator=g) + 12.0 * torch.eye(12)[y3]
    p3 = fit_probe(x3[~test], y3[~test], n_classes=3)
    assert p3.accuracy(x3[test], y3[test]) == 1.0 and p3.directions().shape == (3, 12)


def test_split_prompts():
    t = split_prompts(10, 0.25, seed=0)
    assert t.sum() == 2 and torch.equal(t, split_prompts(10, 0.25, seed=0))
    assert split_prompts(2, 0.01).sum() == 1 and split_prompts(2, 0.99).sum() == 1


def test_projector_view_matches_the_sequence(setup):
    model, inputs, layout, _ = setup
    feats, prompt = activations_at(model, inputs, ["projector.hook_out", "hook_embed"], layout.image_positions())
    torch.testing.assert_close(feats["projector.hook_out"], feats["hook_embed"])
    assert prompt.tolist() == [0] * 16 + [1] * 16
    x = torch.randn(2, 16, 8)
    seq, back = as_sequence(x, layout)
    assert seq.shape == (*layout.shape, 8) and torch.equal(back(seq), x)
    with pytest.raises(ValueError, match="neither"):
        as_sequence(torch.randn(3, 5, 8), layout)


def test_probe_hooks_per_token_and_pooled(setup):
    model, inputs, layout, _ = setup
    more = {k: torch.cat([v] * 3) for k, v in inputs.items()}  # 6 prompts
    more["pixel_values"] = more["pixel_values"] + 0.1 * torch.randn_like(more["pixel_values"])
    lay = model.layout(more)
    labels = torch.where(lay.is_image, (lay.col >= 2).long(), -1)  # left / right half, per image token
    res = probe_hooks(model, more, ["hook_embed", "blocks.1.hook_resid_post"], lay.image_positions(), labels)
    assert set(res) == {"hook_embed", "blocks.1.hook_resid_post"}
    assert res["hook_embed"].train_acc >= 0.9
    pooled = probe_hooks(model, more, ["hook_embed"], lay.image_positions(), torch.tensor([0, 1] * 3), pool=True)
    assert pooled["hook_embed"].probe.W.shape == (model.cfg.d_model, 2)


def test_last_token_patching(setup):
    model, inputs, layout, base = setup
    cf = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    clean_m = METRIC(base)
    same = last_token_patching(model, inputs, inputs, METRIC, per_prompt=True)
    torch.testing.assert_close(same, clean_m[None].expand_as(same), atol=1e-4, rtol=1e-4)
    # the last layer's resid_post at the final token IS the counterfactual's read-out
    post = last_token_patching(model, inputs, cf, METRIC, hook="resid_post", per_prompt=True)
    with torch.no_grad():
        cf_m = METRIC(model(**cf))
    torch.testing.assert_close(post[-1], cf_m, atol=1e-4, rtol=1e-4)
    looped = last_token_patching(model, inputs, cf, METRIC, hook="resid_post", batch_size=1, per_prompt=True)
    torch.testing.assert_close(post, looped, atol=1e-4, rtol=1e-4)
    assert post.shape == (model.cfg.n_layers, 2)


def test_swapping_a_row_with_itself_is_identity_and_swaps_move_features(setup):
    model, inputs, layout, base = setup
    torch.testing.assert_close(swap_strips(model, inputs, "row", 1, 1), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(swap_strips(model, inputs, "col", 2, 2, hook_name="projector.hook_out"), base,
                               atol=1e-6, rtol=1e-6)
    a = swap_strips(model, inputs, "row", 0, 3)
    b = swap_strips(model, inputs, "row", 0, 3, hook_name="projector.hook_out")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-3
    assert strip_mask(layout, "col", 1).sum(1).tolist() == [4, 4]


def test_strip_swap_matrix_is_symmetric_and_batched_equals_single(setup):
    model, inputs, _, base = setup
    m = strip_swap_matrix(model, inputs, METRIC, "col", batch_size=4)
    assert m.shape == (4, 4) and torch.equal(m, m.T) and (m.diag() == 0).all()
    single = (METRIC(swap_strips(model, inputs, "col", 0, 2)) - METRIC(base)).mean()
    torch.testing.assert_close(m[0, 2], single, atol=1e-4, rtol=1e-4)


def test_amplification_alpha_zero_is_identity_and_control_matches_norm(setup):
    model, inputs, layout, base = setup
    dirs = torch.randn(2, model.cfg.d_model)
    torch.testing.assert_close(amplify(model, inputs, dirs, 0.0), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(amplify(model, inputs, dirs, 0.0, control_seed=3), base, atol=1e-6, rtol=1e-6)
    on_resid = amplify(model, inputs, dirs, 2.0)
    on_proj = amplify(model, inputs, dirs, 2.0, hook_name="projector.hook_out")
    torch.testing.assert_close(on_resid, on_proj, atol=1e-5, rtol=1e-5)  # same vectors, two hooks
    assert (on_resid - base).abs().max() > 1e-3
    # the added vectors: the probe's lies in the directions' span; the control has its norm row by row
    h = torch.randn(5, 16)
    u = torch.randn(2, 16)
    add = amplification(h, u, 1.5)
    ctrl = amplification(h, u, 1.5, control_seed=1)
    torch.testing.assert_close(ctrl.norm(dim=-1), add.norm(dim=-1))
    q, _ = torch.linalg.qr(u.T)
    torch.testing.assert_close(amplification(h, u, 0.0), torch.zeros_like(h))
    assert (add - (q @ (q.T @ add.T)).T).abs().max() < 1e-4  # the probe addition lies in the directions' span


def test_plots():
    assert plot_probe_accuracy({"a": 0.5, "b": 0.9}, chance=0.5).data[0].type == "scatter"
    assert plot_layer_patching(torch.randn(4)).data[0].type == "scatter"
    assert plot_strip_swaps(torch.randn(4, 4)).data[0].type == "heatmap"
    assert len(plot_amplification([0, 1], [1, 2], [1, 1]).data) == 2


# ------------------------------------------------------------------------------------------- organism
needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no organism checkpoint")


@pytest.fixture(scope="module")
def organism():
    return HookedVLM.from_pretrained(str(ORGANISM_DIR))


@needs_organism
def test_organism_image_lookup_reaches_the_final_token_in_layer_1(organism):
    """swap_shapes flips the answer; patching the final token's residual from the counterfactual flips it only
    from the input of layer 2 on: the image is read into the final token by layer 1 (the planted lookup head)."""
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = organism
    pairs = ShapesGenerator(5).pairs(12, "swap_shapes", "shape_item")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    per_layer = last_token_patching(model, clean.inputs, cf.inputs, clean.logit_diff())
    assert per_layer[0] > 5 and per_layer[1] > 5  # still the clean answer
    assert per_layer[2] < -5 and per_layer[3] < -5  # the counterfactual's answer


@needs_organism
def test_organism_probes_read_colour_and_place_from_projector_outputs(organism):
    """Per image token of the projector output: the covering object's colour is linearly decodable (test
    accuracy > 0.95, chance ~0.6 with the background class), and so is which block it lies in."""
    from hooked_vlm.analyses.tasks import shapes_token_labels
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = organism
    samples = ShapesGenerator(7).samples(48, "shape_item")
    batch = encode(model.processor, samples)
    img = model.layout(batch.inputs).image_positions()
    colour = shapes_token_labels(model, batch.inputs, samples, "colour")
    block = shapes_token_labels(model, batch.inputs, samples, "block")
    assert probe_hooks(model, batch.inputs, ["projector.hook_out"], img, colour)["projector.hook_out"].test_acc > 0.95
    assert probe_hooks(model, batch.inputs, ["projector.hook_out"], img, block)["projector.hook_out"].test_acc > 0.7
