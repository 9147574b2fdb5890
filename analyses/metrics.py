"""Metrics: callables from logits [batch, pos, d_vocab] to one number per prompt [batch].

Every analysis takes a `metric` like these, so the same sweep measures logit difference, probability or accuracy.
The answer is read at the last real token of each prompt (left or right padding aware).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


def final_logits(logits: Float[Tensor, "batch pos vocab"], attention_mask: Tensor | None = None) -> Float[Tensor, "batch vocab"]:
    if attention_mask is None:
        return logits[:, -1]
    last = torch.where(attention_mask.bool(), torch.arange(attention_mask.shape[1], device=attention_mask.device), -1).max(1).values
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def _ids(x: Int[Tensor, "batch"] | list[int], n: int, device) -> Tensor:
    t = torch.as_tensor(x, device=device).long().flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"expected {n} answer ids (one per prompt), got {t.numel()}")
    return t


@dataclass
class LogitDiff:
    """logit[answer] - logit[wrong] at the final token."""

    answer: Tensor | list[int]
    wrong: Tensor | list[int]
    attention_mask: Tensor | None = None

    def __call__(self, logits: Tensor) -> Float[Tensor, "batch"]:
        fl = final_logits(logits, self.attention_mask)
        idx = torch.arange(fl.shape[0], device=fl.device)
        return fl[idx, _ids(self.answer, fl.shape[0], fl.device)] - fl[idx, _ids(self.wrong, fl.shape[0], fl.device)]


@dataclass
class AnswerProb:
    answer: Tensor | list[int]
    attention_mask: Tensor | None = None

    def __call__(self, logits: Tensor) -> Float[Tensor, "batch"]:
        p = final_logits(logits, self.attention_mask).float().softmax(-1)
        return p[torch.arange(p.shape[0], device=p.device), _ids(self.answer, p.shape[0], p.device)]


@dataclass
class Accuracy:
    """1.0 where the argmax over the whole vocabulary is the answer, else 0.0."""

    answer: Tensor | list[int]
    attention_mask: Tensor | None = None

    def __call__(self, logits: Tensor) -> Float[Tensor, "batch"]:
        fl = final_logits(logits, self.attention_mask)
        return (fl.argmax(-1) == _ids(self.answer, fl.shape[0], fl.device)).float()


def normalized_score(value: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """(value - corrupt) / (clean - corrupt): 0 = corrupted behaviour, 1 = clean behaviour restored."""
    return (value - corrupt) / (clean - corrupt)
