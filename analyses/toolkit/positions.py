"""One normaliser for position sets: every analysis reads its `positions=` (and query / key / sender / receiver
sets) through `as_positions`.

Accepted forms, all giving a bool mask over the sequence (``[pos]``: the same positions in every prompt, or
``[batch, pos]``: one row per prompt, as `TokenLayout` gives):

* a bool tensor, a numpy bool array or a Python list (nested for [batch, pos]) of bools: a mask;
* an integer tensor / numpy array / list of 0s and 1s as long as the sequence (e.g. an ``attention_mask``): a
  mask, never "positions 0 and 1";
* an int, or a 1-D integer sequence of distinct indices ``0 <= p < n_pos``: those positions;
* None: every position (the caller decides what that means; `as_positions` returns None).

Errors, each naming what came and what was expected: floats (``[0.5]`` is not a position), negative or
out-of-range indices (a negative index means a different token in each prompt under left padding: use
`TokenLayout.final_token()`), repeated indices, an empty index list, a mask whose length is not the sequence's,
a [batch, pos] mask for another batch size.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

PositionSpec = Any  # see the module docstring


def _to_tensor(positions: Any, what: str) -> Tensor:
    if isinstance(positions, Tensor):
        return positions.detach().cpu()
    if isinstance(positions, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(positions))
    if isinstance(positions, bool):
        raise TypeError(f"{what}: a single bool is not a position set; give a bool mask [pos] or indices")
    if isinstance(positions, (int, np.integer)):
        return torch.tensor([int(positions)])
    if isinstance(positions, range):
        return torch.tensor(list(positions), dtype=torch.long)
    if isinstance(positions, (list, tuple)):
        if len(positions) == 0:
            raise ValueError(f"{what}: an empty list selects no positions; give indices or a bool mask")
        try:
            return torch.tensor(positions)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{what}: cannot read {positions!r} as indices or a mask ({err})") from None
    if isinstance(positions, str):
        raise TypeError(f"{what}: got the string {positions!r}; expected indices, a bool mask [pos] / [batch, pos] "
                        "or a TokenLayout mask (position specs like 'random_10' are taken only where documented)")
    raise TypeError(f"{what}: expected indices, a bool mask [pos] / [batch, pos] (tensor, numpy array or list) or "
                    f"None; got {type(positions).__name__}")


def as_positions(positions: PositionSpec, n_pos: int, batch: int | None = None, *, what: str = "positions"
                 ) -> Bool[Tensor, "pos"] | Bool[Tensor, "batch pos"] | None:
    """Any accepted position set (module docstring) -> None or a bool mask [pos] / [batch, pos] on the CPU.

    n_pos: the sequence length (or the axis the set indexes). batch: if given, a [batch, pos] mask must have
    this many rows. `what` names the argument in error messages."""
    if positions is None:
        return None
    t = _to_tensor(positions, what)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what}: got {t.dtype} values {t.flatten()[:6].tolist()}; positions are integer indices "
                        "or a bool mask (a fraction is not a position)")
    if t.dtype != torch.bool:
        binary = t.numel() > 0 and bool(((t == 0) | (t == 1)).all())
        if t.ndim == 2 or (t.ndim == 1 and binary and t.shape[0] == n_pos and n_pos > 1):
            if not binary:
                raise ValueError(f"{what}: a 2-D integer position set must be a 0/1 mask [batch, pos]; got values "
                                 f"{sorted(set(t.flatten().tolist()))[:6]}")
            t = t.bool()  # a 0/1 integer mask (e.g. an attention_mask) is a mask, never indices 0 and 1
        else:
            return _from_indices(t, n_pos, what)
    if t.ndim not in (1, 2):
        raise ValueError(f"{what}: a mask must be [pos] or [batch, pos]; got shape {tuple(t.shape)}")
    if t.shape[-1] != n_pos:
        raise ValueError(f"{what}: mask of length {t.shape[-1]} (shape {tuple(t.shape)}) does not match the "
                         f"sequence length {n_pos}; was it built from other inputs?")
    if t.ndim == 2 and batch is not None and t.shape[0] not in (1, batch):
        raise ValueError(f"{what}: mask of shape {tuple(t.shape)} is for {t.shape[0]} prompts; the inputs have {batch}")
    return t.bool()


def _from_indices(t: Tensor, n_pos: int, what: str) -> Tensor:
    idx = t.long().flatten()
    if idx.numel() == 0:
        raise ValueError(f"{what}: no positions given")
    bad = idx[(idx < 0) | (idx >= n_pos)]
    if len(bad):
        hint = " (negative indices are refused: use TokenLayout.final_token() or n_pos - 1)" if (bad < 0).any() else ""
        raise ValueError(f"{what}: indices {bad.tolist()[:6]} are outside a sequence of length {n_pos}; expected "
                         f"0 <= p < {n_pos}{hint}")
    if len(set(idx.tolist())) != idx.numel():
        raise ValueError(f"{what}: repeated indices {idx.tolist()[:12]}; a position set lists each position once "
                         "(for a 0/1 mask give it as long as the sequence)")
    mask = torch.zeros(n_pos, dtype=torch.bool)
    mask[idx] = True
    return mask


def tile(mask: Tensor, batch: int, what: str = "positions") -> Bool[Tensor, "batch pos"]:
    """A [pos] or [1 | k, pos] mask as [batch, pos] (a mask for k prompts repeats over batch = n * k)."""
    m = mask[None] if mask.ndim == 1 else mask
    if m.shape[0] == batch:
        return m
    if batch % m.shape[0]:
        raise ValueError(f"{what}: a mask for {m.shape[0]} prompts does not fit a run of {batch}")
    return m.repeat(batch // m.shape[0], 1)


def indices(mask: Tensor) -> list[int]:
    """Sorted positions a [pos] mask (or any row of a [batch, pos] mask) selects."""
    m = mask.any(0) if mask.ndim == 2 else mask
    return m.nonzero().flatten().tolist()


_RANDOM = re.compile(r"random_(\d+)")


def random_count(spec: str) -> int | None:
    """k of a ``"random_{k}"`` spec (k >= 1), None for any other string that does not start with ``random_``;
    a malformed one (``"random_-3"``, ``"random_x"``, ``"random_0"``) is an error."""
    if not spec.startswith("random_"):
        return None
    m = _RANDOM.fullmatch(spec)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"malformed position spec {spec!r}: expected 'random_<k>' with k a positive integer")
    return int(m.group(1))


def word_positions(
    model: Any, input_ids: Tensor, words: str | Sequence[str | Sequence[str]], occurrence: int | None = None
) -> Bool[Tensor, "batch pos"]:
    """Token positions of a word (or several) in each prompt, as a boolean mask [batch, pos].

    `words`: one word for every prompt, or one entry per prompt (a word or a list of words). A word is looked up
    as the token sequence of `word` and of `" " + word` (BPE tokenizers mark the leading space), so multi-token
    words mark all their tokens. `occurrence`: None = every match, k = the k-th match (negative from the end).
    Raises if a prompt has no match.
    """
    tok = getattr(model, "tokenizer", model)
    ids = input_ids.cpu()
    b = ids.shape[0]
    per = [words] * b if isinstance(words, str) else list(words)
    if len(per) != b:
        raise ValueError(f"expected one word (or list of words) per prompt: {b} prompts, {len(per)} entries")
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for bi, entry in enumerate(per):
        for word in [entry] if isinstance(entry, str) else entry:
            variants = {tuple(tok(v, add_special_tokens=False)["input_ids"]) for v in (word, " " + word)}
            unk = getattr(tok, "unk_token_id", None)
            variants = {v for v in variants if v and unk not in v}
            row = ids[bi].tolist()
            starts = sorted({(s, len(v)) for v in variants for s in range(len(row) - len(v) + 1)
                             if tuple(row[s:s + len(v)]) == v})
            if not starts:
                raise ValueError(f"prompt {bi}: word {word!r} (token ids {sorted(variants)}) not found")
            chosen = starts if occurrence is None else [starts[occurrence]]
            for s, n in chosen:
                out[bi, s:s + n] = True
    return out
