"""Path patching (Wang et al. 2022, "Interpretability in the Wild", IOI; Goldowsky-Dill et al. 2023).

Question: how much of a metric's change flows from *sender* heads to *receivers* along the direct residual path?
The standard two-step version, on clean inputs C and counterfactual inputs X (noising direction: the run is
clean, the senders carry X):

(a) run C and X, caching every head's ``hook_z`` (and C's ``hook_mlp_out``);
(b) run C with every head's ``hook_z`` frozen at its C value except the senders', which take their X value, and
    (``freeze_mlps=True``, default) every MLP output frozen at its C value. The senders' change can then reach
    a later layer only through the residual stream directly. Cache the receivers' inputs;
(c) run C where only the receivers take the values cached in (b); everything else is recomputed. Metric.

Receivers:

* ``(layer, "q", head)``: the query of a head. The decoder computes ``attn(ln1(resid_pre))`` with q, k and v
  reading ONE shared input, so a head's "q input" cannot be patched on its own; instead the receiver's
  ``hook_q`` slice is replaced by ``q_proj(ln1(resid_pre'))[head]`` where ``resid_pre'`` is the path-patched
  residual of step (b) -- which is exactly what ``hook_q`` computes inside run (b), so step (b) caches hook_q
  itself (the layer's own modules, rotary applied afterwards as usual). Only that head's query changes in (c).
* ``(layer, "k", kv_head)`` / ``(layer, "v", kv_head)``: likewise for keys / values; with grouped-query attention
  the index is the *key/value head*, shared by ``n_heads / n_kv_heads`` query heads (all of which see the change).
* ``"logits"``: step (c) is the output of run (b) itself (freezing stops at the final residual stream; ln_final
  is recomputed): with frozen MLPs this is the senders' *direct effect* on the logits.

Senders are heads ``(layer, head)``; a sender *set* patches several heads at once. `path_patch` takes a list of
sender sets and runs them batched through the batch dimension (`repeat_inputs`: slot j of a forward of batch
``n * B`` carries set j), ``batch_size`` sets per forward. A sender at or after a receiver's layer has no path
to it (effect 0).

Exact identities (tests/analyses/test_paths.py, float64): counterfactual = clean gives zero effect; with
``freeze_mlps=False``, senders = all heads of the LAST layer and receiver = logits equals activation patching of
that layer's z (nothing downstream is frozen then: later heads do not exist). For an earlier layer the two
differ by design (path patching freezes the later heads that activation patching lets react). With frozen MLPs
the receiver's path-patched input is ``resid_clean + sum over senders of (z_X - z_C) W_O`` (tested against
this formula for q and for the logits).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.batching import repeat_inputs

from ._hooks import as_float, as_position_mask, metric_per_slot
from .patching import PatchResult

Metric = Callable[[Tensor], Tensor]
KINDS = ("q", "k", "v")


def _as_sender_sets(senders: Any) -> list[list[tuple[int, int]]]:
    out = []
    for s in senders:
        if isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, int) for x in s):
            s = [s]
        out.append([(int(l), int(h)) for l, h in s])
    return out


def _as_receivers(model: Any, receivers: Any) -> list[tuple[int, str, int]] | str:
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(f"receivers must be 'logits' or (layer, 'q'|'k'|'v', head) tuples, got {receivers!r}")
        return "logits"
    if isinstance(receivers, tuple) and len(receivers) == 3 and isinstance(receivers[1], str):
        receivers = [receivers]
    out = []
    for l, kind, h in receivers:
        if kind not in KINDS:
            raise ValueError(f"receiver kind must be one of {KINDS}, got {kind!r}")
        n = model.cfg.n_heads if kind == "q" else model.cfg.n_key_value_heads
        if not 0 <= int(h) < n or not 0 <= int(l) < model.cfg.n_layers:
            raise ValueError(f"receiver {(l, kind, h)} is out of range ({model.cfg.n_layers} layers, {n} {kind} heads)")
        out.append((int(l), kind, int(h)))
    if not out:
        raise ValueError("no receivers given")
    return out


def _pos_mask(positions: Any, b: int, p: int) -> Tensor | None:
    m = as_position_mask(positions, p)
    if m is None:
        return None
    m = m[None].expand(b, -1) if m.ndim == 1 else m
    return m[:, :, None, None]


@torch.no_grad()
def path_patch(
    model: Any,
    clean_inputs: dict[str, Any],
    counterfactual_inputs: dict[str, Any],
    metric: Metric,
    senders: Sequence[Any],
    receivers: Any,
    *,
    freeze_mlps: bool = True,
    sender_positions: Any = None,
    receiver_positions: Any = None,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = True,
) -> PatchResult:
    """Path-patch each sender set to `receivers` (see the module docstring).

    senders:   a list of sender sets, each a list of (layer, head) (a bare (layer, head) is a set of one).
    receivers: "logits", or a list of (layer, "q"|"k"|"v", head) (k/v: key/value head index), patched together.
    freeze_mlps: freeze MLP outputs at their clean values in step (b) (the IOI protocol freezes heads only;
               True keeps strictly the direct sender -> receiver path).
    sender_positions / receiver_positions: bool [batch, pos] / [pos] / ints where senders take X values /
               receivers take the step-(b) values (None = every position).
    Returns a noising PatchResult: scores [n_sender_sets] (``[.., B]`` per prompt), clean = metric on C,
    corrupt = metric on X; ``result.effect()`` is the path effect (scores - clean).
    """
    sets = _as_sender_sets(senders)
    recv = _as_receivers(model, receivers)
    n_layers = model.cfg.n_layers
    b, p = clean_inputs["input_ids"].shape
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    mlp_names = [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    clean = as_float(metric(model(**clean_inputs)))
    corrupt = as_float(metric(model(**counterfactual_inputs)))
    _, cc = model.run_with_cache(**clean_inputs, names_filter=z_names + mlp_names)
    _, cx = model.run_with_cache(**counterfactual_inputs, names_filter=z_names)
    zc, zx = {n: cc[n] for n in z_names}, {n: cx[n] for n in z_names}
    if any(zc[n].shape != zx[n].shape for n in z_names):
        raise ValueError("clean and counterfactual runs differ in shape: they need the same sequence length")
    mlp_c = {n: cc[n] for n in mlp_names}
    del cc, cx
    spos = _pos_mask(sender_positions, b, p)
    rpos = _pos_mask(receiver_positions, b, p)
    recv_names = sorted({f"blocks.{l}.attn.hook_{k}" for l, k, _ in recv}) if recv != "logits" else []

    def freeze_z(name: str, layer: int, chunk: list[list[tuple[int, int]]]) -> Callable:
        def hook(act: Tensor, hook: Any = None) -> Tensor:
            src_c, src_x = zc[name].to(act.device, act.dtype), zx[name].to(act.device, act.dtype)
            out = src_c.repeat(len(chunk), 1, 1, 1)
            for j, sset in enumerate(chunk):
                heads = [h for l, h in sset if l == layer]
                if not heads:
                    continue
                part = out[j * b : (j + 1) * b]
                new = src_x[:, :, heads] if spos is None else torch.where(spos.to(act.device), src_x[:, :, heads], src_c[:, :, heads])
                part[:, :, heads] = new
            return out
        return hook

    def freeze_mlp(name: str, n: int) -> Callable:
        return lambda act, hook=None: mlp_c[name].to(act.device, act.dtype).repeat(n, 1, 1)

    def capture(store: dict[str, Tensor]) -> Callable:
        def hook(act: Tensor, hook: Any) -> None:
            store[hook.name] = act.detach()
        return hook

    def put(name: str, store: dict[str, Tensor]) -> Callable:
        heads = [h for l, k, h in recv if f"blocks.{l}.attn.hook_{k}" == name]

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            out = act.clone()
            src = store[name].to(act.device, act.dtype)
            if rpos is None:
                out[:, :, heads] = src[:, :, heads]
            else:
                m = rpos.to(act.device).repeat(act.shape[0] // b, 1, 1, 1)
                out[:, :, heads] = torch.where(m, src[:, :, heads], act[:, :, heads])
            return out
        return hook

    values = []
    bar = tqdm(total=len(sets), desc="path patching", disable=not progress, leave=False)
    try:
        for start in range(0, len(sets), batch_size):
            chunk = sets[start : start + batch_size]
            n = len(chunk)
            rep = repeat_inputs(clean_inputs, n)
            hooks = [(name, freeze_z(name, l, chunk)) for l, name in enumerate(z_names)]
            if freeze_mlps:
                hooks += [(name, freeze_mlp(name, n)) for name in mlp_names]
            store: dict[str, Tensor] = {}
            hooks += [(name, capture(store)) for name in recv_names]
            with model.hooks(fwd_hooks=hooks):
                out_b = model(**rep)
            if recv == "logits":
                out = out_b
            else:
                if rpos is not None and rpos.shape[0] != b:
                    raise ValueError("receiver_positions must be [pos] or [batch, pos]")
                with model.hooks(fwd_hooks=[(name, put(name, store)) for name in recv_names]):
                    out = model(**rep)
            values.append(metric_per_slot(metric, out, n))
            bar.update(n)
    finally:
        bar.close()
    scores = torch.cat(values)
    if not per_prompt:
        scores, clean, corrupt = scores.mean(-1), clean.mean(), corrupt.mean()
    return PatchResult(scores, clean, corrupt, "noise", ("sender",),
                       {"sender": sets, "receivers": recv, "freeze_mlps": freeze_mlps})


def path_patch_heads(
    model: Any,
    clean_inputs: dict[str, Any],
    counterfactual_inputs: dict[str, Any],
    metric: Metric,
    receivers: Any,
    *,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> PatchResult:
    """Every single head (of `layers`, default all) as its own sender set, to `receivers`: scores
    [layer, head] (``[.., B]`` per prompt). kwargs: see `path_patch`."""
    layer_ids = list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers]
    heads = list(range(model.cfg.n_heads))
    res = path_patch(model, clean_inputs, counterfactual_inputs, metric, [[(l, h)] for l in layer_ids for h in heads],
                     receivers, **kwargs)
    extra = tuple(res.scores.shape[1:])
    return PatchResult(res.scores.reshape((len(layer_ids), len(heads)) + extra), res.clean, res.corrupt, "noise",
                       ("layer", "head"), {**res.labels, "layer": layer_ids, "head": heads})


def head_receivers(model: Any, layer: int, head: int, kinds: Sequence[str] = KINDS) -> list[tuple[int, str, int]]:
    """Receivers for one query head's q and/or its key/value head's k, v (GQA: kv head = head // group size)."""
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    return [(layer, k, head if k == "q" else head // group) for k in kinds]


__all__ = ["path_patch", "path_patch_heads", "head_receivers"]
