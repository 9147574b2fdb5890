"""`hooked-vlm` command line with bad arguments: numbers are checked at parsing (the message names the bound), and
the demo does not overwrite an existing report unless --force. Nothing here runs the demo itself."""
from __future__ import annotations

import pytest

from hooked_vlm.analyses import demo as demo
from hooked_vlm.cli import main


@pytest.fixture
def calls(monkeypatch):
    """run_demo replaced by a recorder: the tests check what the CLI passes, not the analyses."""
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.append(kwargs))
    return seen


@pytest.mark.parametrize("argv,got", [(["demo", "--n", "0"], "0"), (["demo", "--n", "-3"], "-3"),
                                      (["demo", "--n", "ten"], "'ten'"), (["bench-circuits", "--n", "0"], "0"),
                                      (["bench-effects", "--n", "0"], "0")])
def test_numbers_refused_at_parsing(capsys, calls, argv, got):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and calls == []
    assert f"argument --n: expected an integer >= 1, got {got}" in capsys.readouterr().err


def test_demo_refuses_to_overwrite_a_report(tmp_path, capsys, calls):
    out = tmp_path / "report"
    main(["demo", "--out", str(out), "--n", "4"])  # a new directory: fine
    assert calls[-1]["out_dir"] == str(out) and calls[-1]["force"] is False
    out.mkdir()
    main(["demo", "--out", str(out)])  # an existing empty directory: fine
    (out / "index.html").write_text("<html>old report</html>")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(out)])
    assert exc.value.code == 2 and len(calls) == 2
    err = capsys.readouterr().err
    assert f"the report directory '{out}' already exists and holds files (index.html); pass --force" in err, err
    main(["demo", "--out", str(out), "--force"])
    assert calls[-1]["force"] is True and (out / "index.html").read_text() == "<html>old report</html>"


def test_demo_output_that_is_a_file_refused(tmp_path, capsys, calls):
    (tmp_path / "report").write_text("x")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "report"), "--force"])
    assert "exists and is not a directory" in capsys.readouterr().err and calls == []


def test_run_demo_checks_its_arguments_before_loading(tmp_path):
    """The same checks in Python, before any model is loaded (a missing model path would fail later)."""
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"pass --force to overwrite it \(force=True in Python\)"):
        demo.run_demo(model_path=str(tmp_path / "no_such_model"), out_dir=str(tmp_path))
    for n in (0, -1):
        with pytest.raises(ValueError, match=rf"run_demo: n must be an integer >= 1 .*got {n}"):
            demo.run_demo(model_path=str(tmp_path / "no_such_model"), out_dir=str(tmp_path / "new"), n=n)
