"""The narrow gate (Serra et al. 2024, arXiv 2412.06646): does image information reach the text through one token?

Two experiments from the paper, for any family (everything goes through ``blocks.{l}.attn.hook_pattern``, so
the knockout works wherever the decoder's attention has a pattern hook):

1. **Attention knockout** (`knockout_table`): zero the post-softmax attention weights from chosen query positions
   (default: the text tokens after the image) to chosen key positions, in all (or chosen) layers and heads,
   *without renormalising* the rows. Conditions of the paper: the end-of-image token, the last image token,
   10 random image tokens, all image tokens. Without renormalisation the knocked-out keys still enter through
   the softmax denominator, so even "all image tokens" leaves the answer weakly image-dependent;
   ``renormalize=True`` masks the scores instead and removes every route (not the paper's protocol). The paper
   reports that for LLaVA knocking out end-of-image barely matters (VQA 0.80) while all image tokens -> 0.00;
   for Chameleon end-of-image alone -> 0.25. Returns the toolkit's `SweepResult` over the conditions
   (`.table()`: {"baseline": ..., condition: ...}).
2. **Steering** (`steer_end_of_image`): overwrite the residual stream of the end-of-image token at every layer
   with its value from a run on another image (`steer_end_of_image(model, clean, corrupt, corrupt_answer)`:
   the clean run, steered by the corrupt = other-image run), and count how often the answer becomes the other image's answer
   (~90% for Chameleon, ~0% for LLaVA in the paper).

Position sets are boolean masks [batch, pos] from `TokenLayout`; "end of image" is the family's choice
(`TokenLayout.end_of_image`: LLaVA's last image token, Qwen2-VL's <|vision_end|>).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .toolkit import (Estimate, Metric, Site, SweepResult, as_positions, bootstrap, first_position, hook_template,
                      over_seeds, random_count, rate, resolve_layers, run_cached, run_sites, tile)

from hooked_vlm.components.attention import knock_out

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM
from .metrics import final_logits

KNOCKOUT_CONDITIONS: tuple[str, ...] = ("end_of_image", "last_image_token", "random_10", "all_image")


def text_after_image(layout: Any, image: int = -1) -> Tensor:
    """Bool [batch, pos]: the paper's default query set, `TokenLayout.text_after_image` (the real text tokens
    after the image; an end-of-image marker is the gate, not a query)."""
    return layout.text_after_image(image)


def key_positions(layout: Any, condition: Any, seed: int = 0, image: int = -1) -> Tensor:
    """Bool [batch, pos] key set for a knockout condition.

    condition: "end_of_image", "last_image_token", "random_{k}" (k random image tokens of any image, drawn with
    `seed`), "all_image" (every image token), "none" (empty set), a bool mask, or a callable layout -> mask.
    """
    if callable(condition) and not isinstance(condition, Tensor):
        condition = condition(layout)
    if not isinstance(condition, str):
        mask = as_positions(condition, layout.shape[1], layout.shape[0], what="knockout keys")
        return tile(mask, layout.shape[0], "knockout keys")
    if condition == "end_of_image":
        return layout.end_of_image(image)
    if condition == "last_image_token":
        return layout.last_image_token(image)
    if condition == "all_image":
        return layout.image_positions()
    if condition == "none":
        return torch.zeros(layout.shape, dtype=torch.bool)
    k = random_count(condition)  # "random_-3" and other malformed specs are errors, not a slice of the name
    if k is not None:
        return layout.random_image_tokens(k, seed=seed)
    raise ValueError(f"unknown knockout condition {condition!r}; expected one of {KNOCKOUT_CONDITIONS + ('none',)}, "
                     "random_<k>, a mask or a callable")


def knockout_hooks(
    model: "HookedVLM",
    queries: Tensor,
    keys: Tensor,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    hook: str = "pattern",
    renormalize: bool = False,
) -> list[tuple[str, Callable]]:
    """Forward hooks that set pattern[b, h, q, k] = 0 where queries[b, q] & keys[b, k] and h is a chosen head,
    at the chosen layers (default all). No renormalisation (the paper's knockout): the remaining weights keep
    their values, so the knocked-out keys still enter through the softmax denominator.

    queries, keys: bool [batch, pos] (or [pos] for every prompt). When the run's batch is n times the masks'
    batch (a `repeat_inputs` batch) the masks are tiled; a mask batch equal to the run's lets every copy have
    its own sets.
    hook: "pattern" (the decoder) or any ``{layer}`` template of a hook_pattern (e.g. a vision tower's).
    renormalize: the one meaning every attention edit gives it (also `attention_edits.reweight_hooks`): after
    the edit each edited query row is rescaled to sum to 1 over its keys. For a knockout that is exactly a
    softmax over the remaining keys, so it is computed by masking the scores (hook_attn_scores := dtype min):
    the knocked-out keys then have no influence at all on those rows. A query row must keep at least one key
    (causal rows always keep themselves unless their own position is in `keys`).
    """
    template = hook_template(hook)
    if not template.endswith("hook_pattern"):
        raise ValueError(f"knockout acts on hook_pattern, got {template!r}")
    if renormalize:
        template = template[: -len("hook_pattern")] + "hook_attn_scores"
    q, k = _as_mask(queries, "queries"), _as_mask(keys, "keys")
    layer_ids = resolve_layers(model, template, layers)
    head_list = None if heads is None else [int(h) for h in ([heads] if isinstance(heads, int) else heads)]

    def fn(pattern: Tensor, hook: Any = None) -> Tensor:
        b, n_heads, nq, nk = pattern.shape
        if q.shape[-1] != nq or k.shape[-1] != nk:
            raise ValueError(f"knockout masks of length {q.shape[-1]}/{k.shape[-1]} for a pattern of {nq} queries, {nk} keys")
        qq = q.repeat(b // q.shape[0], 1) if q.shape[0] != b else q
        kk = k.repeat(b // k.shape[0], 1) if k.shape[0] != b else k
        if qq.shape[0] != b or kk.shape[0] != b:
            raise ValueError(f"knockout masks for batch {q.shape[0]}/{k.shape[0]} do not fit a run of batch {b}")
        return knock_out(pattern, qq, kk, head_list, renormalize)

    return [(template.format(layer=layer), fn) for layer in layer_ids]


def _as_mask(positions: Any, what: str) -> Tensor:
    """A [batch, pos] / [pos] bool mask of any accepted form (its length is checked against the pattern later)."""
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        m = positions.cpu()
    else:
        t = torch.as_tensor(positions)
        m = as_positions(t, t.shape[-1], what=what)  # a 0/1 or bool mask: length-free here
    return m[None] if m.ndim == 1 else m


def run_with_knockout(
    model: "HookedVLM",
    inputs: dict[str, Any],
    keys: Any,
    queries: Tensor | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    seed: int = 0,
    renormalize: bool = False,
) -> Tensor:
    """Logits [batch, pos, vocab] with attention from `queries` (default `text_after_image`) to `keys` (a
    condition name or mask, see `key_positions`) knocked out (see `knockout_hooks` for `renormalize`)."""
    layout = model.layout(inputs)
    q = text_after_image(layout) if queries is None else queries
    k = key_positions(layout, keys, seed)
    with torch.no_grad(), model.hooks(fwd_hooks=knockout_hooks(model, q, k, layers, heads, renormalize=renormalize)):
        return model(**inputs)


def _knockout_edit(q: Tensor, k: Tensor, head_list: list[int] | None, renormalize: bool):
    """Sweep-engine edit of one copy's pattern (or scores) [batch, head, query, key]: queries q x keys k."""
    def fn(pattern: Tensor, first: int) -> Tensor:
        return knock_out(pattern, q[:, first:] if first else q, k, head_list, renormalize)

    return fn


@torch.no_grad()
def knockout_table(
    model: "HookedVLM",
    inputs: dict[str, Any],
    metric: Metric,
    conditions: Sequence[Any] | Mapping[str, Any] = KNOCKOUT_CONDITIONS,
    *,
    queries: Any = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    seed: int = 0,
    per_prompt: bool = False,
    batch_size: int = 8,
    renormalize: bool = False,
    progress: bool = True,
) -> SweepResult:
    """The paper's knockout table: metric under each key-set knockout (queries -> keys zeroed, no
    renormalisation). Runs on the sweep engine: every condition resumes from one saved run at the first
    knocked-out layer and the first query position.

    conditions: names (see `key_positions`) or {label: name | mask | callable}.
    queries:    a position set (bool [batch, pos], ...); default the text tokens after the image.
    batch_size: conditions evaluated per forward (through the batch dimension).
    renormalize: see `knockout_hooks` (the one meaning used by every attention edit).
    Returns the toolkit's SweepResult: `scores` [condition] (means over prompts) or [condition, batch]
    (`per_prompt`), dims ("condition",), `labels["condition"]` the labels in order, `clean` the unedited run
    (the baseline), direction "noise" (the clean run is edited: `effect()` = knockout - baseline) and `corrupt`
    NaN (an ablation has no counterfactual run). `.table()` gives {"baseline": ..., label: ...}.
    """
    layout = model.layout(inputs)
    b, n = layout.shape
    q = text_after_image(layout) if queries is None else as_positions(queries, n, b, what="queries")
    q = tile(q, b, "queries")
    items = dict(conditions) if isinstance(conditions, Mapping) else {str(c): c for c in conditions}
    if not items:
        raise ValueError("knockout_table: no conditions given")
    keys = {label: key_positions(layout, spec, seed) for label, spec in items.items()}
    template = hook_template("attn_scores" if renormalize else "pattern")
    layer_ids = resolve_layers(model, template, layers)
    head_list = None if heads is None else [int(h) for h in ([heads] if isinstance(heads, int) else heads)]
    start = (min(layer_ids), first_position(q))
    sites = [Site([(template.format(layer=l), _knockout_edit(q, keys[label], head_list, renormalize))
                   for l in layer_ids], start, label=label) for label in keys]
    values, base = run_sites(model, inputs, metric, sites, batch_size=batch_size, progress=progress, desc="knockout")
    scores = values  # [condition, batch]
    if not per_prompt:
        scores, base = scores.mean(-1), base.mean()
    return SweepResult(scores, base, torch.full_like(base, math.nan), "noise", ("condition",),
                       {"condition": list(keys), "renormalize": renormalize, "layers": layer_ids, "heads": head_list})


@dataclass
class SteeringResult:
    """Outcome of `steer_end_of_image`.

    fraction:         share of prompts (among those not already answering the corrupt image's answer) whose
                      answer became the corrupt image's answer: the paper's steering success.
    fraction_changed: share of prompts whose answer changed at all.
    predictions, base_predictions: argmax token ids [batch] with and without steering.
    flipped:          bool [batch], steered answer == corrupt answer and unsteered answer was not.
    """

    fraction: float
    fraction_changed: float
    predictions: Tensor
    base_predictions: Tensor
    flipped: Tensor


def _predict(logits: Tensor, attention_mask: Tensor | None, candidates: Tensor | None) -> Tensor:
    fl = final_logits(logits, attention_mask)
    if candidates is None:
        return fl.argmax(-1).cpu()
    c = candidates.to(fl.device)
    return c[fl[:, c].argmax(-1)].cpu()


@torch.no_grad()
def steer_end_of_image(
    model: "HookedVLM",
    clean: dict[str, Any],
    corrupt: dict[str, Any],
    corrupt_answer: Tensor | Sequence[int] | int,
    *,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    image: int = -1,
    candidates: Tensor | Sequence[int] | None = None,
    positions: Tensor | None = None,
) -> SteeringResult:
    """Run `clean` with the end-of-image token's residual stream at every layer (or `layers`) taken from the
    `corrupt` run (the same prompts with another image; prompt i is steered by corrupt prompt i: the "noise"
    direction) and count how many answers become the corrupt image's answer.

    hook:           "resid_pre" (default: every layer's attention then reads the corrupt state at that token) or
                    another [batch, pos, d_model] kind / template.
    corrupt_answer: token ids [batch] (or one id) of the answer the corrupt image should produce.
    candidates:     restrict the answer argmax to these token ids (e.g. the task's answer words).
    positions:      bool [batch, pos], one position per prompt, to patch instead of the end-of-image token, the same
                    position in both runs (e.g. a random text position: the control of the same intervention).
    The end-of-image positions are found separately in each run's layout, so the two runs may differ in length.
    """
    template = hook_template(hook)
    names = [template.format(layer=layer) for layer in resolve_layers(model, template, layers)]
    if positions is None:
        t_eoi = model.layout(clean).end_of_image(image).int().argmax(1)
        s_eoi = model.layout(corrupt).end_of_image(image).int().argmax(1)
    else:
        pos = torch.as_tensor(positions).bool().cpu()
        shapes = {tuple(model.layout(x).shape) for x in (clean, corrupt)}
        if len(shapes) != 1 or pos.shape != next(iter(shapes)) or not bool((pos.sum(1) == 1).all()):
            raise ValueError("positions: expected a bool [batch, pos] mask with one position per prompt, for clean "
                             f"and corrupt of the same shape; got a mask {tuple(pos.shape)} for runs {sorted(shapes)}")
        t_eoi = s_eoi = pos.int().argmax(1)
    if len(t_eoi) != len(s_eoi):
        raise ValueError(f"clean has {len(t_eoi)} prompts but corrupt {len(s_eoi)}")
    _, cache = run_cached(model, corrupt, names)
    rows = torch.arange(len(s_eoi))
    states = {name: cache[name][rows, s_eoi] for name in names}  # [batch, d_model]
    del cache

    def make(name: str) -> Callable:
        def fn(act: Tensor, hook: Any = None) -> Tensor:
            out = act.clone()
            out[rows.to(act.device), t_eoi.to(act.device)] = states[name].to(act.device, act.dtype)
            return out

        return fn

    mask = clean.get("attention_mask")
    cand = None if candidates is None else torch.as_tensor(candidates).long().flatten()
    base = _predict(model(**clean), mask, cand)
    with model.hooks(fwd_hooks=[(name, make(name)) for name in names]):
        steered = _predict(model(**clean), mask, cand)
    target = torch.as_tensor(corrupt_answer).long().flatten().cpu().expand(len(base))
    eligible = base != target
    flipped = eligible & (steered == target)
    fraction = float(flipped.sum() / eligible.sum()) if eligible.any() else math.nan
    return SteeringResult(fraction, float((steered != base).float().mean()), steered, base, flipped)


def plot_knockout_table(table: SweepResult | Mapping[str, Any], title: str | None = None, yaxis_title: str = "metric"):
    """Bar chart of a `knockout_table` result (or its `.table()`), baseline first; per-prompt results get
    standard-error bars."""
    from .plots import plot_effect_table

    table = table.table() if isinstance(table, SweepResult) else table
    return plot_effect_table(table, title=title or "attention knockout (text -> keys, no renormalisation)",
                             yaxis_title=yaxis_title)


# ------------------------------------------------------------------------ the paper's protocol, with intervals
def estimate_of(values: Tensor) -> "Estimate":
    """Per-prompt metric values -> an Estimate: a Wilson interval when they are all 0/1 (accuracy), else a
    bootstrap interval of the mean over prompts."""
    v = values.detach().float().cpu().flatten()
    if bool(((v == 0) | (v == 1)).all()):
        return rate(v)
    return bootstrap(v)


@dataclass
class KnockoutRow:
    """One condition of `knockout_protocol`: the metric's `estimate` over prompts (for the random condition, the
    mean over `seeds` draws with a t interval over the seeds, `per_seed` holding each draw's mean), the same
    knockout on the control prompts (`control`, or None), and whether the rows were renormalised."""

    condition: str
    renormalize: bool
    estimate: "Estimate"
    control: "Estimate | None" = None
    per_seed: list[float] | None = None
    n_keys: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"condition": self.condition, "renormalize": self.renormalize, **self.estimate.to_dict()}
        if self.control is not None:
            out["control"] = self.control.to_dict()
        if self.per_seed is not None:
            out["per_seed"] = self.per_seed
            out["sd_over_seeds"] = self.estimate.sd
        if self.n_keys is not None:
            out["n_keys"] = self.n_keys
        return out


def random_key_count(layout: Any, fraction: float) -> int:
    """The paper's random-token condition size: `fraction` of the image tokens (10 of ~576, about 2%, for LLaVA),
    at least 1, from the prompt with the fewest image tokens."""
    if not 0 < fraction < 1:
        raise ValueError(f"random_fraction: expected a fraction in (0, 1), e.g. 0.02, got {fraction}")
    n_img = int(layout.is_image.sum(1).min())
    if n_img == 0:
        raise ValueError("random image-token knockout: a prompt has no image tokens")
    return max(1, round(fraction * n_img))


@torch.no_grad()
def knockout_protocol(
    model: "HookedVLM",
    inputs: dict[str, Any],
    metric: Metric,
    *,
    control_inputs: dict[str, Any] | None = None,
    control_metric: Metric | None = None,
    random_fraction: float = 0.02,
    n_seeds: int = 5,
    renormalize: Sequence[bool] = (False, True),
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[KnockoutRow]:
    """Attention knockout as 2412.06646 runs it, every number with an interval:

    - conditions: baseline, the end-of-image position (never an image patch: see `TokenLayout.end_of_image`), the
      last image token, `random_fraction` of the image tokens (about 2%, at least 1) over `n_seeds` draws, all
      image tokens; text queries after the image -> those keys, in every layer and head;
    - without renormalisation (the paper's protocol) and with it (`renormalize`), side by side;
    - the same knockouts on `control_inputs` / `control_metric` (a query that should not need the image, e.g.
      the text-only colour -> item question), reported beside every condition.
    Accuracy-like metrics (0/1 per prompt) get Wilson intervals, others a bootstrap over prompts; the random
    condition the mean over seeds with a t interval over the seeds (and the sd)."""
    if n_seeds < 1:
        raise ValueError(f"n_seeds: expected at least 1 draw, got {n_seeds}")
    if (control_inputs is None) != (control_metric is None):
        raise ValueError("knockout_protocol: pass control_inputs and control_metric together (or neither)")

    def tables(run_inputs: dict[str, Any], run_metric: Metric, renorm: bool) -> tuple[dict[str, Tensor], int]:
        layout = model.layout(run_inputs)
        k = random_key_count(layout, random_fraction)
        conditions: dict[str, Any] = {"end_of_image": "end_of_image", "last_image_token": "last_image_token",
                                      **{f"random@{s}": layout.random_image_tokens(k, seed=s) for s in range(n_seeds)},
                                      "all_image": "all_image"}
        table = knockout_table(model, run_inputs, run_metric, conditions, layers=layers, per_prompt=True,
                               batch_size=batch_size, renormalize=renorm, progress=progress)
        return table.table(), k

    rows: list[KnockoutRow] = []
    for renorm in renormalize:
        main, k = tables(inputs, metric, bool(renorm))
        ctrl = tables(control_inputs, control_metric, bool(renorm))[0] if control_inputs is not None else None

        def seeds(table: dict[str, Tensor]) -> tuple["Estimate", list[float]]:
            means = [float(table[f"random@{s}"].float().mean()) for s in range(n_seeds)]
            return over_seeds(means), means

        for cond in ("baseline", "end_of_image", "last_image_token", "random", "all_image"):
            if renorm and cond == "baseline":
                continue  # the same run as without renormalisation
            if cond == "random":
                est, per = seeds(main)
                rows.append(KnockoutRow(f"random {random_fraction:.0%} of image tokens ({k})", bool(renorm), est,
                                        seeds(ctrl)[0] if ctrl is not None else None, per, k))
            else:
                rows.append(KnockoutRow(cond, bool(renorm), estimate_of(main[cond]),
                                        estimate_of(ctrl[cond]) if ctrl is not None else None))
    return rows


@dataclass
class SteeringSweepRow:
    """`steering_sweep` at one layer: the share of eligible prompts (unsteered answer != the corrupt image's) whose
    answer became the corrupt image's, with its Wilson interval, and the share that changed at all."""

    layer: int
    variant: str
    flipped: "Estimate"
    changed: "Estimate"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "variant": self.variant, **self.flipped.to_dict(), "changed": self.changed.to_dict()}


STEERING_VARIANTS = {"resid": ("resid_pre", "the residual stream at that one layer"),
                     "attn_input": ("blocks.{layer}.ln1.hook_normalized",
                                    "the attention input (ln1 output) of that layer and every later one")}


@torch.no_grad()
def steering_sweep(
    model: "HookedVLM",
    clean: dict[str, Any],
    corrupt: dict[str, Any],
    corrupt_answer: Tensor | Sequence[int] | int,
    *,
    layers: Sequence[int] | None = None,
    variant: str = "resid",
    candidates: Tensor | Sequence[int] | None = None,
) -> list[SteeringSweepRow]:
    """Steering through the end-of-image position one layer at a time, as 2412.06646 sweeps it (i = 0, 4, 8, ...
    on 32 layers; default here every layer): the end-of-image state of the `clean` run is taken from `corrupt` (the
    same prompts with another image) at layer i only (`variant="resid"`: blocks.{i}.hook_resid_pre), or in the attention input
    of layers >= i (`variant="attn_input"`, the paper's second variant: what every later layer's attention reads
    from that token)."""
    if variant not in STEERING_VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(STEERING_VARIANTS)}, got {variant!r}")
    hook = STEERING_VARIANTS[variant][0]
    n = model.cfg.n_layers
    layer_ids = list(range(n)) if layers is None else [int(l) + n if int(l) < 0 else int(l) for l in layers]
    if not layer_ids or any(not 0 <= l < n for l in layer_ids):
        raise ValueError(f"layers: expected indices in 0..{n - 1}, got {layers}")
    rows = []
    for layer in layer_ids:
        chosen = [layer] if variant == "resid" else list(range(layer, n))
        r = steer_end_of_image(model, clean, corrupt, corrupt_answer, hook=hook, layers=chosen, candidates=candidates)
        eligible = r.base_predictions != torch.as_tensor(corrupt_answer).long().flatten().expand(len(r.base_predictions))
        flipped = rate(r.flipped[eligible]) if eligible.any() else Estimate(math.nan, 0.0, 1.0, 0, method="wilson")
        rows.append(SteeringSweepRow(layer, variant, flipped, rate(r.predictions != r.base_predictions)))
    return rows
