"""Checks on the inputs every analysis takes: the clean / corrupt pair and the patching direction."""
from __future__ import annotations

from typing import Any, Sequence

Inputs = dict[str, Any]
DIRECTIONS = ("denoise", "noise")


def check_direction(direction: str) -> None:
    """"denoise" (run corrupt, patch clean in) or "noise" (run clean, patch corrupt in); else a ValueError."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def check_pair(clean: Inputs, corrupt: Inputs, names: Sequence[str] = ("blocks.",)) -> None:
    """Clean and corrupt inputs must have the same batch, and the same sequence length where decoder
    activations are exchanged; else an error naming both shapes."""
    for what, d in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(d, dict) or "input_ids" not in d:
            raise TypeError(f"{what} must be a model input dict with input_ids (from model.process / to_inputs); got "
                            f"{type(d).__name__}")
        if d["input_ids"].numel() == 0:
            raise ValueError(f"{what} inputs are empty: input_ids has shape {tuple(d['input_ids'].shape)}")
    a, b = tuple(clean["input_ids"].shape), tuple(corrupt["input_ids"].shape)
    if a[0] != b[0]:
        raise ValueError(f"clean and corrupt inputs have different batch sizes: {a[0]} vs {b[0]} prompts")
    if a != b and any(not n.startswith(("vision.", "projector.")) for n in names):
        raise ValueError(f"clean and corrupt inputs have different sequence lengths {a[1]} vs {b[1]}: patching a "
                         "decoder activation needs a counterfactual of the same token count (to move positions "
                         "between prompts of different lengths use analyses.toolkit.transplant_sweep)")
