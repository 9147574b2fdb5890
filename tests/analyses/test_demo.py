"""`hooked-vlm demo` end to end on three shipped organisms (small n): the report is written and its headline numbers
hold (accuracy, the shape-swap flip, the position-swap keep, planted heads found by the circuit-recovery section)."""
import json

import pytest

from hooked_vlm.analyses.demo import run_demo


@pytest.mark.parametrize("organism", ["shapes_llava", "shapes_qwen2_vl", "shapes_qwen3_vl", "shapes_gemma3"])
def test_demo_runs_and_reports(organism, tmp_path):
    summary = run_demo(model_path=organism, out_dir=str(tmp_path), n=32, seed=0)
    html = (tmp_path / "index.html").read_text()
    assert "plotly" in html.lower() and "PLANTED" in html
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for split, queries in summary["accuracy"].items():  # summary.json rounds floats to 6 digits
        for q, r in queries.items():
            assert on_disk["accuracy"][split][q] == pytest.approx(r, abs=1e-6)
    assert min(r["value"] for r in summary["accuracy"]["heldout"].values()) >= 0.9
    assert summary["counterfactuals"]["swap_shapes/shape_item"]["value"] >= 0.9
    assert summary["counterfactuals"]["swap_positions/shape_item"]["value"] >= 0.9
    # every rate carries its interval and sample size (issue 17)
    for r in [*summary["accuracy"]["heldout"].values(), *summary["counterfactuals"].values(), *summary["narrow_gate"]["knockout"]]:
        assert set(r) >= {"value", "ci_low", "ci_high", "n"} and r["ci_low"] <= r["value"] <= r["ci_high"]
    means = summary["binding"]["mean_intervention"]  # the paired per-token Delta, both questions, every scale
    for scale in ("1x", "2x", "4x"):
        r = means["O+I"][scale]["both"]
        assert set(r) == {"swapped", "kept", "random_swapped", "random_kept"}
        assert all(set(e) == {"value", "ci_low", "ci_high", "n"} for e in r.values())
    gate = summary["narrow_gate"]
    assert all("control" in r for r in gate["knockout"])  # the text-only control beside every knockout
    assert {r["renormalize"] for r in gate["knockout"]} == {False, True}
    assert len(gate["steering"]["resid"]) == len(gate["steering"]["attn_input"]) > 1
    sp = summary["spatial"]  # 2603.22278's protocols: every rate with its interval
    rates = [*sp["position_probe_test_accuracy"].values(), sp["vision_ablation"]["ablated"],
             *(v["flipped"] for kind in sp["criss_cross"].values() for v in kind.values())]
    assert all(set(r) >= {"value", "ci_low", "ci_high", "n"} and r["ci_low"] <= r["value"] <= r["ci_high"] for r in rates)
    assert sp["criss_cross"]["object"]["L0 input"]["flipped"]["value"] >= 0.8  # the answer follows the moved tokens
    image_rows = [r for r in summary["circuit_recovery"] if r["counterfactual"].startswith("image")]
    assert min(r["rank L2H0"] for r in image_rows) == 1 or min(r["rank L1H0"] for r in image_rows) == 1
