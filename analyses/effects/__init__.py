"""Detectors for the four papers' effects, run on organisms where the truth is known (`hooked-vlm bench-effects`).

Each paper's detector is one module here exposing ``PAPER`` and ``detect(model, *, n, seed) -> list[Finding]``
(analyses/effects/base.py states the decision rule), and optionally ``record(model, *, n, seed) -> dict`` (the full
measurement ``--write-record`` stores in organism.json). runner.py finds them by ``PAPER`` and runs them on the
organisms whose organism.json has a ``ground_truth``; report.py turns its rows into docs/ground_truth.md's tables."""
from .base import PAPERS, Finding

__all__ = ["PAPERS", "Finding"]
