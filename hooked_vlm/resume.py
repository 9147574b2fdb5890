"""Rerun only what a late intervention can change: resume a forward at (layer, position) from a saved run.

A decoder is causal and layered, so an edit at block `l`, positions >= `p0` cannot change anything at earlier
layers, nor at earlier positions of any layer. `capture` runs the model once and keeps, for every block, its
input residual stream and its (rotated) keys and values; `resume` then runs blocks `l..` on positions `p0..`
only, attending to the saved keys/values of positions `< p0`, for `n` copies of the batch at once (the layout of
`batching.repeat_inputs`, so the analyses' sweep engine (`analyses.toolkit.sweep`) can give each copy its own patch). Logits at
positions `< p0` are the saved ones.

Hooks registered on the model fire during `resume` as in a forward, but they see positions `p0..` only (and
blocks `l..`): that is the point. The analyses' sweep engine (`analyses.toolkit.sweep.run_sites`) resumes every
sweep's decoder sites this way (``reuse_prefix=False`` reruns everything); results equal full forwards up to float
round-off (tested).

Worked example (one prompt, 1,000 tokens, 8 layers; patch resid_pre at layer 5, position 990): the forward runs
3 blocks x 10 queries instead of 8 blocks x 1,000, and no vision tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .components.rotary import Rotary, map_rotary


@dataclass
class SavedRun:
    """One forward's state (batch B, sequence S): what `resume` restarts from."""

    resid_pre: list[Tensor]  # per block: [B, S, d_model]
    keys: list[Tensor]  # per block: rotated keys [B, S, kv_head, d_head]
    values: list[Tensor]  # per block: [B, S, kv_head, d_head]
    rotary: Rotary  # cos, sin [B, S, d_head] (or one pair per rotary module, see HookedVLM.prepare)
    mask: Tensor | None  # additive [B, 1, S, S], None when nothing is padded
    logits: Tensor  # [B, S, d_vocab]
    inject: dict[int, Tensor] | None = None  # per block: additions after its MLP (Qwen3-VL DeepStack) [B, S, d_model]

    @property
    def batch(self) -> int:
        return int(self.logits.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.logits.shape[1])


@torch.no_grad()
def capture(model: Any, inputs: dict[str, Any]) -> SavedRun:
    """Run `model` (a HookedVLM) on `inputs` once, keeping what `resume` needs. Hooks already on the model run
    as usual (the saved state includes their effect)."""
    x, rotary, mask, inject = model.prepare(**inputs)
    resid, keys, values = [], [], []
    for l, block in enumerate(model.blocks):
        resid.append(x)
        store = {}
        handles = [block.attn.hook_rot_k.register_forward_hook(lambda m, i, o: store.__setitem__("k", o)),
                   block.attn.hook_v.register_forward_hook(lambda m, i, o: store.__setitem__("v", o))]
        try:
            x = block(x, rotary, mask, inject=inject.get(l))
        finally:
            for h in handles:
                h.remove()
        keys.append(store["k"])
        values.append(store["v"])
    logits = model.unembed(model.ln_final(x.to(model.unembed.weight.device)))
    return SavedRun(resid, keys, values, rotary, mask, logits, inject)


def _repeat(t: Tensor, n: int, view: bool = False) -> Tensor:
    """n copies of `t` along dim 0. view=True (read-only uses: past keys / values, saved logits) gives a
    stride-0 view for one prompt, which the concatenation after it copies once; activations that hooks may
    edit in place are always real copies."""
    if n == 1:
        return t
    if view and t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    return torch.cat([t] * n, dim=0)


def safe_start(saved: SavedRun, pos: int) -> int:
    """The latest position <= `pos` that `resume` may restart from: no earlier position attends to it or later
    ones. That is `pos` itself for causal attention; inside a bidirectional group (Gemma 3: the tokens of one
    image see each other) it is the group's first position."""
    if saved.mask is None or pos == 0:
        return pos
    allowed = saved.mask[:, 0] == 0  # [B, query, key]; fully padded rows (all masked) see nothing
    while pos > 0:
        later = allowed[:, :pos, pos:].any(-1).any(0)
        if not later.any():
            break
        pos = int(later.nonzero()[0])
    return pos


def resume(model: Any, saved: SavedRun, layer: int, pos: int, n: int = 1) -> Float[Tensor, "nB S d_vocab"]:
    """Logits [n * B, S, d_vocab] of n copies of the saved batch, recomputing blocks `layer..` at positions
    `pos..` only (hooks fire there, with activations of `S - pos` positions)."""
    n_layers, s = len(model.blocks), saved.seq_len
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the decoder's blocks 0..{n_layers - 1}")
    if not 0 <= pos < s:
        raise ValueError(f"position {pos} is outside the saved sequence of length {s}")
    if safe_start(saved, pos) != pos:
        raise ValueError(f"cannot resume at position {pos}: earlier positions attend to it (bidirectional attention "
                         f"within an image); resume from safe_start(saved, {pos}) = {safe_start(saved, pos)}")
    x = _repeat(saved.resid_pre[layer][:, pos:], n)
    rotary = map_rotary(saved.rotary, lambda t: _repeat(t[:, pos:], n))
    mask = None if saved.mask is None else _repeat(saved.mask[:, :, pos:], n)
    for i in range(layer, n_layers):
        past = (_repeat(saved.keys[i][:, :pos], n, True), _repeat(saved.values[i][:, :pos], n, True)) if pos else None
        add = (saved.inject or {}).get(i)
        x = model.blocks[i](x, rotary, mask, past, inject=None if add is None else _repeat(add[:, pos:], n))
    tail = model.unembed(model.ln_final(x.to(model.unembed.weight.device)))
    if pos == 0:
        return tail
    return torch.cat([_repeat(saved.logits[:, :pos], n, True), tail], dim=1)


__all__ = ["SavedRun", "capture", "resume", "safe_start"]
