"""analyses/ installs as `hooked_vlm.analyses` (issue 16): nothing called `analyses` goes to site-packages, and no
file of the project imports a top-level `analyses` (which would shadow, or be shadowed by, a user's own folder)."""
import pathlib
import re

import hooked_vlm.analyses

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_analyses_is_a_subpackage_of_hooked_vlm():
    assert pathlib.Path(hooked_vlm.analyses.__file__).resolve() == ROOT / "analyses" / "__init__.py"
    from hooked_vlm.analyses import toolkit

    assert pathlib.Path(toolkit.__file__).resolve().parent == ROOT / "analyses" / "toolkit"


def test_setup_installs_every_analyses_package_under_hooked_vlm():
    text = (ROOT / "setup.py").read_text()
    assert 'package_dir={"hooked_vlm.analyses": "analyses"}' in text and '"analyses*"' not in (ROOT / "pyproject.toml").read_text()
    from setuptools import find_packages

    subpackages = find_packages(str(ROOT), include=["analyses", "analyses.*"])
    assert "analyses.toolkit" in subpackages  # the setup.py comprehension maps each to hooked_vlm.analyses.*


def test_no_file_imports_a_top_level_analyses():
    pattern = re.compile(r"(?<![\w.])(from|import) analyses(?![\w/])")
    offenders = []
    paths = [ROOT / "README.md"] + [p for d in ("analyses", "hooked_vlm", "tests", "notebooks", "docs", "benchmarks")
                                     for p in (ROOT / d).rglob("*")]
    for path in paths:
        if path.suffix not in (".py", ".ipynb", ".md"):
            continue
        for i, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("|"):  # markdown tables (README's migration) quote it
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:80]}")
    assert offenders == []
