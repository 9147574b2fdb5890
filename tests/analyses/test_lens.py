"""analyses.lens: the logit lens at the last layer IS the model's forward; resid_pre of layer l+1 decodes like
resid_post of layer l; token selections, top-k and the logit-difference lens agree with the full lens; the image
plot puts each image token's value at its (row, col)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.analyses.lens import decode, lens_logit_diff, lens_top_k, logit_lens, plot_lens_image
from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm.analyses.plots import token_grid
from hooked_vlm import HookedVLM
from tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    return model, inputs


def test_last_layer_is_the_logits(setup):
    model, inputs = setup
    lens = logit_lens(model, inputs)
    with torch.no_grad():
        logits = model(**inputs)
    assert lens.shape == (model.cfg.n_layers,) + tuple(logits.shape)
    torch.testing.assert_close(lens[-1], logits, rtol=0, atol=1e-6)


def test_resid_pre_is_previous_resid_post(setup):
    model, inputs = setup
    post, pre = logit_lens(model, inputs), logit_lens(model, inputs, hook="resid_pre")
    torch.testing.assert_close(pre[1:], post[:-1], rtol=0, atol=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=["hook_embed"])
        torch.testing.assert_close(pre[0], decode(model, cache["hook_embed"]), rtol=0, atol=0)


def test_tokens_top_k_and_logit_diff(setup):
    model, inputs = setup
    full = logit_lens(model, inputs)
    torch.testing.assert_close(logit_lens(model, inputs, tokens=[3, 7]), full[..., [3, 7]], rtol=0, atol=0)
    per_prompt = logit_lens(model, inputs, tokens=torch.tensor([[3], [7]]))
    torch.testing.assert_close(per_prompt[:, 0, :, 0], full[:, 0, :, 3], rtol=0, atol=0)
    torch.testing.assert_close(per_prompt[:, 1, :, 0], full[:, 1, :, 7], rtol=0, atol=0)
    vals, ids = lens_top_k(model, inputs, k=3)
    torch.testing.assert_close(vals[..., 0], full.max(-1).values, rtol=0, atol=0)
    assert torch.equal(full.gather(-1, ids), vals)
    answer, wrong = torch.tensor([3, 4]), torch.tensor([5, 6])
    ld = lens_logit_diff(model, inputs, answer, wrong)
    assert ld.shape == full.shape[:3]
    with torch.no_grad():
        expected = LogitDiff(answer, wrong)(model(**inputs))  # no padding on the right: last position
    torch.testing.assert_close(ld[-1, :, -1], expected, rtol=0, atol=1e-5)
    sel = logit_lens(model, inputs, positions=[0, 5])
    torch.testing.assert_close(sel, full[:, :, [0, 5]], rtol=0, atol=0)


def test_plot_lens_image(setup):
    model, inputs = setup
    layout = model.layout(inputs)
    ld = lens_logit_diff(model, inputs, 3, 5)  # [layer, batch, pos]
    fig = plot_lens_image(ld[:, 1], layout, inputs["pixel_values"][1], layer=2, batch=1)
    grid = np.asarray(fig.data[1].z, dtype=float)
    np.testing.assert_allclose(grid, token_grid(ld[2, 1], layout, batch=1))
    img = layout.is_image[1].nonzero().flatten()
    p = int(img[5])
    assert grid[int(layout.row[1, p]), int(layout.col[1, p])] == pytest.approx(float(ld[2, 1, p]))
    fig3 = plot_lens_image(ld, layout, inputs["pixel_values"][1], layer=2, batch=1)  # [layer, batch, pos]
    np.testing.assert_allclose(np.asarray(fig3.data[1].z, dtype=float), grid)
