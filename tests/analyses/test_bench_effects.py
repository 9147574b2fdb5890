"""`hooked-vlm bench-effects` (analyses/effects/runner.py) on the narrow-gate pair at small n: one row per Finding in
the issue's format, the positive detected and the negative not; a paper without a detector module is skipped loudly;
unknown models fail before any work; --write-record fills organism.json; the docs section is generated from rows.
And the layering rule the runner relies on: the core package never imports the analyses."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from hooked_vlm.analyses.effects import narrow_gate, report, runner
from hooked_vlm.cli import main as cli_main
from hooked_vlm.organism import organism_dir

PAIR = ["shapes_qwen2_vl_gate", "shapes_qwen2_vl"]
ISSUE_KEYS = {"organism", "family", "paper", "effect", "expected", "estimate", "ci_low", "ci_high", "control_ci_high",
              "verdict"}


@pytest.fixture(scope="module")
def pair_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    # 32 prompts: at 16 the knockout's interval (a drop to chance loses ~half the answers) can touch the control's
    assert cli_main(["bench-effects", "--model", *PAIR, "--n", "32", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_runner_rows_on_the_gate_pair(pair_rows):
    from hooked_vlm.organism import organism_record

    # every paper each organism's ground truth names gets rows (shapes_qwen2_vl is also the symbolic-heads negative)
    assert {(r["organism"], r["paper"]) for r in pair_rows} == {
        (o, p) for o in PAIR for p in organism_record(o)["ground_truth"]}
    pair_rows = [r for r in pair_rows if r["paper"] == "2412.06646"]
    assert [(r["organism"], r["effect"]) for r in pair_rows] == [
        (o, e) for o in PAIR for e in (narrow_gate.KNOCKOUT_EFFECT, narrow_gate.STEERING_EFFECT)]
    for r in pair_rows:
        assert ISSUE_KEYS <= set(r) and r["paper"] == "2412.06646" and r["family"] == "qwen2_vl" and r["n"] >= 8
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"] and r["control_ci_high"] is not None
        assert r["verdict"] == ("detected" if r["ci_low"] > r["control_ci_high"] else "not detected")
    by = {(r["organism"], r["effect"]): r for r in pair_rows}
    gate, plain = "shapes_qwen2_vl_gate", "shapes_qwen2_vl"
    assert all(by[(gate, e)]["expected"] == "present" and by[(gate, e)]["verdict"] == "detected"
               for e in (narrow_gate.KNOCKOUT_EFFECT, narrow_gate.STEERING_EFFECT))
    assert all(by[(plain, e)]["expected"] == "absent" and by[(plain, e)]["verdict"] == "not detected"
               for e in (narrow_gate.KNOCKOUT_EFFECT, narrow_gate.STEERING_EFFECT))
    assert by[(gate, narrow_gate.STEERING_EFFECT)]["estimate"] >= 0.8
    assert by[(plain, narrow_gate.STEERING_EFFECT)]["estimate"] <= 0.1


def test_every_shipped_ground_truth_names_a_known_paper():
    names = runner.effect_organisms()
    assert {"shapes_qwen2_vl_gate", "shapes_qwen2_vl"} <= set(names)
    resolved = runner.resolve_models(None)
    assert [n for n, _, _ in resolved] == names
    assert "2412.06646" in runner.detector_modules()


def _copy(name: str, tmp_path: Path, truth: dict | None) -> Path:
    dst = tmp_path / name
    shutil.copytree(organism_dir(name), dst)
    spec = json.loads((dst / "organism.json").read_text())
    spec.pop("ground_truth", None)
    if truth is not None:
        spec["ground_truth"] = truth
    (dst / "organism.json").write_text(json.dumps(spec, indent=1))
    return dst


def test_a_paper_without_a_detector_is_skipped_loudly(tmp_path, monkeypatch, capsys):
    truth = {"2412.06646": {"expected": "absent", "effect": "narrow gate", "why": "test"},
             "2505.22200": {"expected": "absent", "effect": "binding IDs", "why": "test"}}
    path = _copy("shapes_qwen2_vl", tmp_path, truth)
    only_gate = {"2412.06646": narrow_gate}
    monkeypatch.setattr(runner, "detector_modules", lambda: only_gate)
    with pytest.warns(UserWarning, match=r"SKIPPED shapes_qwen2_vl x 2505\.22200: no detector module"):
        status = cli_main(["bench-effects", "--model", str(path), "--n", "8", "--json", str(tmp_path / "r.json")])
    assert status == 1  # the rows are written, and the exit status says something was skipped
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {r["paper"] for r in rows} == {"2412.06646"} and len(rows) == 2
    assert "SKIPPED shapes_qwen2_vl x 2505.22200" in capsys.readouterr().err


@pytest.mark.parametrize("model,match", [("no_such_organism", "no organism checkpoint at 'no_such_organism'"),
                                         (None, "has no ground_truth")])
def test_bad_models_fail_before_any_work(tmp_path, capsys, model, match):
    model = model or str(_copy("shapes_qwen2_vl", tmp_path, None))
    with pytest.raises(SystemExit) as err:
        cli_main(["bench-effects", "--model", model])
    assert err.value.code == 2 and match in capsys.readouterr().err


def test_write_record_stores_rows_and_measurement(tmp_path):
    path = _copy("shapes_qwen2_vl_gate", tmp_path, {"2412.06646": {"expected": "present", "effect": "gate", "why": "t"}})
    before = json.loads((path / "organism.json").read_text())
    result = runner.bench_effects([str(path)], n=8, write_record=True, progress=False)
    after = json.loads((path / "organism.json").read_text())
    entry = after.pop("effect_detectors")["2412.06646"]
    assert after == {k: v for k, v in before.items() if k != "effect_detectors"}  # nothing else touched
    assert entry["n"] == 8 and entry["rows"] == json.loads(json.dumps(result.rows))
    m = entry["measurement"]
    assert set(m["steering_end_of_image"]["per_layer"]) == {"0", "1", "2", "3"}
    assert [f["effect"] for f in m["findings"]] == [r["effect"] for r in result.rows]


def _row(org, paper, expected, verdict, control=0.05):
    return {"organism": org, "family": "llava", "paper": paper, "effect": "e", "expected": expected, "estimate": 0.5,
            "ci_low": 0.4, "ci_high": 0.6, "control_ci_high": control, "verdict": verdict}


def test_doc_section_tables_and_confusion_matrices(tmp_path):
    rows = [_row("a", "2412.06646", "present", "detected"), _row("a", "2412.06646", "present", "not detected"),
            _row("b", "2412.06646", "absent", "not detected"), _row("b", "2506.15871", "absent", "detected")]
    md = report.markdown(rows)
    assert "**2 agree with their expectation, 2 disagree**" in md
    assert "| organism | family | 2506.15871 (symbolic heads) | 2412.06646 (narrow gate) |" in md  # base.PAPERS order
    assert "| `a` | llava |  | present: 1/2 detected, **WRONG** |" in md
    assert "| `b` | llava | absent: 1/1 detected, **WRONG** | absent: 0/1 detected, ok |" in md
    gate = md.split("**2412.06646 (narrow gate)**")[1]
    assert "| present | 1 | 1 |\n| absent | 0 | 1 |" in gate
    assert "| present | 0 | 0 |\n| absent | 1 | 0 |" in md.split("**2506.15871 (symbolic heads)**")[1]
    assert "No rows yet for: 2505.22200 (binding IDs), 2603.22278 (spatial binding)." in md
    doc, data = tmp_path / "doc.md", tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    doc.write_text(f"# title\n\nintro\n{report.BEGIN}\nstale\n{report.END}\n\nafter\n")
    assert report.main([str(data), str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# title\n\nintro\n") and text.endswith(f"{report.END}\n\nafter\n") and "stale" not in text
    assert md in text
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="expected one line"):
        report.update_doc(data, doc)
    with pytest.raises(ValueError, match="lacks"):
        report.markdown([{"organism": "a"}])


def test_shipped_doc_has_the_generated_section():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ground_truth.md").read_text()
    assert doc.count(report.BEGIN) == 1 and doc.count(report.END) == 1


def test_core_package_never_imports_the_analyses():
    """hooked_vlm/ (the core: model, families, organism training) must not import hooked_vlm.analyses; only the
    command line (hooked_vlm/cli.py) may dispatch to it."""
    root = Path(__file__).resolve().parents[2] / "hooked_vlm"
    offenders = []
    for file in root.rglob("*.py"):
        if file.name == "cli.py" and file.parent == root:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            if any(n.startswith("hooked_vlm.analyses") or n.lstrip(".").startswith("analyses") or n.endswith(".analyses")
                   for n in names):
                offenders.append(f"{file.relative_to(root.parent)}:{node.lineno}")
    assert not offenders, offenders


def test_per_effect_expectations_name_findings_by_prefix():
    from hooked_vlm.analyses.effects.runner import finding_expectation

    truth = {"expected": "present", "per_effect": {"Delta_C": "absent", "Delta_O": "present"}}
    assert finding_expectation(truth, "Delta_C (colour slot) swaps answers at 1x") == "absent"
    assert finding_expectation(truth, "Delta_I (item slot) swaps answers at 1x") == "present"  # the paper's default
    assert finding_expectation({"expected": "absent"}, "anything") == "absent"
    with pytest.raises(ValueError, match=r"keys \['Delta', 'Delta_C'\] all match"):
        finding_expectation({"expected": "present", "per_effect": {"Delta": "absent", "Delta_C": "absent"}},
                            "Delta_C (colour slot)", "org")
