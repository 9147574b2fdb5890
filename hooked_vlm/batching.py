"""Batch manipulation of model inputs that works for every family.

Image tensors (pixel_values, image_sizes, image_grid_thw, ...) are consumed in reading order, so repeating the
whole batch n times along dim 0 repeats every image tensor the same way; only 3-D M-RoPE position_ids
[3, batch, pos] carry the batch on dim 1.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BATCH_DIM = {"position_ids": lambda t: 1 if t.ndim == 3 else 0}
NON_TENSOR_OK = (int, float, str, bool, type(None))


def repeat_inputs(inputs: dict[str, Any], n: int) -> dict[str, Any]:
    """Inputs for a batch that is the given batch repeated n times: [p0, p1, p0, p1, ...]."""
    if n < 1:
        raise ValueError(f"repeat count must be >= 1, got {n}")
    out = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            dim = BATCH_DIM.get(key, lambda t: 0)(value)
            out[key] = value if value.ndim == 0 else torch.cat([value] * n, dim=dim)
        elif isinstance(value, (list, tuple)) and key in ("batch_num_images", "image_sizes"):
            out[key] = type(value)(list(value) * n)
        elif isinstance(value, NON_TENSOR_OK) or isinstance(value, (list, tuple)):
            out[key] = value
        else:
            raise TypeError(f"cannot repeat input {key!r} of type {type(value).__name__}")
    return out


def batch_size(inputs: dict[str, Any]) -> int:
    return int(inputs["input_ids"].shape[0])


def to_device(inputs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
