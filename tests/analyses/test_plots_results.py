"""analyses.plots takes the analyses' result objects directly and shares colour ranges between figures."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hooked_vlm.analyses import plots
from hooked_vlm.analyses.attribution import AttributionResult
from hooked_vlm.analyses.toolkit import SweepResult
from hooked_vlm.positions import TokenLayout


def layout(pos=6):
    ids = torch.arange(pos)[None] + 3
    minus = torch.full_like(ids, -1)
    return TokenLayout(ids, torch.ones_like(ids), torch.arange(pos)[None], torch.zeros_like(ids, dtype=torch.bool),
                       minus, minus, minus, minus, minus)


def test_result_objects_are_plotted_by_their_scores():
    scores = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    result = SweepResult(scores=scores, clean=torch.tensor(1.0), corrupt=torch.tensor(0.0), direction="denoise")
    direct = plots.plot_layer_position(scores, layout())
    via = plots.plot_layer_position(result, layout())
    np.testing.assert_array_equal(np.asarray(via.data[0].z), np.asarray(direct.data[0].z))
    heads = SimpleNamespace(scores=scores[:, :4])  # any object with a `.scores` tensor (e.g. EdgeGraph)
    np.testing.assert_array_equal(np.asarray(plots.plot_heads(heads).data[0].z), scores[:, :4].numpy())
    one = AttributionResult(scores={"z": scores[:, :4]}, clean=torch.tensor(1.0), corrupt=torch.tensor(0.0),
                            direction="denoise")
    np.testing.assert_array_equal(np.asarray(plots.plot_heads(one).data[0].z), scores[:, :4].numpy())
    two = AttributionResult(scores={"z": scores, "resid_pre": scores}, clean=torch.tensor(1.0),
                            corrupt=torch.tensor(0.0), direction="denoise")
    with pytest.raises(ValueError, match=r"\['resid_pre', 'z'\]"):
        plots.plot_heads(two)
    fig = plots.plot_by_layer({"patching": SimpleNamespace(scores=scores[:, 0]), "raw": scores[:, 1]})
    np.testing.assert_allclose(np.asarray(fig.data[0].y), scores[:, 0].numpy())
    table = plots.plot_effect_table({"knockout": SimpleNamespace(scores=torch.tensor([1.0, 3.0]))})
    assert table.data[0].y[0] == pytest.approx(2.0)


def test_shared_colour_range():
    a = torch.tensor([[-1.0, 0.5], [0.25, 2.0]])
    b = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    fa = plots.plot_heads(a)
    ta = fa.data[0]
    assert (ta.zmin, ta.zmax, ta.zmid) == (-2.0, 2.0, 0.0)  # both signs: symmetric around 0
    tb = plots.plot_heads(b).data[0]
    assert (tb.zmin, tb.zmax) == pytest.approx((0.1, 0.4)) and tb.colorscale != ta.colorscale
    shared = plots.plot_heads(b, like=fa).data[0]
    assert (shared.zmin, shared.zmax, shared.zmid, shared.colorscale) == (ta.zmin, ta.zmax, ta.zmid, ta.colorscale)
    fixed = plots.plot_layer_position(b, layout(2), zmin=-1, zmax=1).data[0]
    assert (fixed.zmin, fixed.zmax, fixed.zmid) == (-1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="like="):
        plots.plot_heads(b, like=plots.plot_by_layer(b[0]))


def test_static_export(tmp_path):
    fig = plots.plot_heads(torch.ones(2, 2))
    fig.write_html(tmp_path / "f.html")  # no extra dependency
    assert (tmp_path / "f.html").stat().st_size > 0
    pytest.importorskip("kaleido")  # optional; needs a Chrome / Chromium too (docs/coming_from_transformerlens.md)
    fig.write_image(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
