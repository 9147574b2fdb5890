"""The one `Metric` contract of the analyses: logits [batch, pos, vocab] -> one value per prompt [batch].

`metric_values` is the only place a metric is called by the toolkit; it checks the contract every time (a shape
test, nothing costly), so a metric that returns a scalar (which would collapse a whole sweep into one number) or
[batch, vocab] (which would be averaged over the vocabulary) is an error naming the shape it returned.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class Metric(Protocol):
    """Logits [batch, pos, vocab] -> [batch] (e.g. `analyses.metrics.LogitDiff`)."""

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]: ...


def _name(metric: object) -> str:
    return getattr(metric, "__name__", None) or type(metric).__name__


def check_metric_output(values: object, batch: int, metric: object = None) -> Tensor:
    """`values` if it is a tensor of shape [batch]; else a ValueError / TypeError naming what came."""
    who = f"metric {_name(metric)}" if metric is not None else "metric"
    if not isinstance(values, Tensor):
        raise TypeError(f"{who} must return a tensor of shape [batch] = ({batch},), one value per prompt; "
                        f"got {type(values).__name__}")
    if tuple(values.shape) != (batch,):
        hint = ""
        if values.ndim == 0:
            hint = " (a scalar: reduce over the vocabulary or positions, not over prompts)"
        elif values.ndim == 2 and values.shape[0] == batch:
            hint = " (one row per prompt: pick the answer's entry, e.g. analyses.metrics.LogitDiff)"
        raise ValueError(f"{who} must return one value per prompt, shape [batch] = ({batch},); got shape "
                         f"{tuple(values.shape)}{hint}")
    return values


def as_float(values: Tensor) -> Tensor:
    """Metric values on the CPU as float32, or float64 when they already are (finite differences need it)."""
    values = values.detach().cpu()
    return values if values.dtype == torch.float64 else values.float()


def metric_values(metric: Metric, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
    """metric(logits), checked to be [batch], detached, on the CPU as float."""
    if not callable(metric):
        raise TypeError(f"metric must be a callable logits [batch, pos, vocab] -> [batch]; got {type(metric).__name__}")
    return as_float(check_metric_output(metric(logits), int(logits.shape[0]), metric))


def metric_per_slot(metric: Metric, logits: Tensor, n_slots: int) -> Float[Tensor, "n_slots batch"]:
    """The metric on each of n_slots copies of a batch stacked on dim 0: [n_slots * B, ...] -> [n_slots, B]."""
    b = logits.shape[0] // n_slots
    return torch.stack([metric_values(metric, logits[j * b : (j + 1) * b]) for j in range(n_slots)])
