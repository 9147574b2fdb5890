"""analyses.attribution: attribution patching is the exact derivative of interpolated patching (finite differences in
float64), a close estimate of real patching when the two runs differ a little, and exactly zero where they agree."""
from __future__ import annotations

import pytest
import torch

from hooked_vlm.analyses.attribution import attribution_patching, plot_attribution
from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm.analyses.patching import patch_heads, patch_resid_by_layer_and_position
from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR
from tiny import llava_inputs, tiny_llava

KINDS = ("resid_pre", "attn_out", "mlp_out")


def _text_cf(model, clean):
    cf = dict(clean, input_ids=clean["input_ids"].clone())
    after = model.layout(clean).text_positions() & (torch.arange(clean["input_ids"].shape[1]) > 5)
    cf["input_ids"][after] = (cf["input_ids"][after] + 7) % (model.cfg.image_token_id - 1) + 1
    return cf


@pytest.fixture(scope="module")
def hf():
    return tiny_llava()


@pytest.fixture(scope="module")
def f64(hf):
    model = HookedVLM.from_hf(hf).double()
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    clean["pixel_values"] = clean["pixel_values"].double()
    corrupt = _text_cf(model, clean)
    corrupt["pixel_values"] = llava_inputs(hf, batch=2, pad_left=1, seed=1)["pixel_values"].double()
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    return model, clean, corrupt, metric


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_matches_finite_difference(f64, direction):
    """d/d(eps) M(a + eps (a_source - a)) at eps = 0, by central differences on interpolated patching, equals
    (a_source - a) . grad for every layer x position (resid, attn_out, mlp_out) and every head (z)."""
    model, clean, corrupt, metric = f64
    eps = 1e-4
    attr = attribution_patching(model, clean, corrupt, metric, hooks=KINDS + ("z",), direction=direction, per_prompt=True)
    n_layers, n_pos = model.cfg.n_layers, clean["input_ids"].shape[1]
    for kind in KINDS:
        kw = dict(hook=kind, direction=direction, per_prompt=True, batch_size=1000, progress=False)
        up = patch_resid_by_layer_and_position(model, clean, corrupt, metric, alpha=eps, **kw).scores
        down = patch_resid_by_layer_and_position(model, clean, corrupt, metric, alpha=-eps, **kw).scores
        fd = (up - down) / (2 * eps)
        assert attr[kind].shape == fd.shape == (n_layers, n_pos, 2)
        assert fd.abs().max() > 1e-2
        torch.testing.assert_close(attr[kind], fd, rtol=1e-4, atol=1e-6)
    kw = dict(direction=direction, per_prompt=True, batch_size=1000, progress=False)
    fd = (patch_heads(model, clean, corrupt, metric, alpha=eps, **kw).scores
          - patch_heads(model, clean, corrupt, metric, alpha=-eps, **kw).scores) / (2 * eps)
    assert attr["z"].shape == (n_layers, model.cfg.n_heads, 2)
    torch.testing.assert_close(attr["z"], fd, rtol=1e-4, atol=1e-6)
    # the per-position head scores sum to the head scores
    torch.testing.assert_close(attr["z_by_pos"].sum(1), attr["z"])


def test_per_prompt_equals_single_prompts(f64):
    """One backward of the summed metric gives every prompt's own gradient (prompts never interact)."""
    model, clean, corrupt, metric = f64
    both = attribution_patching(model, clean, corrupt, metric, per_prompt=True)
    for b in range(2):
        one = lambda d: {k: v[b : b + 1] for k, v in d.items()}  # noqa: E731
        m = LogitDiff(metric.answer[b : b + 1], metric.wrong[b : b + 1], clean["attention_mask"][b : b + 1])
        single = attribution_patching(model, one(clean), one(corrupt), m, per_prompt=True)
        for key, value in both.scores.items():
            torch.testing.assert_close(value[..., b], single[key][..., 0], rtol=1e-9, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_close_to_real_patching_for_small_differences(hf):
    """Image counterfactual with a slightly perturbed image: attribution ~= activation patching everywhere."""
    model = HookedVLM.from_hf(hf)
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    gen = torch.Generator().manual_seed(3)
    corrupt = dict(clean, pixel_values=clean["pixel_values"] + 0.01 * torch.randn(clean["pixel_values"].shape, generator=gen))
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    attr = attribution_patching(model, clean, corrupt, metric, hooks=KINDS + ("z", "projector.hook_out"))
    for kind in KINDS:
        real = patch_resid_by_layer_and_position(model, clean, corrupt, metric, hook=kind, batch_size=1000,
                                                 progress=False).effect()
        est = attr[kind]
        corr = torch.corrcoef(torch.stack([real.flatten(), est.flatten()]))[0, 1]
        assert corr > 0.999, (kind, corr)
        assert (real - est).abs().max() < 0.05 * real.abs().max(), kind
        # before the image the two runs agree exactly: both are zero there
        first_img = int(model.layout(clean).image_positions().any(0).nonzero()[0])
        assert (est[:, :first_img] == 0).all()
    real = patch_heads(model, clean, corrupt, metric, progress=False).effect()
    corr = torch.corrcoef(torch.stack([real.flatten(), attr["z"].flatten()]))[0, 1]
    assert corr > 0.999 and (real - attr["z"]).abs().max() < 0.05 * real.abs().max()
    # a plain hook name: one score per image token (projector.hook_out is [n_image_tokens, d], reading order)
    assert attr["projector.hook_out"].shape == (int(model.layout(clean).is_image.sum()),)
    fig = plot_attribution(attr, "resid_pre", model.layout(clean))
    assert fig.data[0].z.shape == attr["resid_pre"].shape
    assert plot_attribution(attr, "z").data[0].z.shape == attr["z"].shape


def test_errors(hf):
    model = HookedVLM.from_hf(hf)
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="direction"):
        attribution_patching(model, clean, clean, metric, direction="up")
    with pytest.raises(ValueError, match="pattern"):
        attribution_patching(model, clean, clean, metric, hooks=("pattern",))
    zero = attribution_patching(model, clean, clean, metric)
    assert all((v == 0).all() for v in zero.scores.values())


needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no shipped organism")


@needs_organism
def test_organism_retrieval_head_ranks_first():
    """On the Shapes organism (swap_shapes), attribution at the final token puts the planted retrieval head L2H0
    first, as real patching does (the image-lookup head L1H0 saturates: attribution is only first order)."""
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = HookedVLM.from_pretrained(str(ORGANISM_DIR))
    pairs = ShapesGenerator(11).pairs(8, "swap_shapes", "shape_item")
    clean, corrupt = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    final = model.layout(clean.inputs).final_token()
    attr = attribution_patching(model, clean.inputs, corrupt.inputs, clean.logit_diff(), hooks=("z",), positions=final)
    n_heads = attr["z"].shape[1]
    assert int(attr["z"].flatten().argmax()) == 2 * n_heads + 0


def test_parameters_are_frozen_only_during_the_backward(f64):
    """Gradients flow to activations only (no weight-gradient graph); requires_grad is restored, also on error."""
    from hooked_vlm.analyses.attribution import gradients

    model, clean, corrupt, metric = f64
    seen = []
    probe = ("blocks.0.hook_resid_pre", lambda t, hook: seen.append(any(p.requires_grad for p in model.parameters())))
    with model.hooks(fwd_hooks=[probe]):
        gradients(model, clean, metric, ["blocks.1.hook_resid_pre"])
    assert seen == [False] and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())

    def boom(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        gradients(model, clean, boom, ["blocks.1.hook_resid_pre"])
    assert all(p.requires_grad for p in model.parameters())
