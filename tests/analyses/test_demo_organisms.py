"""`hooked-vlm demo --model NAME` on every shipped organism: section selection by the organism's task. A 3-object
organism runs the sections that fit (on its own 3-object scenes) and says which it skipped; an effect organism's
report states its planted effect. The sections themselves are stubbed where only the selection is tested."""
from __future__ import annotations

import pytest

from hooked_vlm.analyses import demo, generated
from hooked_vlm.organism import organism_record, shipped_organisms

SECTIONS = ("accuracy_section", "counterfactual_section", "narrow_gate_section", "patching_section", "heads_section",
            "binding_section", "spatial_section", "circuit_section", "effects_section")


@pytest.fixture
def stubbed(monkeypatch):
    """Replace every measuring section by a stub that records its arguments (planted_section stays real)."""
    calls: dict[str, tuple] = {}

    def stub(name):
        def fn(*args, **kwargs):
            calls[name] = args
            return {"stub": name}
        return fn

    for name in SECTIONS:
        monkeypatch.setattr(demo, name, stub(name))
    monkeypatch.setattr(generated, "generated_section", stub("generated_section"))
    return calls


@pytest.mark.parametrize("organism", shipped_organisms())
def test_demo_selects_sections_for_every_shipped_organism(organism, stubbed, tmp_path):
    summary = demo.run_demo(model_path=organism, out_dir=str(tmp_path), n=4, seed=0)
    record = organism_record(organism)
    n_objects = record.get("task", {}).get("n_objects", 2)
    html = (tmp_path / "index.html").read_text()
    trained = set(record["task"]["queries"])
    skipped = [name for name, needs in demo.SECTION_QUERIES.items() if not set(needs) <= trained]
    ran = {f"{name}_section" for name in ("accuracy", "counterfactual", "narrow_gate", "patching", "heads", "binding",
                                          "spatial", "circuit", "effects")}
    if n_objects == 2 and not skipped:
        assert "skipped_sections" not in summary and set(stubbed) == ran | {"generated_section"}
    elif n_objects == 2:  # trained on some queries only: the sections asking others are skipped, visibly
        assert summary["skipped_sections"][-len(skipped):] == skipped and "Sections skipped" in html
        assert not {f"{s.replace('counterfactuals', 'counterfactual').replace('circuit_recovery', 'circuit')}_section"
                    for s in skipped} & set(stubbed)
    else:
        assert summary["skipped_sections"] == list(demo.TWO_OBJECT_SECTIONS) and "Sections skipped" in html
        assert set(stubbed) == {"accuracy_section", "counterfactual_section", "narrow_gate_section",
                                "patching_section", "circuit_section", "effects_section"}
        for name in ("accuracy_section", "counterfactual_section", "narrow_gate_section", "patching_section"):
            assert stubbed[name][-1] == n_objects, name  # these run on the organism's own scenes
    assert ("Planted effect" in html) == ("planted_mechanism" in record)
    if "planted_mechanism" in record:  # the report states what the organism's ground truth expects, per paper
        assert all(f"{paper}: {truth['expected']}" in html for paper, truth in record["ground_truth"].items())


def test_three_object_sections_run_on_three_object_scenes(tmp_path):
    from hooked_vlm.analyses.report import Report
    from hooked_vlm.organism import load_organism

    model = load_organism("shapes_llava_random_3obj")
    report = Report("t", "t")
    rates = demo.counterfactual_section(model, report, 8, 0, "random", 3)
    assert rates["swap_shapes/shape_item"]["value"] >= 0.75 and rates["swap_positions/shape_item"]["value"] >= 0.75
    gate = demo.narrow_gate_section(model, report, 4, 0, "random", 3)
    assert gate["knockout"][0]["condition"] == "baseline" and not gate["end_of_image_is_marker"]
    knockout_caption = next(c for t, c, _ in report.sections if t == "Narrow gate: attention knockout")
    assert "chance is 1/3" in knockout_caption
