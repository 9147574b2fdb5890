"""analyses.plots attention views (plot_attention_heads, attention_to_image, circuitsvis_heads) on the organism."""
import sys

import numpy as np
import pytest
import torch

from hooked_vlm.analyses import plots
from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR, ShapesGenerator

pytestmark = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no shipped organism")

HEADS = [(2, 0), (1, 0), (1, 1)]


def pattern_name(layer):
    return f"blocks.{layer}.attn.hook_pattern"


@pytest.fixture(scope="module")
def run():
    torch.set_grad_enabled(False)
    try:
        model = HookedVLM.from_pretrained(str(ORGANISM_DIR))
        # two shape -> item prompts and one (longer) scene prompt: the batch has left padding
        samples = ShapesGenerator(0).samples(2, "shape_item") + ShapesGenerator(1).samples(1, "scene")
        inputs = model.processor(images=[s.image for s in samples], text=[s.prompt for s in samples],
                                 return_tensors="pt", padding=True)
        layout = model.layout(inputs)
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("blocks.") and n.endswith("hook_pattern"))
    finally:
        torch.set_grad_enabled(True)
    return model, samples, layout, cache


def test_one_trace_per_head_with_the_cached_pattern(run):
    model, _, layout, cache = run
    assert not layout.attention_mask.bool().all(), "the batch should have padding"
    for b in range(layout.shape[0]):
        real = layout.attention_mask[b].bool()
        fig = plots.plot_attention_heads(cache, layout, HEADS, batch=b, tokens=model, title="t")
        assert len(fig.data) == len(HEADS)
        for trace, (layer, head) in zip(fig.data, HEADS):
            expected = cache[pattern_name(layer)][b, head][real][:, real].numpy()
            np.testing.assert_allclose(np.asarray(trace.z), expected, rtol=0, atol=1e-7)
            assert list(trace.x) == real.nonzero().flatten().tolist() == list(trace.y)
            assert trace.name == f"L{layer}H{head}"


def test_query_positions_select_rows(run):
    _, _, layout, cache = run
    final = layout.final_token()
    fig = plots.plot_attention_heads(cache, layout, HEADS[:1], batch=1, query_positions=final)
    q = int(final[1].nonzero())
    real = layout.attention_mask[1].bool()
    np.testing.assert_allclose(np.asarray(fig.data[0].z), cache[pattern_name(2)][1, 0, q][real].numpy()[None], atol=1e-7)
    assert list(fig.data[0].y) == [q]


def test_hover_names_query_key_and_image_row_col(run):
    model, _, layout, cache = run
    fig = plots.plot_attention_heads(cache, layout, [(1, 0)], tokens=model)
    trace = fig.data[0]
    keys, queries = list(trace.x), list(trace.y)
    strs = plots.token_strings(layout, 0, model)
    q = len(queries) - 1
    img = [j for j, k in enumerate(keys) if layout.is_image[0, k]]
    assert img
    for j in (img[0], img[-1]):
        k = keys[j]
        text = trace.text[q][j]
        assert f"row {int(layout.row[0, k])} col {int(layout.col[0, k])}" in text
        assert f"query {strs[queries[q]]!r}" in text and f"key {strs[k]!r}" in text
        assert f"{trace.z[q][j]:.4g}" in text
    text_key = next(j for j, k in enumerate(keys) if not layout.is_image[0, k])
    assert "row" not in trace.text[q][text_key]


def test_attention_to_image_sums_to_the_mass_on_image_tokens(run):
    _, samples, layout, cache = run
    for b in range(layout.shape[0]):
        q = int(layout.final_token()[b].nonzero())
        for layer, head in HEADS:
            grid = plots.attention_to_image(cache, layout, layer, head, q, batch=b)
            rows, cols = layout.grids[b][0][0]
            assert grid.shape == (rows, cols) and not np.isnan(grid).any()
            mass = cache[pattern_name(layer)][b, head, q][layout.is_image[b]].sum().item()
            assert grid.sum() == pytest.approx(mass, abs=1e-5)
            r, c = int(layout.row[b, layout.is_image[b]][0]), int(layout.col[b, layout.is_image[b]][0])
            first = int(layout.is_image[b].nonzero()[0])
            assert grid[r, c] == pytest.approx(cache[pattern_name(layer)][b, head, q, first].item())
    # a bool mask (one True per prompt) selects the same query; the overlay figure paints that grid
    grid = plots.attention_to_image(cache, layout, 1, 0, layout.final_token(), batch=2)
    np.testing.assert_array_equal(grid, plots.attention_to_image(cache, layout, 1, 0, q, batch=2))
    fig = plots.plot_attention_to_image(cache, layout, 1, 0, layout.final_token(), samples[2].image, batch=2)
    np.testing.assert_allclose(np.asarray(fig.data[1].z, dtype=float), grid)


def test_errors(run):
    _, _, layout, cache = run
    with pytest.raises(KeyError, match="names_filter"):
        plots.plot_attention_heads({}, layout, [(0, 0)])
    with pytest.raises(ValueError, match="exactly one"):
        plots.attention_to_image(cache, layout, 0, 0, layout.image_positions())


def test_circuitsvis_is_optional(run, monkeypatch):
    _, _, layout, cache = run
    monkeypatch.setitem(sys.modules, "circuitsvis", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "circuitsvis.attention", None)
    with pytest.raises(ImportError, match="pip install circuitsvis"):
        plots.circuitsvis_heads(cache, layout, HEADS)


def test_circuitsvis_heads(run):
    pytest.importorskip("circuitsvis")
    model, _, layout, cache = run
    html = plots.circuitsvis_heads(cache, layout, HEADS, tokens=model)
    assert "AttentionPatterns" in str(html)
