"""analyses.attention_edits: reweighting by 1, temperature 1 and a zero steering vector are the identity;
reweighting by 0 equals the narrow-gate knockout (and, renormalised, the score-masking knockout); renormalised rows
sum to 1; temperature divides the scores; steering adds exactly alpha * v at the chosen positions, also on
repeated batches and composed with other edits."""
from __future__ import annotations

import pytest
import torch

from hooked_vlm.analyses.attention_edits import (reweight_hooks, run_with_edits, steer, steering_hooks, steering_vector,
                                      temperature_hooks)
from hooked_vlm.analyses.narrow_gate import knockout_hooks, text_after_image
from hooked_vlm import HookedVLM
from hooked_vlm.batching import repeat_inputs
from tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf).double()
    inputs = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    layout = model.layout(inputs)
    return model, inputs, text_after_image(layout), layout.image_positions()


def _identity(name):
    return [(f"blocks.{l}.attn.{name}", lambda x, hook=None: x) for l in range(3)]


def test_identities(setup):
    model, inputs, q, k = setup
    explicit = run_with_edits(model, inputs, _identity("hook_pattern"))  # same (explicit) attention path
    assert torch.equal(run_with_edits(model, inputs, reweight_hooks(model, q, k, 1.0)), explicit)
    torch.testing.assert_close(run_with_edits(model, inputs, reweight_hooks(model, q, k, 1.0, renormalize=True)),
                               explicit, rtol=1e-12, atol=1e-12)
    assert torch.equal(run_with_edits(model, inputs, temperature_hooks(model, 1.0)),
                       run_with_edits(model, inputs, _identity("hook_attn_scores")))
    plain = run_with_edits(model, inputs)
    zero = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    for hook in ("hook_embed", "blocks.1.hook_resid_mid", "resid_pre"):
        assert torch.equal(steer(model, inputs, hook, zero, positions=q, alpha=3.0), plain)
    torch.testing.assert_close(explicit, plain, rtol=1e-9, atol=1e-9)
    both = run_with_edits(model, inputs, steering_hooks(model, "resid_post", zero), reweight_hooks(model, q, k, 1.0))
    assert torch.equal(both, explicit)


def test_zero_weight_is_knockout(setup):
    model, inputs, q, k = setup
    for layers, heads in [(None, None), ([1], [0, 2])]:
        ours = run_with_edits(model, inputs, reweight_hooks(model, q, k, 0.0, layers=layers, heads=heads))
        ko = run_with_edits(model, inputs, knockout_hooks(model, q, k, layers=layers, heads=heads))
        assert torch.equal(ours, ko)
        assert not torch.allclose(ours, run_with_edits(model, inputs))
    ours = run_with_edits(model, inputs, reweight_hooks(model, q, k, 0.0, renormalize=True))
    ko = run_with_edits(model, inputs, knockout_hooks(model, q, k, renormalize=True))
    torch.testing.assert_close(ours, ko, rtol=1e-9, atol=1e-9)


def test_rows_and_temperature(setup):
    model, inputs, q, k = setup
    seen = {}

    def grab(key):
        def fn(x, hook=None):
            seen[key] = x.detach()
        return fn

    name = "blocks.1.attn.hook_pattern"
    with torch.no_grad(), model.hooks(fwd_hooks=_identity("hook_pattern") + [(name, grab("before"))]):
        model(**inputs)
    with torch.no_grad(), model.hooks(fwd_hooks=reweight_hooks(model, q, k, 2.5, layers=1, renormalize=True) + [(name, grab("after"))]):
        model(**inputs)
    before, after = seen["before"], seen["after"]
    rows = q[:, None, :].expand(-1, before.shape[1], -1)
    real = inputs["attention_mask"].bool()[:, None, :, None] & rows[..., None]
    torch.testing.assert_close(after.sum(-1)[rows], torch.ones_like(after.sum(-1)[rows]))
    scale = torch.where(k, 2.5, 1.0).double()[:, None, None, :]  # edited rows: rescaled, then renormalised
    expected = before * scale / (before * scale).sum(-1, keepdim=True)
    torch.testing.assert_close(after[rows], expected[rows])
    torch.testing.assert_close(after[~rows], before[~rows])  # (layers 0, 2 take the fused path here: round-off)
    # temperature: pattern = softmax(scores / T) on the real (unmasked) keys
    with torch.no_grad(), model.hooks(fwd_hooks=temperature_hooks(model, 2.0, layers=1, heads=[3])
                                      + [("blocks.1.attn.hook_attn_scores", grab("s")), (name, grab("p"))]):
        model(**inputs)
    s, p = seen["s"], seen["p"]
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", grab("s0"))]):
        model(**inputs)
    valid = s > torch.finfo(s.dtype).min / 2
    torch.testing.assert_close(s[:, 3][valid[:, 3]], seen["s0"][:, 3][valid[:, 3]] / 2.0)
    torch.testing.assert_close(s[:, :3], seen["s0"][:, :3], rtol=0, atol=0)
    torch.testing.assert_close(p[1, 3, -1], torch.softmax(s[1, 3, -1], -1))


def test_steering_adds_at_positions(setup):
    model, inputs, q, k = setup
    v = torch.randn(model.cfg.d_model, dtype=torch.float64)
    name = "blocks.1.hook_resid_pre"
    seen = {}

    def grab(x, hook=None):
        seen["x"] = x.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, grab)]):
        model(**inputs)
    base = seen["x"]
    rep = repeat_inputs(inputs, 3)  # the builders work on patching sweeps' repeated batches too
    with torch.no_grad(), model.hooks(fwd_hooks=steering_hooks(model, name, v, positions=q, alpha=0.5) + [(name, grab)]):
        model(**rep)
    got = seen["x"]
    expected = torch.where(q[..., None], base + 0.5 * v, base).repeat(3, 1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # a difference-of-means vector and a per-position [batch, pos, d] vector
    other = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
    sv = steering_vector(model, inputs, other, name, positions=k)
    assert sv.shape == (model.cfg.d_model,)
    per_pos = torch.zeros_like(base)
    per_pos[:, -1] = 1.0
    with torch.no_grad(), model.hooks(fwd_hooks=steering_hooks(model, name, per_pos) + [(name, grab)]):
        model(**inputs)
    torch.testing.assert_close(seen["x"], base + per_pos, rtol=0, atol=1e-12)
