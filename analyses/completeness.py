"""Completeness of gradient-based scores: the scores over a cut of the model (a set of nodes every path from the
input to the metric crosses once) should sum to the exact total effect of switching the whole cut, i.e. to
metric(end run) - metric(start run). Attribution patching and EAP are first-order estimates, so their sum misses
the total by the model's curvature; EAP-IG's sum approaches it as the number of interpolation steps grows (the
completeness axiom of integrated gradients). The error of that sum is the cheapest check of a gradient-based
estimate: it needs no extra forward.

Which scores form a cut:
  * EAP / EAP-IG (`analyses.edges`): the edges leaving the graph's inputs, the nodes EAP-IG interpolates
    (``embed_image``, ``embed_text`` and DeepStack ``DS{l}``; with ``image_path=True`` ``V.embed`` and
    ``embed_text``). An input's derivative is the sum of the derivatives of every receiver that reads it, so these
    edges' scores sum to the gradient-times-difference of the inputs. Other edges do not sum to the total (a
    node's score counts everything downstream of it, so summing a node with its descendants double counts).
  * attribution patching (`analyses.attribution`): the residual-stream kinds (``resid_pre`` / ``resid_mid`` /
    ``resid_post``) summed over positions, one cut per layer (on DeepStack models only the layers after the last
    image addition; the others are NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Completeness:
    """Sum of the scores over a cut against the exact total effect.

    estimate: the sum of the scores, per prompt ([..., batch]) or of the batch mean ([...]: no batch axis) where
              scores exist only as batch means.
    total:    the exact total effect the scores decompose (same sign convention as the scores), shaped like
              `estimate` where it is per prompt, else the batch mean.
    """

    estimate: Tensor
    total: Tensor
    per_prompt: bool = True

    @property
    def abs_error(self) -> Tensor:
        """|mean estimate - mean total| over the batch (one value per cut)."""
        est, tot = (self.estimate.mean(-1), self.total.mean(-1)) if self.per_prompt else (self.estimate, self.total)
        return (est - tot).abs()

    @property
    def rel_error(self) -> Tensor:
        """abs_error / |mean total|: the error of the batch-mean scores as a fraction of the total effect."""
        tot = self.total.mean(-1) if self.per_prompt else self.total
        return self.abs_error / tot.abs()

    @property
    def prompt_error(self) -> Tensor:
        """sum_b |estimate_b - total_b| / sum_b |total_b|: the per-prompt error as a fraction (errors of opposite
        sign in different prompts do not cancel, unlike `rel_error`); NaN without per-prompt estimates."""
        if not self.per_prompt:
            return torch.full_like(self.abs_error, float("nan"))
        return (self.estimate - self.total).abs().sum(-1) / self.total.abs().sum(-1)

    def __repr__(self) -> str:
        def fmt(t: Tensor) -> str:
            return f"{float(t):.4g}" if t.numel() == 1 else str([round(float(x), 4) for x in t.flatten()])

        est = self.estimate.mean(-1) if self.per_prompt else self.estimate
        tot = self.total.mean(-1) if self.per_prompt else self.total
        return (f"Completeness(sum of scores {fmt(est)}, total effect {fmt(tot)}, abs error {fmt(self.abs_error)}, "
                f"rel error {fmt(self.rel_error)}, per-prompt error {fmt(self.prompt_error)})")

    def error(self) -> Tensor:
        """The error used as a stopping rule: `prompt_error` where per-prompt estimates exist, else `rel_error`."""
        return self.prompt_error if self.per_prompt else self.rel_error
