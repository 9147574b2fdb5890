"""The organism task registry (hooked_vlm/organism/task_api.py): tasks are looked up by name, their knobs live in
TrainConfig.options, and a knob or init_from that belongs to another task is refused before anything trains."""
from __future__ import annotations

import pytest

from hooked_vlm.organism.task_api import OrganismTask, get_task, register_task, task_names
from hooked_vlm.organism.train import TrainConfig, main, train_organism


def test_shipped_tasks_are_registered_with_their_defaults():
    assert {"shapes", "narrow_gate"} <= set(task_names())
    gate = get_task("narrow_gate")
    assert gate.defaults["init_from"] == "shapes_qwen2_vl" and gate.option(TrainConfig(), "gate_steps") == 800
    assert gate.option(TrainConfig(options={"gate_steps": 3}), "gate_steps") == 3


def test_unknown_task_and_duplicate_registration_are_refused():
    with pytest.raises(ValueError, match=r"task \(--task\) must be one of .*'narrow_gate'.*got 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_task(OrganismTask())


@pytest.mark.parametrize("cfg,match", [
    (dict(options={"gate_steps": 2}), r"option\(s\) \['gate_steps'\] do not belong to task 'shapes'"),
    (dict(init_from="shapes_llava"), r"init_from \(--init-from\) does not belong to task 'shapes'"),
])
def test_a_knob_of_another_task_is_refused(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        train_organism(tmp_path / "out", steps=2, cfg=TrainConfig(**cfg), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_option_of_another_task(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "out"), "--steps", "2", "--gate-steps", "3"])
    assert "--gate-steps belong(s) to another task than --task shapes" in capsys.readouterr().err
