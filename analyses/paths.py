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
sender sets and runs them on the sweep engine (`analyses.toolkit.sweep`), ``batch_size`` sets per forward. Freezing
at clean values changes nothing upstream of the first sender, so run (b) resumes from one saved clean run at the
first sender's layer and position (decoder senders; senders in the tower or the embeddings run full forwards),
and run (c) at the first receiver's layer. A sender at or after a receiver's layer has no path
to it (effect 0).

Exact identities (tests/analyses/test_paths.py, float64): counterfactual = clean gives zero effect; with
``freeze_mlps=False``, senders = all heads of the LAST layer and receiver = logits equals activation patching of
that layer's z (nothing downstream is frozen then: later heads do not exist). For an earlier layer the two
differ by design (path patching freezes the later heads that activation patching lets react). With frozen MLPs
the receiver's path-patched input is ``resid_clean + sum over senders of (z_X - z_C) W_O`` (tested against
this formula for q and for the logits). With attention post-norms (Gemma 3's ``ln1_post``) the senders' change
is normalised together with the frozen heads of its layer before it is added (the model's own computation), so
that formula then holds for the post-norm's input, not for the residual stream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .toolkit.inputs import check_pair
from .toolkit import (Metric, Site, SweepResult, act_name, as_positions, first_position, metric_values, run_cached,
                      run_sites)
from .toolkit.sweep import EditFn, from_position

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Inputs = dict[str, Any]
KINDS = ("q", "k", "v")


@dataclass
class SenderSet:
    """What one slot of a path-patching run changes to its counterfactual value."""

    heads: dict[int, list[int]] = field(default_factory=dict)  # decoder layer -> heads (hook_z)
    mlps: set[int] = field(default_factory=set)  # decoder layers (hook_mlp_out)
    embed: set[str] = field(default_factory=set)  # "image" / "text": hook_embed at those positions
    vision: set[int] = field(default_factory=set)  # vision blocks (their hook_attn_out and hook_mlp_out)
    projector: bool = False  # projector.hook_out: the image features as placed
    vision_embed: bool = False  # vision.blocks.0.hook_resid_pre: the tower residual's input
    deepstack: set[int] = field(default_factory=set)  # decoder layers whose hook_deepstack (Qwen3-VL) is sent

    @property
    def label(self) -> list[str]:
        return ([f"L{l}H{h}" for l, hs in sorted(self.heads.items()) for h in hs] + [f"MLP{l}" for l in sorted(self.mlps)]
                + [f"embed_{k}" for k in sorted(self.embed)] + (["V.embed"] if self.vision_embed else [])
                + [f"V{k}" for k in sorted(self.vision)]
                + (["projector"] if self.projector else []) + [f"DS{l}" for l in sorted(self.deepstack)])


_NODE = re.compile(r"L(\d+)H(\d+)|MLP(\d+)|V(\d+)|embed_(image|text)|projector|V\.embed|DS(\d+)")


def _as_sender_sets(model: "HookedVLM", senders: Any) -> list[SenderSet]:
    """Each sender set: a node or a list of nodes; a node is (layer, head) or a name "L{l}H{h}", "MLP{l}",
    "embed_image", "embed_text", "V.embed" (the vision tower residual's input), "V{k}" (vision block k) or
    "projector" or "DS{l}" (Qwen3-VL: the DeepStack addition after block l) (the vocabulary of `analyses.edges`)."""
    out = []
    n_vision = len(getattr(model.vision, "blocks", ()))
    for s in senders:
        if isinstance(s, str) or (isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, int) for x in s)):
            s = [s]
        sset = SenderSet()
        for node in s:
            if isinstance(node, tuple):
                l, h = int(node[0]), int(node[1])
                node = f"L{l}H{h}"
            m = _NODE.fullmatch(str(node))
            if m is None:
                raise ValueError(f"unknown sender {node!r}: expected (layer, head), 'L{{l}}H{{h}}', 'MLP{{l}}', "
                                 "'embed_image', 'embed_text', 'V.embed' (the vision tower's input), 'V{k}' (vision block), "
                                 "'projector' or 'DS{l}' (a DeepStack addition)")
            head_l, head_h, mlp, vis, embed, ds = m.groups()
            if head_l is not None:
                if not (0 <= int(head_l) < model.cfg.n_layers and 0 <= int(head_h) < model.cfg.n_heads):
                    raise ValueError(f"sender {node} is out of range ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads)")
                sset.heads.setdefault(int(head_l), []).append(int(head_h))
            elif mlp is not None:
                if not 0 <= int(mlp) < model.cfg.n_layers:
                    raise ValueError(f"sender {node} is out of range ({model.cfg.n_layers} layers)")
                sset.mlps.add(int(mlp))
            elif vis is not None:
                if not 0 <= int(vis) < n_vision:
                    raise ValueError(f"sender {node} is out of range (the vision tower has {n_vision} blocks)")
                sset.vision.add(int(vis))
            elif embed is not None:
                sset.embed.add(embed)
            elif ds is not None:
                if int(ds) not in model.cfg.deepstack_layers:
                    raise ValueError(f"sender {node}: this model adds DeepStack features after blocks "
                                     f"{list(model.cfg.deepstack_layers)} only")
                sset.deepstack.add(int(ds))
            else:
                if node == "V.embed":
                    sset.vision_embed = True
                else:
                    sset.projector = True
        out.append(sset)
    return out


def _as_receivers(model: "HookedVLM", receivers: Any) -> list[tuple[int, str, int]] | str:
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
    m = as_positions(positions, p, b)
    if m is None:
        return None
    m = m[None].expand(b, -1) if m.ndim == 1 else m
    return m[:, :, None, None]


@torch.no_grad()
def path_patch(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    senders: Sequence[Any],
    receivers: Any,
    freeze_mlps: bool = True,
    sender_positions: Any = None,
    receiver_positions: Any = None,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Path-patch each sender set to `receivers` (see the module docstring).

    senders:   a list of sender sets, each a node or a list of nodes patched together. Nodes: (layer, head) or
               "L{l}H{h}" (a head's z), "MLP{l}" (a decoder MLP's output), "embed_image" / "embed_text" (the
               residual stream's input at image / text positions), "V.embed" (the vision tower residual's input,
               `vision.blocks.0.hook_resid_pre`), "V{k}" (vision block k's attention and MLP
               outputs; the other vision blocks are frozen at their clean outputs, so the change reaches the
               decoder only through the tower's residual stream and the projector) and "projector" (the image
               features as placed), "DS{l}" (Qwen3-VL: the DeepStack addition after decoder block l).
    receivers: "logits", or a list of (layer, "q"|"k"|"v", head) (k/v: key/value head index), patched together.
    freeze_mlps: freeze MLP outputs at their clean values in step (b) (the IOI protocol freezes heads only;
               True keeps strictly the direct sender -> receiver path).
    sender_positions / receiver_positions: bool [batch, pos] / [pos] / ints where decoder senders take X
               values / receivers take the step-(b) values (None = every position). Vision, projector and
               DeepStack senders always change every patch / image token.
    Returns a noising SweepResult: scores [n_sender_sets] (``[.., B]`` per prompt), clean = metric on C,
    corrupt = metric on X; ``result.effect()`` is the path effect (scores - clean).
    """
    sets = _as_sender_sets(model, senders)
    recv = _as_receivers(model, receivers)
    n_layers = model.cfg.n_layers
    if not sets:
        raise ValueError("path_patch: no sender sets given")
    check_pair(clean, corrupt)
    b, p = clean["input_ids"].shape
    z_names = [act_name("z", l) for l in range(n_layers)]
    mlp_names = [act_name("mlp_out", l) for l in range(n_layers)]
    vis_blocks = sorted(set().union(*(s.vision for s in sets)))
    n_vision = len(getattr(model.vision, "blocks", ()))
    any_vision = bool(vis_blocks) or any(s.vision_embed for s in sets)
    vis_names = [f"vision.blocks.{k}.hook_{w}" for k in range(n_vision) for w in ("attn_out", "mlp_out")] if any_vision else []
    x_names = z_names + (mlp_names if any(s.mlps for s in sets) else []) + vis_names
    x_names += ["hook_embed"] if any(s.embed for s in sets) else []
    x_names += ["projector.hook_out"] if any(s.projector for s in sets) else []
    x_names += ["vision.blocks.0.hook_resid_pre"] if any(s.vision_embed for s in sets) else []
    x_names += [f"blocks.{l}.hook_deepstack" for l in sorted(set().union(*(s.deepstack for s in sets)))]
    clean_v = metric_values(metric, model(**clean))
    corrupt_v = metric_values(metric, model(**corrupt))
    _, vc = run_cached(model, clean, sorted(set(z_names + mlp_names + x_names)), missing="ignore")
    _, vx = run_cached(model, corrupt, x_names, missing="ignore")
    ran = [k for k in vis_blocks if f"vision.blocks.{k}.hook_attn_out" in vx]
    if ran != vis_blocks:
        raise ValueError(f"vision blocks {sorted(set(vis_blocks) - set(ran))} do not run in this model's forward "
                         "(they come after the vision feature layer): they send nothing")
    vis_names = [n for n in vis_names if n in vx]
    if any(vc[n].shape != vx[n].shape for n in vx):
        raise ValueError("clean and counterfactual runs differ in shape: they need the same sequence length and images")
    spos = _pos_mask(sender_positions, b, p)
    rpos = _pos_mask(receiver_positions, b, p)
    recv_names = sorted({act_name(k, l) for l, k, _ in recv}) if recv != "logits" else []
    if recv_names:
        _, c_recv = run_cached(model, clean, recv_names)
    image = (clean["input_ids"] == model.cfg.image_token_id)[:, :, None]
    real = clean.get("attention_mask")
    text = ~image if real is None else (~image & real.bool()[:, :, None])
    sender_first = 0 if spos is None else first_position(spos[:, :, 0, 0])

    def embed_pick(sset: SenderSet) -> Any:
        m = torch.zeros_like(image)
        if "image" in sset.embed:
            m = m | image
        if "text" in sset.embed:
            m = m | text
        return m if spos is None else m & spos[..., 0]

    def step_b(sset: SenderSet, store: dict[str, Tensor]) -> Site:
        """Run (b) for one sender set: heads (and MLPs) frozen at clean, senders at X; receivers captured."""
        edits = []
        for l, name in enumerate(z_names):
            pick = None
            if sset.heads.get(l):
                pick = torch.zeros(1, 1, model.cfg.n_heads, 1, dtype=torch.bool)
                pick[:, :, sset.heads[l]] = True
                pick = pick if spos is None else pick & spos
            edits.append((name, _mix(name, vc[name], vx[name], pick, True)))
        for l, name in enumerate(mlp_names):
            pick = (True if spos is None else spos[..., 0]) if l in sset.mlps else None
            if freeze_mlps or pick is not None:
                edits.append((name, _mix(name, vc[name], vx.get(name), pick, freeze_mlps)))
        upstream = bool(sset.embed or sset.vision or sset.projector or sset.vision_embed)
        if upstream:  # senders before the decoder: a full forward, the tower frozen at clean but for the senders
            if "hook_embed" in vx:
                edits.append(("hook_embed", _mix("hook_embed", vc["hook_embed"], vx["hook_embed"],
                                                 embed_pick(sset) if sset.embed else None, False)))
            for name in vis_names:
                k = int(name.split(".")[2])
                edits.append((name, _mix(name, vc[name], vx[name], True if k in sset.vision else None, True)))
            for name, on in (("projector.hook_out", sset.projector), ("vision.blocks.0.hook_resid_pre", sset.vision_embed)):
                if name in vx:
                    edits.append((name, _mix(name, vc[name], vx[name], True if on else None, False)))
        for l in sorted(sset.deepstack):  # the other DeepStack additions are recomputed (from the clean pixels)
            if (name := f"blocks.{l}.hook_deepstack") in vx:  # absent: no image, nothing added
                edits.append((name, _mix(name, vc[name], vx[name], True, False)))
        edits += [(name, _capture(store, name)) for name in recv_names]
        layers = sorted(sset.heads) + sorted(sset.mlps) + sorted(sset.deepstack)
        first = 0 if sset.deepstack else sender_first
        start = None if upstream or not layers else (min(layers), first)
        return Site(edits, start, like={n: tuple(vc[n].shape) for n, _ in edits if n in vc}, label=sset.label)

    stores: list[dict[str, Tensor]] = [{} for _ in sets]
    scores, _ = run_sites(model, clean, metric, [step_b(s, st) for s, st in zip(sets, stores)], batch_size=batch_size,
                          progress=progress, desc="path patching")
    if recv != "logits":  # (c): only the receivers take their step-(b) values; everything else recomputed
        recv_first = min(l for l, _, _ in recv), 0 if rpos is None else first_position(rpos[:, :, 0, 0])
        sites = []
        for sset, store in zip(sets, stores):
            edits = []
            for name in recv_names:
                heads = [h for l, k, h in recv if act_name(k, l) == name]
                # from the layer and position run (b) resumed at; earlier ones (never run) are clean's
                got = store.get(name, c_recv[name])
                full = torch.cat([c_recv[name][:, : p - got.shape[1]].to(got.device, got.dtype), got], dim=1)
                pick = torch.zeros(1, 1, full.shape[2], 1, dtype=torch.bool)
                pick[:, :, heads] = True
                edits.append((name, _mix(name, c_recv[name], full, pick if rpos is None else pick & rpos, False)))
            sites.append(Site(edits, recv_first, label=sset.label))
        scores, _ = run_sites(model, clean, metric, sites, batch_size=batch_size, progress=progress,
                              desc="path patching (receivers)")
    if not per_prompt:
        scores, clean_v, corrupt_v = scores.mean(-1), clean_v.mean(), corrupt_v.mean()
    return SweepResult(scores, clean_v, corrupt_v, "noise", ("sender",),
                       {"sender": [x.label for x in sets], "receivers": recv, "freeze_mlps": freeze_mlps})


def _mix(name: str, c_val: Tensor, x_val: Tensor | None, pick: Any, freeze: bool) -> EditFn:
    """Sweep-engine edit: x_val where `pick` says (True: all of it; a bool mask; None: none of it), elsewhere
    c_val if `freeze` else the recomputed activation; all read from the run's first position on."""
    def fn(act: Tensor, first: int) -> Tensor:
        base = from_position(name, c_val, first).to(act.device, act.dtype) if freeze else act
        if pick is None:
            return base
        x = from_position(name, x_val, first).to(act.device, act.dtype)
        if pick is True:
            return x
        return torch.where(from_position(name, pick, first).to(act.device), x, base)

    return fn


def _capture(store: dict[str, Tensor], name: str) -> EditFn:
    def fn(act: Tensor, first: int) -> Tensor:
        store[name] = act.detach().clone()
        return act

    return fn


def path_patch_heads(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    receivers: Any,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Every single head (of `layers`, default all) as its own sender set, to `receivers`: scores
    [layer, head] (``[.., B]`` per prompt). kwargs: see `path_patch`."""
    layer_ids = list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers]
    heads = list(range(model.cfg.n_heads))
    res = path_patch(model, clean, corrupt, metric, senders=[[(l, h)] for l in layer_ids for h in heads],
                     receivers=receivers, **kwargs)
    extra = tuple(res.scores.shape[1:])
    return SweepResult(res.scores.reshape((len(layer_ids), len(heads)) + extra), res.clean, res.corrupt, "noise",
                       ("layer", "head"), {**res.labels, "layer": layer_ids, "head": heads})


def head_receivers(model: "HookedVLM", layer: int, head: int, kinds: Sequence[str] = KINDS) -> list[tuple[int, str, int]]:
    """Receivers for one query head's q and/or its key/value head's k, v (GQA: kv head = head // group size)."""
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    return [(layer, k, head if k == "q" else head // group) for k in kinds]


__all__ = ["path_patch", "path_patch_heads", "head_receivers"]
