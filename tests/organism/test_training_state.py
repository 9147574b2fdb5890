"""Training the organism with bad numbers, crashes and changed settings: refused clearly, never a mix of steps, an
untrained organism or NaN accuracies; the caller's grad mode and thread count survive. A few tiny steps each."""
from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm.organism import state as ST
from hooked_vlm.organism.train import TrainConfig, main, train_organism

SMALL = dict(batch_size=2, eval_every=10**6, save_every=2)


def _train(tmp_path, steps=4, seed=3, stop_after=None, state="state", **cfg):
    return train_organism(tmp_path / "out", steps=steps, seed=seed, resume=True, state_dir=tmp_path / state,
                          cfg=TrainConfig(**{**SMALL, **cfg}), progress=False, stop_after=stop_after)


# ------------------------------------------------------------------------------------------- bad numbers
@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), r"steps \(--steps\) must be an integer >= 1, got 0"),
    (dict(steps=-5), r"steps \(--steps\) must be an integer >= 1, got -5"),
    (dict(final_eval_n=0), r"final_eval_n \(--eval-n\) must be an integer >= 1, got 0"),
    (dict(cfg=TrainConfig(eval_n=0)), r"eval_n must be an integer >= 1, got 0"),
    (dict(steps=4, stop_after=5), r"stop_after \(--stop-after\) must be in 1..steps=4, got 5"),
])
def test_bad_numbers_refused_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_organism(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,bound", [(["--steps", "0"], 1), (["--steps", "-5"], 1), (["--eval-n", "0"], 1),
                                        (["--threads", "0"], 1), (["--supervise-steps", "-1"], 0),
                                        (["--steps", "x"], 1)])
def test_cli_numbers_refused_at_parsing(tmp_path, capsys, argv, bound):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: expected an integer >= {bound}, got" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_stop_after_beyond_steps_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "out"), "--steps", "2", "--stop-after", "3"])
    assert "argument --stop-after: expected at most --steps (2), got 3" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- atomic saving
def test_crash_while_saving_resumes_from_the_last_complete_step(tmp_path, monkeypatch):
    _train(tmp_path, stop_after=4, state="straight")
    straight = ST.saved_model(tmp_path / "straight")
    real = ST._write_optimizer

    def crash_at_step_4(path, opt):
        if "000004" in path.name:
            raise OSError("disk full")  # the model file of step 4 is already written
        real(path, opt)

    monkeypatch.setattr(ST, "_write_optimizer", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        _train(tmp_path, stop_after=4)
    manifest = json.loads((tmp_path / "state" / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["model"] == "model-000002.safetensors"
    assert (tmp_path / "state" / "optimizer-000002.pt").exists()
    monkeypatch.setattr(ST, "_write_optimizer", real)
    _train(tmp_path, stop_after=4)  # resumes from step 2, not from the step-4 model beside a step-2 optimizer
    resumed = ST.saved_model(tmp_path / "state")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == ["manifest.json", "model-000004.safetensors", "optimizer-000004.pt"], names


def test_crash_while_writing_the_manifest_keeps_the_previous_one(tmp_path, monkeypatch):
    _train(tmp_path, stop_after=2)
    real = ST._write_atomic

    def crash_on_manifest(path, write):
        if path.name == ST.MANIFEST:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ST, "_write_atomic", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, stop_after=4)
    assert ST.read_manifest(tmp_path / "state")["step"] == 2


def test_state_without_manifest_refused(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds training state \['state.json'\] without a manifest.json"):
        _train(tmp_path, stop_after=2)


# ---------------------------------------------------------------------------------------- resume checks
@pytest.mark.parametrize("change,match", [
    (dict(seed=4), r"seed \(--seed\) = 3, this run has 4"),
    (dict(layout="random"), r"layout \(--layout\) = 'fixed', this run has 'random'"),
    (dict(family="qwen2_vl"), r"family \(--family\) = 'llava', this run has 'qwen2_vl'"),
    (dict(batch_size=3), r"batch_size = 2, this run has 3"),
])
def test_resume_refuses_a_changed_run(tmp_path, change, match):
    _train(tmp_path, stop_after=2)
    with pytest.raises(ValueError, match=rf"--resume: the training state in .*state was saved with {match}"):
        _train(tmp_path, stop_after=4, **change)


def test_resume_refuses_changed_objects_and_steps_before_the_saved_one(tmp_path):
    _train(tmp_path, stop_after=2, layout="random")
    with pytest.raises(ValueError, match=r"n_objects \(--objects\) = 2, this run has 3"):
        _train(tmp_path, stop_after=4, layout="random", n_objects=3)
    with pytest.raises(ValueError, match=r"at step 2, beyond --steps 1"):
        _train(tmp_path, steps=1, layout="random")


# ------------------------------------------------------------------------------------- process settings
def test_grad_mode_and_threads_left_as_found(tmp_path, monkeypatch):
    import hooked_vlm.organism.train as T

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.no_grad():
            assert _train(tmp_path, stop_after=1, threads=1) == {}  # trains under no_grad
            assert not torch.is_grad_enabled() and torch.get_num_threads() == 3
        assert ST.read_manifest(tmp_path / "state")["step"] == 1

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(T, "make_batch", boom)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                with pytest.raises(RuntimeError, match="boom"):
                    _train(tmp_path, stop_after=2, threads=1)
                assert torch.is_grad_enabled() == grad and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
