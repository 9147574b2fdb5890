"""Does a method find a known circuit? Scores of interpretability methods against the organism's PLANTED heads.

The Shapes organism was trained with attention supervision on a few heads for its first steps (recorded in
organism.json), so those heads are known to matter. For each method we report the rank of every planted head
among all heads, precision and recall at k (k = number of planted heads), and the accuracy drop when the method's
top-k heads are zero-ablated versus k random heads. The metric helpers are plain functions, tested on hand-made
score matrices.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor
from .toolkit import act_name

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

Head = tuple[int, int]


def planted_heads(record: dict[str, Any]) -> list[Head]:
    return sorted({(int(h["layer"]), int(h["head"])) for h in record.get("planted_circuit", [])})


def head_ranks(scores: Tensor, heads: Sequence[Head]) -> dict[Head, int]:
    """1-based rank of each head when all heads are sorted by score, largest first (NaN ranks last)."""
    flat = torch.nan_to_num(scores.float(), nan=-float("inf")).flatten()
    order = flat.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    n_heads = scores.shape[1]
    return {h: int(rank[h[0] * n_heads + h[1]]) for h in heads}


def precision_recall_at_k(scores: Tensor, heads: Sequence[Head], k: int) -> tuple[float, float]:
    ranks = head_ranks(scores, heads)
    hits = sum(r <= k for r in ranks.values())
    return hits / k, hits / max(len(heads), 1)


def top_k(scores: Tensor, k: int) -> list[Head]:
    flat = torch.nan_to_num(scores.float(), nan=-float("inf")).flatten()
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in flat.argsort(descending=True, stable=True)[:k]]


def ablate_heads_accuracy(model: "HookedVLM", inputs: dict[str, Any], heads: Sequence[Head], accuracy: Callable[[Tensor], Tensor]) -> float:
    """Accuracy with the chosen heads' outputs (hook_z) set to zero at every position."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def zero(z: Tensor, hook: Any, idx: list[int]) -> Tensor:
        z = z.clone()
        z[:, :, idx] = 0
        return z

    hooks = [(act_name("z", l), lambda z, hook, idx=idx: zero(z, hook, idx)) for l, idx in by_layer.items()]
    with torch.no_grad():
        return float(accuracy(model.run_with_hooks(**inputs, fwd_hooks=hooks)).mean())


def swap_items_pairs(n: int, seed: int, query: str = "shape_item", layout: str = "fixed",
                     n_objects: int = 2) -> list[tuple[Any, Any]]:
    """Text counterfactual: the queried object's context sentence and its partner's trade their item letters (image
    unchanged), so the answer flips and only the context binding (the gather / retrieval route) differs."""
    from dataclasses import replace

    from hooked_vlm.organism import ShapesGenerator, make_sample

    gen = ShapesGenerator(seed, layout, n_objects)
    out = []
    for _ in range(n):
        clean = gen.sample(query, split="heldout")
        items, i, j = list(clean.scene.items), clean.target, clean.scene.partner(clean.target)
        items[i], items[j] = items[j], items[i]
        scene = replace(clean.scene, items=tuple(items))
        out.append((clean, make_sample(scene, query, clean.target)))
    return out


def circuit_methods(model: "HookedVLM", clean: Any, cf: Any) -> dict[str, Callable[[], Tensor]]:
    """The methods compared, each a thunk giving [layer, head] importance (larger = more important) for the
    (clean, counterfactual) Batches from hooked_vlm.analyses.tasks.encode."""
    from . import attribution, heads, patching
    from .metrics import LogitDiff

    flip = LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"])
    keep = clean.logit_diff()

    def zero_ablation() -> Tensor:
        base = float(clean.accuracy()(model(**clean.inputs)).mean())
        return torch.tensor([[base - ablate_heads_accuracy(model, clean.inputs, [(l, h)], clean.accuracy())
                              for h in range(model.cfg.n_heads)] for l in range(model.cfg.n_layers)])

    return {
        "head causal mediation (final token)": lambda: heads.feature_retrieval_scores(model, clean.inputs, cf.inputs, flip),
        "activation patching per head (all positions)": lambda: patching.patch_heads(
            model, clean.inputs, cf.inputs, keep, direction="noise", progress=False).effect().abs(),
        "attribution patching per head": lambda: attribution.attribution_patching(
            model, clean.inputs, cf.inputs, keep, hooks=("z",), direction="noise").scores["z"].abs(),
        "single-head zero ablation (accuracy drop)": zero_ablation,
    }


def bench_circuits(model: "HookedVLM", record: dict[str, Any], n: int = 64, seed: int = 0, n_random: int = 20) -> list[dict[str, Any]]:
    """Every method on two counterfactuals of the shape -> item query: an image one (shapes swapped) and a text
    one (items swapped in the context). One row per (counterfactual, method)."""
    from hooked_vlm.organism import ShapesGenerator

    from .tasks import encode

    planted = planted_heads(record)
    task = record.get("task", {})  # the scenes the organism was trained on
    layout, n_objects = task.get("layout", "fixed"), task.get("n_objects", 2)
    rows = []
    counterfactuals = {
        "image: swap shapes": ShapesGenerator(seed + 41, layout, n_objects).pairs(n, "swap_shapes", "shape_item",
                                                                                  split="heldout"),
        "text: swap items": swap_items_pairs(n, seed + 43, layout=layout, n_objects=n_objects),
    }
    for cf_name, pairs in counterfactuals.items():
        clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
        for row in evaluate_methods(model, circuit_methods(model, clean, cf), planted, clean.inputs, clean.accuracy(),
                                   n_random=n_random, seed=seed):
            rows.append(dict(counterfactual=cf_name, **row))
    return rows


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]) + "\n"


def evaluate_methods(
    model: "HookedVLM",
    methods: dict[str, Callable[[], Tensor]],
    planted: Sequence[Head],
    inputs: dict[str, Any],
    accuracy: Callable[[Tensor], Tensor],
    n_random: int = 20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run each method (a thunk returning [layer, head] scores, larger = more important) and score it against the
    planted heads. Returns one row per method."""
    k = len(planted)
    gen = torch.Generator().manual_seed(seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    random_acc = []
    for _ in range(n_random):
        pick = torch.randperm(n_layers * n_heads, generator=gen)[:k]
        random_acc.append(ablate_heads_accuracy(model, inputs, [(int(i) // n_heads, int(i) % n_heads) for i in pick], accuracy))
    rows = []
    for name, method in methods.items():
        start = time.perf_counter()
        scores = method()
        seconds = time.perf_counter() - start
        ranks = head_ranks(scores, planted)
        precision, recall = precision_recall_at_k(scores, planted, k)
        rows.append(dict(
            method=name,
            **{f"rank L{l}H{h}": r for (l, h), r in ranks.items()},
            precision_at_k=precision, recall_at_k=recall,
            acc_ablate_top_k=ablate_heads_accuracy(model, inputs, top_k(scores, k), accuracy),
            acc_ablate_random_k=sum(random_acc) / len(random_acc),
            seconds=seconds,
        ))
    return rows
