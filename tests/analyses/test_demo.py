"""`hooked-vlm demo` end to end on three shipped organisms (small n): the report is written and its headline numbers
hold (accuracy, the shape-swap flip, the position-swap keep, planted heads found by the circuit-recovery section)."""
import json

import pytest

from analyses.demo import run_demo


@pytest.mark.parametrize("organism", ["shapes_llava", "shapes_qwen2_vl", "shapes_qwen3_vl", "shapes_gemma3"])
def test_demo_runs_and_reports(organism, tmp_path):
    summary = run_demo(model_path=organism, out_dir=str(tmp_path), n=32, seed=0)
    html = (tmp_path / "index.html").read_text()
    assert "plotly" in html.lower() and "PLANTED" in html
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]
    assert min(summary["accuracy"]["heldout"].values()) >= 0.9
    assert summary["counterfactuals"]["swap_shapes/shape_item"] >= 0.9
    assert summary["counterfactuals"]["swap_positions/shape_item"] >= 0.9
    image_rows = [r for r in summary["circuit_recovery"] if r["counterfactual"].startswith("image")]
    assert min(r["rank L2H0"] for r in image_rows) == 1 or min(r["rank L1H0"] for r in image_rows) == 1
