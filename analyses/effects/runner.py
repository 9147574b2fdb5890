"""`hooked-vlm bench-effects`: every paper's detector on every organism whose organism.json says what it should find.

An organism takes part when its organism.json has ``ground_truth``: {paper id: {"expected": "present" | "absent",
"effect": ..., "why": ...}}. For each paper listed there the runner imports the detector module of this package whose
``PAPER`` is that id (analyses/effects/<module>.py with ``detect(model, *, n, seed) -> list[Finding]``), runs it and
turns each Finding into one row (`Finding.row`: organism, family, paper, effect, expected, estimate, ci_low, ci_high,
control_ci_high, verdict, plus n, null_value where set, and detail). A paper without a detector module is SKIPPED:
it gives no row, `BenchResult.skipped` names it, a warning says so and the command exits with status 1.

``write_record=True`` (``--write-record``) also stores each organism's rows, and the detector's full measurement
where its module has ``record(model, *, n, seed) -> dict``, in its organism.json under ``effect_detectors`` (the
trained organism's own record stays free of analysis code: the training package never imports the analyses).
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from hooked_vlm.progress import progress_bar

from .base import PAPERS

NOT_DETECTORS = {"base", "runner", "report"}


def detector_modules() -> dict[str, ModuleType]:
    """{paper id: detector module} for every module of this package that defines PAPER (a module that fails to import
    is an error, not a skipped paper; two modules for one paper are an error too)."""
    package = __package__  # hooked_vlm.analyses.effects
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name in NOT_DETECTORS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        paper = getattr(module, "PAPER", None)
        if paper is None:
            continue
        if paper not in PAPERS:
            raise ValueError(f"{module.__name__}.PAPER = {paper!r} is not one of {sorted(PAPERS)}")
        if not callable(getattr(module, "detect", None)):
            raise TypeError(f"{module.__name__} declares PAPER = {paper!r} but has no detect(model, *, n, seed)")
        if paper in found:
            raise ValueError(f"two detector modules for paper {paper}: {found[paper].__name__} and {module.__name__}")
        found[paper] = module
    return found


def effect_organisms() -> list[str]:
    """The shipped organisms whose organism.json has a ground_truth (the default of bench-effects)."""
    from hooked_vlm.organism import organism_record, shipped_organisms

    return [name for name in shipped_organisms() if organism_record(name).get("ground_truth")]


def resolve_models(models: Sequence[str] | None) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, directory, organism.json) per requested model (default `effect_organisms`). Raises naming the model and
    the shipped organisms when one is unknown or has no ground_truth, before any detector runs."""
    from hooked_vlm.organism import organism_dir, organism_record

    if not models:
        models = effect_organisms()
        if not models:
            raise ValueError("no shipped organism has a ground_truth in its organism.json: nothing to bench")
    out = []
    for model in models:
        path = organism_dir(model)  # FileNotFoundError listing the shipped organisms
        if not (path / "organism.json").exists():
            raise FileNotFoundError(f"{model!r} ({path}) has no organism.json: bench-effects needs an organism whose "
                                    "organism.json has a ground_truth")
        record = organism_record(path)
        truth = record.get("ground_truth")
        if not truth:
            raise ValueError(f"{model!r} has no ground_truth in its organism.json, so there is nothing to check a "
                             f"detector against; organisms that have one: {effect_organisms()}")
        for paper, entry in truth.items():
            per = entry.get("per_effect") or {} if isinstance(entry, dict) else {}
            if (paper not in PAPERS or entry.get("expected") not in ("present", "absent")
                    or any(v not in ("present", "absent") for v in per.values())):
                raise ValueError(f"{model!r}: ground_truth[{paper!r}] must name a paper of {sorted(PAPERS)} and have "
                                 f"expected 'present' or 'absent', got {entry!r}")
        out.append((record.get("name", path.name), path, record))
    return out


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"organism", "paper", "reason"}
    seconds: dict[str, float] = field(default_factory=dict)  # "<organism> <paper>" -> seconds


def bench_effects(models: Sequence[str] | None = None, *, n: int = 64, seed: int = 0, write_record: bool = False,
                  progress: bool = True) -> BenchResult:
    """Run each listed paper's detector on each organism (module docstring); rows in organism, paper order."""
    import torch

    from hooked_vlm.organism import load_organism

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"bench_effects: n must be an integer >= 1 (prompts per measurement), got {n!r}")
    organisms = resolve_models(models)
    detectors = detector_modules()
    result = BenchResult(rows=[])
    jobs = [(name, path, record, paper) for name, path, record in organisms for paper in sorted(record["ground_truth"])]
    loaded: dict[str, Any] = {}
    bar = progress_bar(jobs, progress=progress, desc="bench-effects", leave=True)
    for name, path, record, paper in bar:
        bar.set_postfix_str(f"{name} x {paper}")
        family = record.get("family", "llava")
        module = detectors.get(paper)
        if module is None:
            reason = (f"no detector module for paper {paper} ({PAPERS[paper]}): no analyses/effects/*.py defines "
                      f"PAPER = {paper!r}")
            result.skipped.append({"organism": name, "paper": paper, "reason": reason})
            warnings.warn(f"bench-effects: SKIPPED {name} x {paper}: {reason}", stacklevel=2)
            continue
        if name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[name] = load_organism(path)
        model = loaded[name]
        start = time.perf_counter()
        torch.manual_seed(seed)
        findings = module.detect(model, n=n, seed=seed)
        if not findings:
            raise ValueError(f"{module.__name__}.detect returned no Finding on {name}")
        truth = record["ground_truth"][paper]
        unused = [k for k in truth.get("per_effect") or {} if not any(f.effect.startswith(k) for f in findings)]
        if unused:
            raise ValueError(f"{name}: ground_truth[{paper!r}] per_effect keys {unused} name no finding of "
                             f"{module.__name__}.detect (its effects: {[f.effect for f in findings]})")
        rows = [f.row(name, family, finding_expectation(truth, f.effect, name)) for f in findings]
        result.rows += rows
        if write_record:
            extra = module.record(model, n=n, seed=seed) if callable(getattr(module, "record", None)) else None
            _write_record(path, paper, rows, n, seed, extra)
        result.seconds[f"{name} {paper}"] = round(time.perf_counter() - start, 2)
    return result


def finding_expectation(truth: dict[str, Any], effect: str, organism: str = "") -> str:
    """The expectation of one finding: ``truth["expected"]``, unless ``truth["per_effect"]`` ({effect prefix:
    "present" | "absent"}) names the finding by the start of its ``effect`` text (for an organism that plants some of
    a paper's effects and not others, e.g. a binding ID that the colour words never carry). A prefix that matches
    several keys is an error."""
    per = truth.get("per_effect") or {}
    hits = [key for key in per if effect.startswith(key)]
    if len(hits) > 1:
        raise ValueError(f"{organism}: ground_truth per_effect keys {hits} all match the finding {effect!r}")
    return per[hits[0]] if hits else truth["expected"]


def _write_record(path: Path, paper: str, rows: list[dict[str, Any]], n: int, seed: int,
                  measurement: dict[str, Any] | None) -> None:
    """organism.json's effect_detectors[paper] := this run's rows (and the full measurement), other keys kept."""
    file = path / "organism.json"
    spec = json.loads(file.read_text())
    entry: dict[str, Any] = {"command": f"hooked-vlm bench-effects --model {spec.get('name', path.name)} --n {n} "
                                        f"--seed {seed} --write-record", "n": n, "seed": seed, "rows": rows}
    if measurement is not None:
        entry["measurement"] = measurement
    spec.setdefault("effect_detectors", {})[paper] = entry
    file.write_text(json.dumps(spec, indent=1))


def main_cli(models: Sequence[str] | None, json_path: str | None, n: int, seed: int, write_record: bool) -> int:
    """The CLI's body: run, write the JSON list of rows (to `json_path` or stdout), say what was skipped. Returns the
    exit status: 1 when a paper was skipped (after writing the rows), else 0."""
    start = time.perf_counter()
    result = bench_effects(models, n=n, seed=seed, write_record=write_record)
    text = json.dumps(result.rows, indent=1)
    if json_path is None:
        print(text)
    else:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    agree = sum((r["verdict"] == "detected") == (r["expected"] == "present") for r in result.rows)
    print(f"bench-effects: {len(result.rows)} rows, {agree} agree with their expectation, "
          f"{len(result.rows) - agree} disagree; {time.perf_counter() - start:.0f} s"
          + ("" if json_path is None else f"; wrote {json_path}"), file=sys.stderr)
    for s in result.skipped:
        print(f"bench-effects: SKIPPED {s['organism']} x {s['paper']}: {s['reason']}", file=sys.stderr)
    return 1 if result.skipped else 0
