"""Mean interventions on binding IDs as 2505.22200 ran them (after Feng & Steinhardt): the paired, per-token Delta.

Positions come only from boolean masks [batch, pos] (from TokenLayout or word positions); nothing here knows a
task's geometry. A slot mask selects the same number of tokens in every prompt; token j of a slot is its j-th
selected position in sequence order.

- `paired_deltas`: Delta[l, j] = mean over pairs of Z_l(X at slot 1)[token j] - Z_l(X at slot 0)[token j], where
  each pair holds the SAME entity X at slot 1 of one context and at slot 0 of another, so its content cancels and
  what is left is b(1) - b(0), the difference of binding IDs, one vector per layer and token of the slot (not
  pooled over the slot's tokens). `per_token_delta` is the estimator on plain tensors.
- `add_deltas`: slot 0 := clean + Delta and slot 1 := clean - Delta at every hook (default every layer's
  resid_pre), the context frozen at its clean residuals, so only the question is recomputed.
- `random_deltas`: the control, random directions with the norm of each Delta vector (per layer and token).
- `mean_intervention_protocol`: conditions (O, C, I, O+I, O+C), questions about both slots, a scale sweep, the
  control at every scale; every rate a `toolkit.stats.Estimate`.

The pooled variant (one vector per layer from unpaired prompts: `binding.binding_deltas`, `binding.mean_intervention`)
is kept as a documented option.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .toolkit import Estimate, Metric, act_name, bootstrap, rate, run_cached
from .metrics import Accuracy

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

# the paper's conditions: which slot kinds get their Delta at once
CONDITIONS: dict[str, tuple[str, ...]] = {"O": ("object",), "C": ("colour",), "I": ("item",),
                                          "O+I": ("object", "item"), "O+C": ("object", "colour")}


def resid_names(model: "HookedVLM", kind: str = "resid_pre") -> list[str]:
    """`blocks.{l}.hook_{kind}` for every layer."""
    return [act_name(kind, l) for l in range(model.cfg.n_layers)]


def _or(*masks: Tensor | None) -> Tensor | None:
    out = None
    for m in masks:
        if m is not None:
            out = m.bool().cpu() if out is None else out | m.bool().cpu()
    return out


@torch.no_grad()
def run_with_resid(
    model: "HookedVLM", inputs: dict[str, Any], targets: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
    metric: Metric | None = None,
) -> Tensor:
    """Run with every hook in `targets` set to targets[name] [batch, pos, d] at the positions in mask."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        m = mask.to(x.device)[..., None]
        return torch.where(m, targets[hook.name].to(x.device, x.dtype), x)

    with model.hooks(fwd_hooks=[(n, hook) for n in targets]):
        logits = model(**inputs)
    return logits if metric is None else metric(logits)


def prompt_chunks(model: "HookedVLM", inputs: dict[str, Any], batch_size: int | None) -> Iterator[tuple[int, int, dict]]:
    """(start, stop, inputs of prompts start..stop-1) in chunks of batch_size prompts (None: one chunk)."""
    n = int(inputs["input_ids"].shape[0])
    if batch_size is None or batch_size >= n:
        yield 0, n, inputs
        return
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive number of prompts per forward, got {batch_size}")
    from hooked_vlm.batching import slice_prompts

    images = (model.layout(inputs).image_index.amax(1) + 1).clamp(min=0).tolist()
    for i in range(0, n, batch_size):
        yield i, min(i + batch_size, n), slice_prompts(inputs, i, min(i + batch_size, n), images)


def slot_tokens(act: Float[Tensor, "batch pos d"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "batch n_tok d"]:
    """The slot's activations per prompt, in sequence order; every prompt must select the same number of tokens."""
    mask = mask.bool()
    if mask.shape != act.shape[:2]:
        raise ValueError(f"slot mask {tuple(mask.shape)} does not match activations {tuple(act.shape[:2])} (batch, pos)")
    counts = mask.sum(1)
    if counts.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"a slot must select the same, non-zero number of tokens in every prompt; got {counts.tolist()}")
    return act[mask.to(act.device)].reshape(act.shape[0], int(counts[0]), *act.shape[2:])


@torch.no_grad()
def slot_activations(
    model: "HookedVLM", inputs: dict[str, Any], slot: Bool[Tensor, "batch pos"], *,
    hook_names: Sequence[str] | None = None, batch_size: int | None = None,
) -> Float[Tensor, "batch n_hooks n_tok d_model"]:
    """The slot's residuals (token j = its j-th position) at each hook (default every resid_pre), in float32 on CPU."""
    names = list(hook_names or resid_names(model))
    out = []
    for i, j, part in prompt_chunks(model, inputs, batch_size):
        _, cache = run_cached(model, part, names)
        out.append(torch.stack([slot_tokens(cache[n].float().cpu(), slot[i:j].cpu()) for n in names], 1))
    return torch.cat(out)


def per_token_delta(
    at_slot0: Float[Tensor, "n_pairs *hooks n_tok d"], at_slot1: Float[Tensor, "*same_shape"]
) -> Float[Tensor, "*hooks n_tok d"]:
    """The paired estimator: mean over pairs of (entity X's activation at slot 1) - (X's activation at slot 0),
    token by token. Pair i must hold the same entity in at_slot0[i] and at_slot1[i]."""
    if at_slot0.shape != at_slot1.shape:
        raise ValueError(f"paired activations must have the same shape, got {tuple(at_slot0.shape)} and "
                         f"{tuple(at_slot1.shape)}; each slot needs the same token count in both contexts")
    return (at_slot1.double() - at_slot0.double()).mean(0).float()


@dataclass
class SlotPairs:
    """Paired contexts for one slot kind: prompt i of `at_slot0` holds entity X_i at `slot0`, prompt i of
    `at_slot1` holds the same X_i at `slot1` (other entities random)."""

    at_slot0: dict[str, Any]
    slot0: Bool[Tensor, "batch pos"]
    at_slot1: dict[str, Any]
    slot1: Bool[Tensor, "batch pos2"]


@torch.no_grad()
def paired_deltas(
    model: "HookedVLM", pairs: SlotPairs, *, hook_names: Sequence[str] | None = None, batch_size: int | None = None,
) -> Float[Tensor, "n_hooks n_tok d_model"]:
    """Delta per hook and token of the slot from paired samples (see `per_token_delta`)."""
    n0, n1 = pairs.at_slot0["input_ids"].shape[0], pairs.at_slot1["input_ids"].shape[0]
    if n0 != n1:
        raise ValueError(f"paired contexts: {n0} prompts with X at slot 0 but {n1} with X at slot 1")
    z0 = slot_activations(model, pairs.at_slot0, pairs.slot0, hook_names=hook_names, batch_size=batch_size)
    z1 = slot_activations(model, pairs.at_slot1, pairs.slot1, hook_names=hook_names, batch_size=batch_size)
    return per_token_delta(z0, z1)


def random_deltas(delta: Float[Tensor, "*shape d"], seed: int = 0) -> Float[Tensor, "*shape d"]:
    """Random directions with the same norm as each vector of delta (per hook, and per token if it has tokens):
    the control."""
    r = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed))
    return r / r.norm(dim=-1, keepdim=True) * delta.float().norm(dim=-1, keepdim=True)


def _scatter(mask: Tensor, delta: Tensor, shape: tuple[int, ...]) -> Tensor:
    """[batch, pos, d] zeros with delta [n_tok, d] (or [d]: every token alike) at each prompt's slot tokens."""
    out = torch.zeros(shape, dtype=torch.float32)
    mask = mask.bool().cpu()
    counts = mask.sum(1)
    if delta.ndim == 1:
        out[mask] = delta.float()
        return out
    if (counts != delta.shape[0]).any():
        raise ValueError(f"a per-token Delta has {delta.shape[0]} tokens but the slot selects {counts.tolist()} per prompt")
    out[mask] = delta.float().repeat(shape[0], 1)
    return out


@torch.no_grad()
def add_deltas(
    model: "HookedVLM",
    clean: dict[str, Any],
    edits: Sequence[tuple[Bool[Tensor, "batch pos"], Bool[Tensor, "batch pos"], Tensor]],
    metric: Metric | None = None,
    *,
    freeze: Bool[Tensor, "batch pos"] | None = None,
    hook_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    clean_cache: dict[str, Tensor] | None = None,
) -> Tensor:
    """Run `clean` with, for each (slot0, slot1, delta) in edits, slot 0 := clean + delta and slot 1 := clean - delta
    at every hook (default every resid_pre); delta is [n_hooks, n_tok, d] (per token) or [n_hooks, d] (one vector).
    `freeze`: positions (the context) held at their clean residuals at every hook. Returns logits, or
    metric(logits) [batch], concatenated over chunks of batch_size prompts. clean_cache: the clean run's
    activations at hook_names, when the caller has them (one run saved per call; only without chunks)."""
    names = list(hook_names or resid_names(model))
    if not edits:  # nothing to add: a frozen context at its clean values is the clean run
        return torch.cat([model(**part) if metric is None else metric(model(**part))
                          for _, _, part in prompt_chunks(model, clean, batch_size)])
    for _, _, d in edits:
        if len(d) != len(names):
            raise ValueError(f"Delta has {len(d)} rows for {len(names)} hooks")
    outs = []
    if clean_cache is not None and batch_size is not None:
        raise ValueError("add_deltas: clean_cache holds the whole batch; pass it without batch_size")
    for i, j, part in prompt_chunks(model, clean, batch_size):
        cache = clean_cache if clean_cache is not None else run_cached(model, part, names)[1]
        targets = {}
        for h, n in enumerate(names):
            x = cache[n]
            add = torch.zeros(x.shape, dtype=torch.float32)
            for s0, s1, d in edits:
                add += _scatter(s0[i:j], d[h], tuple(x.shape)) - _scatter(s1[i:j], d[h], tuple(x.shape))
            targets[n] = (x.float() + add.to(x.device)).to(x.dtype)
        mask = _or(*[s[i:j] for s0, s1, _ in edits for s in (s0, s1)], None if freeze is None else freeze[i:j])
        outs.append(run_with_resid(model, part, targets, mask, metric))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------ protocol
@dataclass
class BindingQuery:
    """Prompts asking about one object, with the slot masks of every kind, the answer ids if nothing changes
    (`kept`, the queried object's attribute) and if the bindings swap (`swapped`, the other object's), and the
    context to freeze."""

    inputs: dict[str, Any]
    slots: Mapping[str, tuple[Tensor, Tensor]]
    kept: Int[Tensor, "batch"]
    swapped: Int[Tensor, "batch"]
    freeze: Bool[Tensor, "batch pos"] | None = None


@dataclass
class MeanInterventionResult:
    """`baseline[query]` and `rates[(condition, scale, query)]`: {"swapped", "kept", "random_swapped",
    "random_kept"} Estimates (share of prompts over `n`; query "both" pools the questions about every slot).
    `delta_norm[kind]`: mean norm of the Delta vectors per hook (over the slot's tokens)."""

    baseline: dict[str, dict[str, Estimate]]
    rates: dict[tuple[str, float, str], dict[str, Estimate]]
    delta_norm: dict[str, list[float]] = field(default_factory=dict)
    estimator: str = "paired"

    def get(self, condition: str, scale: float | int = 1, query: str = "both") -> dict[str, Estimate]:
        key = (condition, float(scale), query)
        if key not in self.rates:
            raise KeyError(f"no result for {key}; have {sorted(self.rates)}")
        return self.rates[key]

    def to_dict(self) -> dict[str, Any]:
        """{"estimator", "none": {query: {rate: {value, ci_low, ci_high, n}}}, condition: {"1x": {query: ...}}}."""
        out: dict[str, Any] = {"estimator": self.estimator,
                               "none": {q: {k: e.to_dict() for k, e in r.items()} for q, r in self.baseline.items()}}
        for (cond, scale, query), r in self.rates.items():
            out.setdefault(cond, {}).setdefault(f"{scale:g}x", {})[query] = {k: e.to_dict() for k, e in r.items()}
        return out

    def rows(self, query: str = "both") -> list[dict[str, Any]]:
        """One table row per condition and scale (plus the baseline) for `query`, rates formatted with intervals."""
        rows = [dict(condition="none", scale="", **{k: format(e) for k, e in self.baseline[query].items()})] \
            if query in self.baseline else []
        for (cond, scale, q), r in self.rates.items():
            if q == query:
                rows.append(dict(condition=cond, scale=f"{scale:g}x", **{k: format(e) for k, e in r.items()}))
        return rows


def _share(values: list[Tensor]) -> Estimate:
    """Wilson interval for 0/1 outcomes; a bootstrap over prompts for outcomes averaged over control draws."""
    v = torch.cat(values).double()
    if bool(((v == 0) | (v == 1)).all()):
        return rate(v)
    return bootstrap(v)


@torch.no_grad()
def mean_intervention_protocol(
    model: "HookedVLM",
    deltas: Mapping[str, SlotPairs | Tensor],
    queries: Mapping[str, BindingQuery],
    *,
    conditions: Mapping[str, Sequence[str]] | Sequence[str] = tuple(CONDITIONS),
    scales: Sequence[float | int] = (1, 2, 4),
    n_random: int = 1,
    control_seed: int = 0,
    hook_names: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> MeanInterventionResult:
    """2505.22200's mean interventions. deltas: per slot kind ("object", "colour", "item", ...) either SlotPairs
    (the paired, per-token estimator is run) or a ready Delta [n_hooks, n_tok, d] / [n_hooks, d] (e.g. the pooled
    `binding.binding_deltas`). queries: e.g. {"slot 0": questions about the slot-0 object, "slot 1": ...}.
    conditions: names from CONDITIONS or {name: kinds}. For each condition and scale s: slot 0 += s * Delta and
    slot 1 -= s * Delta for each of its kinds at every hook, the query's context frozen; the control adds random
    vectors of the same norm as s * Delta (per hook and token; n_random draws from control_seed on). Rates: the
    share of prompts answering `swapped` / `kept`, per query and pooled over queries ("both")."""
    conds = {c: CONDITIONS[c] for c in conditions} if not isinstance(conditions, Mapping) else dict(conditions)
    needed = {k for kinds in conds.values() for k in kinds}
    missing = needed - set(deltas)
    if missing:
        raise ValueError(f"conditions {list(conds)} need Deltas for {sorted(missing)}; got {sorted(deltas)}")
    d = {k: paired_deltas(model, v, hook_names=hook_names, batch_size=batch_size) if isinstance(v, SlotPairs)
         else torch.as_tensor(v).float() for k, v in deltas.items() if k in needed}
    for q in queries.values():
        if set(needed) - set(q.slots):
            raise ValueError(f"a query lacks slot masks for {sorted(set(needed) - set(q.slots))}")

    names = list(hook_names or resid_names(model))
    caches = {id(q): run_cached(model, q.inputs, names)[1] for q in queries.values()} if batch_size is None else {}

    def outcomes(q: BindingQuery, edits: list) -> tuple[Tensor, Tensor]:
        mask = q.inputs.get("attention_mask")
        logits = add_deltas(model, q.inputs, edits, freeze=q.freeze, hook_names=names, batch_size=batch_size,
                            clean_cache=caches.get(id(q)))
        return Accuracy(q.swapped, mask)(logits).cpu(), Accuracy(q.kept, mask)(logits).cpu()

    baseline: dict[str, dict[str, Estimate]] = {}
    base_vals: dict[str, list[Tensor]] = {"swapped": [], "kept": []}
    for name, q in queries.items():
        sw, kp = outcomes(q, [])
        baseline[name] = {"swapped": rate(sw), "kept": rate(kp)}
        base_vals["swapped"].append(sw)
        base_vals["kept"].append(kp)
    if len(queries) > 1:
        baseline["both"] = {k: rate(torch.cat(v)) for k, v in base_vals.items()}
    rates: dict[tuple[str, float, str], dict[str, Estimate]] = {}
    for cond, kinds in conds.items():
        for s in scales:
            pooled: dict[str, list[Tensor]] = {k: [] for k in ("swapped", "kept", "random_swapped", "random_kept")}
            for name, q in queries.items():
                sw, kp = outcomes(q, [(*q.slots[k], s * d[k]) for k in kinds])
                rs, rk = [], []
                for r in range(n_random):
                    edits = [(*q.slots[k], random_deltas(s * d[k], control_seed + r + 1000 * i))
                             for i, k in enumerate(kinds)]
                    a, b = outcomes(q, edits)
                    rs.append(a)
                    rk.append(b)
                vals = {"swapped": sw, "kept": kp, "random_swapped": torch.stack(rs).mean(0),
                        "random_kept": torch.stack(rk).mean(0)}
                rates[cond, float(s), name] = {k: _share([v]) for k, v in vals.items()}
                for k, v in vals.items():
                    pooled[k].append(v)
            if len(queries) > 1:
                rates[cond, float(s), "both"] = {k: _share(v) for k, v in pooled.items()}
    norms = {k: v.norm(dim=-1).reshape(v.shape[0], -1).mean(-1).tolist() for k, v in d.items()}
    estimator = "paired" if all(isinstance(v, SlotPairs) for v in deltas.values()) else "given"
    return MeanInterventionResult(baseline, rates, norms, estimator)

