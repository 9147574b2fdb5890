"""Every notebook in notebooks/ runs top to bottom on the shipped organism, and is committed without outputs; every
```python block of the user guides (docs/coming_from_*.md, docs/gotchas.md) runs as written.

Each notebook executes in a fresh python3 kernel (nbclient), with the repository root on PYTHONPATH and one
torch thread (the organism is tiny: threads only add contention). Notebook 07 needs the Hugging Face hub; its
first cell sees HOOKED_VLM_SKIP_DOWNLOADS=1 and every later cell prints a skip message.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
GUIDES = [ROOT / "docs" / name for name in ("coming_from_transformerlens.md", "coming_from_nnsight.md", "gotchas.md")]
CELL_TIMEOUT = 120


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HOOKED_VLM_SKIP_DOWNLOADS="1", TQDM_DISABLE="1",
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    return env


def test_there_are_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    assert len(names) >= 7 and names[0].startswith("01_"), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_outputs_are_stripped(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has saved outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"{path.name} cell {i} has execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    # the kernel must be this interpreter's (the venv's), not whatever `python3` a kernelspec elsewhere names
    client.kernel_manager_class = _venv_kernel_manager()
    try:
        client.execute(env=_kernel_env())
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell failed\n{str(err)[-3000:]}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"


def _venv_kernel_manager():
    from jupyter_client.manager import AsyncKernelManager

    class VenvKernelManager(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            return [sys.executable] + cmd[1:] if cmd and Path(cmd[0]).name.startswith("python") else cmd

    return VenvKernelManager


DOC_RUNNER = """
import re, sys, traceback
for path in sys.argv[1:]:
    blocks = re.findall(r"```python\\n(.*?)```", open(path).read(), flags=re.S)
    assert blocks, path + " has no python blocks"
    namespace = {"__name__": "doc"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path} (python block {i})", "exec"), namespace)
        except Exception:
            traceback.print_exc()
            sys.exit(f"FAILED: {path}, python block {i}")
"""


def test_doc_snippets_run():
    """The python blocks of each guide, in order, in one namespace (they continue each other), as a user runs
    them: in a fresh interpreter (not under the test suite's jaxtyping / beartype instrumentation)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", DOC_RUNNER, *map(str, GUIDES)], cwd=ROOT, env=_kernel_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
