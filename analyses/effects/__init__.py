"""Detectors for the four papers' effects, run on organisms where the truth is known (`hooked-vlm bench-effects`).

Each paper's detector is one module here exposing ``PAPER`` and ``detect(model, *, n, seed) -> list[Finding]``
(analyses/effects/base.py states the decision rule)."""
from .base import PAPERS, Finding

__all__ = ["PAPERS", "Finding"]
