"""Attention-head causal mediation (Assouel et al., "Visual symbolic mechanisms", arXiv 2506.15871).

Score of one head h, patched from a counterfactual run c1* into the clean run c1 (answers a1 / a1*)::

    s(h) = (M(c1 <- h(c1*))[a1*] - M(c1 <- h(c1*))[a1]) - (M(c1)[a1*] - M(c1)[a1])

where M(.)[a] is the logit of answer a at the final token and `c1 <- h(c1*)` is the clean run with head h's
output (`blocks.{l}.attn.hook_z[:, pos, h]`) at a position set replaced by its value in the counterfactual run.
With `metric = LogitDiff(answer=a1*, wrong=a1)` this is `metric(patched) - metric(clean)`; any other metric
[batch] works the same way. The three presets differ only in the counterfactual and the position set:

- ID-retrieval heads: the counterfactual swaps the objects' positions; patch at the tokens describing the object.
- ID-selection heads: same counterfactual, patch at the final token.
- Feature-retrieval heads: the counterfactual changes the target feature (colour); patch at the final token.

Which a1* to use: swapping positions leaves the correct answer unchanged, so for the two ID presets a1* is the
answer the clean scene gives if the position IDs are exchanged, i.e. the other object's feature (for the
Shapes "scene" query, `Sample.wrong`: the described object's own colour). For feature retrieval a1* is the
counterfactual's answer. `analyses.tasks.shapes_described_positions` gives the described-object tokens of Shapes prompts.

Heads run on the sweep engine (`analyses.toolkit.sweep`): batched through the batch dimension and resumed from
one saved clean run at each head's layer and the first patched position. `transplant_sweep` is that for any
list of (hook name, head index or None) patches. Unlike `analyses.patching.patch_sweep` the source run may have
another length: positions are transplanted (source_positions -> positions), as the papers' protocol needs when
the counterfactual prompt describes another object.

Mathematical facts the tests check: patching with the clean run itself gives zero; swapping the two answers
flips the sign (s is linear in the logit difference); batched equals looped. Swapping the ROLES of c1 and c1*
(patching clean -> counterfactual) is not an exact symmetry of a non-linear model; where the read-out is
linear in the head output (last layer, final token, no MLP or final norm after it) it flips the sign for fixed
answer labels, so with the answers swapped along with the runs the score is unchanged (both measure the move
toward the other run's answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .toolkit import Estimate, Metric, act_name, metric_values, over_seeds, rank_stability, rate, run_cached, transplant_sweep
from .toolkit.stats import RankStability

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Inputs = dict[str, Any]
Head = tuple[int, int]


def final_positions(model: "HookedVLM", inputs: dict[str, Any]) -> Bool[Tensor, "batch pos"]:
    return model.layout(inputs).final_token()


# ------------------------------------------------------------------------------------- batched patching
def _all_heads(model: "HookedVLM", layers: Sequence[int] | None, heads: Sequence[int] | None) -> list[Head]:
    layers = range(model.cfg.n_layers) if layers is None else layers
    heads = range(model.cfg.n_heads) if heads is None else heads
    return [(l, h) for l in layers for h in heads]


# ------------------------------------------------------------------------------------------ head scores
@torch.no_grad()
def head_scores(
    model: "HookedVLM",
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    positions: Any,
    corrupt_positions: Any = None,
    heads: Sequence[Head] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = True,
) -> Float[Tensor, "layer head"] | Float[Tensor, "layer head batch"]:
    """Causal-mediation score of every head (NaN for heads not in `heads`): metric(clean with head h's hook_z
    at `positions` taken from the corrupt (counterfactual) run at `corrupt_positions`) - metric(clean).

    Use `metric = LogitDiff(answer=a1*, wrong=a1, attention_mask=clean["attention_mask"])` for the paper's score.
    Mean over prompts, or [layer, head, batch] with per_prompt=True.
    """
    heads = _all_heads(model, layers, None) if heads is None else [tuple(h) for h in heads]
    names = sorted({act_name("z", l) for l, _ in heads})
    _, cf_cache = run_cached(model, corrupt, names)
    patched = transplant_sweep(model, clean, cf_cache, [(act_name("z", l), h) for l, h in heads], metric,
                               positions=positions, source_positions=corrupt_positions, batch_size=batch_size,
                               progress=progress)
    base = metric_values(metric, model(**clean))
    b = base.shape[0]
    scores = torch.full((model.cfg.n_layers, model.cfg.n_heads, b), float("nan"))
    for (l, h), row in zip(heads, patched):
        scores[l, h] = row - base
    return scores if per_prompt else scores.mean(-1)


def id_retrieval_scores(model: "HookedVLM", clean: Inputs, corrupt: Inputs, metric: Metric, *, positions: Any,
                        corrupt_positions: Any = None, **kwargs: Any) -> Tensor:
    """ID-retrieval heads: the counterfactual swaps the objects' positions in the image; patch at the tokens that
    describe the object (e.g. `toolkit.word_positions(model, ids, shape_words)`)."""
    return head_scores(model, clean, corrupt, metric, positions=positions, corrupt_positions=corrupt_positions,
                       **kwargs)


def id_selection_scores(model: "HookedVLM", clean: Inputs, corrupt: Inputs, metric: Metric, **kwargs: Any) -> Tensor:
    """ID-selection heads: same counterfactual as ID retrieval (object positions swapped); patch at the final token."""
    return head_scores(model, clean, corrupt, metric, positions=final_positions(model, clean),
                       corrupt_positions=final_positions(model, corrupt), **kwargs)


def feature_retrieval_scores(model: "HookedVLM", clean: Inputs, corrupt: Inputs, metric: Metric,
                             **kwargs: Any) -> Tensor:
    """Feature-retrieval heads: the counterfactual changes the target feature (colour); patch at the final token."""
    return head_scores(model, clean, corrupt, metric, positions=final_positions(model, clean),
                       corrupt_positions=final_positions(model, corrupt), **kwargs)


def top_k_heads(scores: Float[Tensor, "layer head"], k: int, largest: bool = True) -> list[Head]:
    """The k (layer, head) pairs with the highest (or lowest) score, best first; NaN scores are skipped."""
    flat = scores.flatten().clone()
    valid = ~torch.isnan(flat)
    flat[~valid] = float("-inf") if largest else float("inf")
    k = min(k, int(valid.sum()))
    idx = flat.topk(k, largest=largest).indices
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in idx]


# ------------------------------------------------------------------------------------------ interventions
@torch.no_grad()
def mean_head_outputs(
    model: "HookedVLM", inputs: dict[str, Any], heads: Sequence[Head], positions: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "n_heads d_head"]:
    """Mean of each head's output (hook_z) over the positions in the mask, all prompts pooled."""
    _, cache = run_cached(model, inputs, sorted({act_name("z", l) for l, _ in heads}))
    out = []
    for l, h in heads:
        z = cache[act_name("z", l)][:, :, h]
        out.append(z[positions.to(z.device)].float().mean(0))
    return torch.stack(out)


@torch.no_grad()
def intervene_heads(
    model: "HookedVLM",
    inputs: dict[str, Any],
    heads: Sequence[Head],
    alpha: float | int,
    d_t: Float[Tensor, "n_heads d_head"],
    d_o: Float[Tensor, "n_heads d_head"],
    positions: Bool[Tensor, "batch pos"],
    metric: Metric | None = None,
) -> Tensor:
    """Run with alpha * (d_t - d_o)[i] added to head i's output (hook_z) at `positions`, for every chosen head.
    d_t / d_o: `mean_head_outputs` for the target / other condition. Returns logits, or metric(logits)."""
    heads = [tuple(h) for h in heads]
    if len(d_t) != len(heads) or len(d_o) != len(heads):
        raise ValueError(f"d_t / d_o need one row per head ({len(heads)}), got {len(d_t)} / {len(d_o)}")
    delta = alpha * (d_t - d_o)
    by_layer: dict[int, list[int]] = {}
    for i, (l, _) in enumerate(heads):
        by_layer.setdefault(l, []).append(i)

    def hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        m = positions.to(x.device)[..., None]
        for i in by_layer[int(hook.name.split(".")[1])]:
            h = heads[i][1]
            x[:, :, h] = x[:, :, h] + m * delta[i].to(x.device, x.dtype)
        return x

    with model.hooks(fwd_hooks=[(act_name("z", l), hook) for l in by_layer]):
        logits = model(**inputs)
    return logits if metric is None else metric(logits)


# ---------------------------------------------------------------------- the paper's intervention protocol
@dataclass
class InterventionResult:
    """`intervention_protocol`: the top-k heads chosen on the selection split (with how stable that choice is
    over bootstrap resamples of its prompts, `stability`), their layers (the paper's layer bands), and per alpha
    the efficacy on the held-out evaluation split (share of prompts switched to the target answer, Wilson
    interval) beside k random heads (`random`: mean over draws, t interval over the draws)."""

    heads: list[Head]
    layers: list[int]
    stability: RankStability
    efficacy: dict[float, Estimate]
    random: dict[float, Estimate]
    n_random: int

    def rows(self) -> list[dict[str, Any]]:
        return [{"alpha": a, "top_heads": self.efficacy[a].to_dict(), "random_heads": self.random[a].to_dict()}
                for a in self.efficacy]


def _switch_rate(model: "HookedVLM", inputs: Inputs, heads: Sequence[Head], alpha: float, d_t: Tensor, d_o: Tensor,
                 target: Tensor) -> Tensor:
    from .metrics import final_logits

    logits = intervene_heads(model, inputs, heads, alpha, d_t, d_o, final_positions(model, inputs))
    return (final_logits(logits, inputs.get("attention_mask")).argmax(-1).cpu() == target.cpu()).float()


@torch.no_grad()
def intervention_protocol(
    model: "HookedVLM",
    select: tuple[Inputs, Inputs, Metric],
    conditions: tuple[Inputs, Inputs],
    evaluate: tuple[Inputs, Tensor],
    *,
    k: int = 3,
    alphas: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    n_random: int = 20,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> InterventionResult:
    """The alpha * (d_t - d_o) intervention of 2506.15871, with heads chosen on one split and judged on another.

    select:     (clean, counterfactual, metric) pairs of the SELECTION split: the top-k heads by causal-mediation
                score at the final token (`feature_retrieval_scores`; metric = LogitDiff(cf answer, clean answer)).
    conditions: (other, target) prompts of the selection split that differ in the symbolic variable the heads are
                thought to carry (e.g. the answer is the first- vs the second-mentioned item): d_t / d_o = each
                head's mean output (hook_z) at the final token on the target / other prompts.
    evaluate:   (other prompts, target answers) of the EVALUATION split: alpha * (d_t - d_o) is added to the heads'
                outputs at the final token; efficacy = share of prompts now giving the target answer.
    Control: `n_random` draws of k random heads other than the chosen ones, each with its own d_t / d_o, at every
    alpha."""
    clean_s, cf_s, metric = select
    other_s, target_s = conditions
    other_e, answer = evaluate
    if not 1 <= k <= model.cfg.n_layers * model.cfg.n_heads:
        raise ValueError(f"k: expected 1..{model.cfg.n_layers * model.cfg.n_heads} heads, got {k}")
    if n_random < 1 or not alphas:
        raise ValueError(f"expected n_random >= 1 and at least one alpha, got {n_random} and {list(alphas)}")
    per_prompt = feature_retrieval_scores(model, clean_s, cf_s, metric, per_prompt=True, batch_size=batch_size,
                                          progress=progress)  # [layer, head, batch]
    flat = per_prompt.flatten(0, 1).T  # [batch, layer * head]
    n_h = model.cfg.n_heads
    stability = rank_stability(flat, k, labels=[f"L{i // n_h}H{i % n_h}" for i in range(flat.shape[1])], seed=seed)
    top = top_k_heads(per_prompt.mean(-1), k)
    answer = torch.as_tensor(answer).long().flatten().expand(other_e["input_ids"].shape[0])

    def efficacy_of(heads: Sequence[Head]) -> dict[float, Tensor]:
        d_t = mean_head_outputs(model, target_s, heads, final_positions(model, target_s))
        d_o = mean_head_outputs(model, other_s, heads, final_positions(model, other_s))
        return {float(a): _switch_rate(model, other_e, heads, float(a), d_t, d_o, answer) for a in alphas}

    chosen = efficacy_of(top)
    gen = torch.Generator().manual_seed(seed)
    draws: dict[float, list[float]] = {float(a): [] for a in alphas}
    # random heads come from the heads NOT chosen: a draw that hits a chosen head measures the chosen heads again
    pool = torch.tensor([i for i in range(model.cfg.n_layers * n_h) if (i // n_h, i % n_h) not in set(top)])
    if len(pool) < k:
        raise ValueError(f"k: the random control needs {k} heads outside the chosen {k}, the model has {len(pool)}")
    for _ in range(n_random):
        idx = pool[torch.randperm(len(pool), generator=gen)[:k]]
        for a, v in efficacy_of([(int(i) // n_h, int(i) % n_h) for i in idx]).items():
            draws[a].append(float(v.mean()))
    return InterventionResult(top, sorted({l for l, _ in top}), stability, {a: rate(v) for a, v in chosen.items()},
                              {a: over_seeds(v) for a, v in draws.items()}, n_random)


# -------------------------------------------------------------------------------------------------- plots
def plot_head_scores(scores: Float[Tensor, "layer head"], title: str = "Head causal-mediation scores") -> go.Figure:
    """Layer x head heatmap, diverging around zero."""
    s = scores.detach().float().cpu()
    lim = float(s.nan_to_num(0).abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=s.tolist(), x=[f"H{h}" for h in range(s.shape[1])], y=[f"L{l}" for l in range(s.shape[0])],
        colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, colorbar=dict(title="score"),
        hovertemplate="%{y}%{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed")
    return fig


def plot_intervention(values: dict[str, Any], title: str = "Head intervention", ylabel: str = "metric") -> go.Figure:
    """Bar chart of named results (e.g. {"clean": .., "alpha=1": .., "random": ..})."""
    fig = go.Figure(go.Bar(x=list(values), y=[float(v) for v in values.values()]))
    fig.update_layout(title=title, yaxis_title=ylabel)
    return fig
