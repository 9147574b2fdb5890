"""Measuring a Shapes organism: accuracy per query type, counterfactual flips, the planted heads' attention mass
and head ablations; `circuit_report` gathers what organism.json records about the trained model."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import shapes as S
from .processing import IMAGE
from .sequences import BINDING_QUERIES, PLANTED_HEADS, planted_targets


@torch.no_grad()
def evaluate(
    model,
    processor,
    n: int = 1024,
    seed: int = 1234,
    heldout: bool = True,
    queries: Sequence[str] = S.QUERIES,
    layout: str = "fixed",
    batch_size: int = 256,
    n_objects: int = 2,
) -> dict[str, float]:
    """Accuracy per query type: argmax over the whole vocabulary at the last prompt position must
    equal the answer token. ``heldout=True`` draws samples with at least one held-out triple;
    ``False`` draws fresh training-distribution samples. Goes through the processor, as a user would."""
    model.eval()
    result = {}
    for qi, query in enumerate(queries):
        gen = S.ShapesGenerator(seed + 7919 * qi, layout, n_objects)
        samples = gen.samples(n, query, split="heldout" if heldout else "train")
        result[query] = accuracy(model, processor, samples, batch_size)
    return result


@torch.no_grad()
def predict(model, processor, samples: Sequence[S.Sample], batch_size: int = 256) -> list[str]:
    """Argmax next word after each sample's prompt."""
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        inputs = processor(images=[s.image for s in chunk], text=[s.prompt for s in chunk],
                           return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1]
        out += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return out


def accuracy(model, processor, samples: Sequence[S.Sample], batch_size: int = 256) -> float:
    preds = predict(model, processor, samples, batch_size)
    return float(np.mean([p == s.answer for p, s in zip(preds, samples)]))

CIRCUIT_NOTES = [
    "L0H0, L1H0 and L2H0 were supervised (planted) only during the first supervised_steps steps; "
    "afterwards the answer loss alone shaped the model, and other heads may have learned parts of "
    "the job too.",
    "Single-head zero-ablation misses learned backups: read the group ablations in "
    "head_zero_ablation_heldout (and final_token_image_mass_shape_item) before calling a planted "
    "head unnecessary.",
]

@torch.no_grad()
def attention_mass(model, processor, samples: Sequence[S.Sample], family: str = "llava") -> dict[str, float]:
    """Mean attention mass each planted head puts on its targets (eager attention needed)."""
    model.eval()
    masses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for s in samples:
        inputs = processor(images=s.image, text=s.prompt, return_tensors="pt")
        attn = model(**inputs, output_attentions=True).attentions
        for layer, rows in planted_targets(s, family).items():
            for q, keys in rows:
                masses[layer].append(float(attn[layer][0, 0, q, keys].sum()))
    roles = {h["layer"]: h["role"] for h in PLANTED_HEADS}
    return {f"L{l}H0_{roles[l]}": round(float(np.mean(v)), 4) for l, v in masses.items() if v}


class _ZeroHeads:
    """Context manager: zero chosen decoder heads' outputs (the o_proj input slice)."""

    def __init__(self, model, heads: Sequence[tuple[int, int]]):
        self.model, self.heads, self.handles = model, list(heads), []

    def __enter__(self):
        cfg = self.model.config.text_config
        d_head = cfg.hidden_size // cfg.num_attention_heads
        layers = self.model.model.language_model.layers
        for l, h in self.heads:
            def pre_hook(module, args, h=h):
                x = args[0].clone()
                x[..., h * d_head : (h + 1) * d_head] = 0
                return (x,)
            self.handles.append(layers[l].self_attn.o_proj.register_forward_pre_hook(pre_hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def head_ablation(model, processor, samples: Sequence[S.Sample],
                  groups: Optional[dict[str, Sequence[tuple[int, int]]]] = None) -> dict[str, float]:
    """Accuracy with heads zeroed. Default: every decoder head alone, which shows what the
    unsupervised heads contribute next to the planted ones; ``groups`` names sets of heads
    (single-head ablation misses backups that only fail together)."""
    if groups is None:
        cfg = model.config.text_config
        groups = {f"L{l}H{h}": [(l, h)] for l in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)}
    result = {"none": round(accuracy(model, processor, samples), 4)}
    for name, heads in groups.items():
        with _ZeroHeads(model, heads):
            result[name] = round(accuracy(model, processor, samples), 4)
    return result


# Head groups worth recording next to single-head ablations (the trained model has a learned
# backup for the image lookup: L1H1 also reads the queried object's patches).
ABLATION_GROUPS: dict[str, list[tuple[int, int]]] = {
    "L1H0+L1H1": [(1, 0), (1, 1)],
    "L1H0+L1H1+L1H2": [(1, 0), (1, 1), (1, 2)],
    "L1_all": [(1, h) for h in range(4)],
    "L1H1+L1H2+L1H3 (all but planted)": [(1, 1), (1, 2), (1, 3)],
    "L0H1+L0H2+L0H3 (all but planted)": [(0, 1), (0, 2), (0, 3)],
    "planted L0H0+L1H0+L2H0": [(0, 0), (1, 0), (2, 0)],
}


@torch.no_grad()
def final_token_image_mass(model, processor, samples: Sequence[S.Sample]) -> list[list[float]]:
    """[layer][head] mean attention mass from the last prompt token onto all image tokens."""
    mass = np.zeros((model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads))
    for s in samples:
        inputs = processor(images=s.image, text=s.prompt, return_tensors="pt")
        ids = inputs["input_ids"][0]
        img = ids == IMAGE
        attn = model(**inputs, output_attentions=True).attentions
        for l, a in enumerate(attn):
            mass[l] += a[0, :, -1][:, img].sum(-1).numpy() / len(samples)
    return mass.round(3).tolist()


def circuit_report(model, processor, n: int = 1024, layout: str = "fixed", family: str = "llava",
                   n_objects: int = 2) -> dict:
    """Everything organism.json says about the trained model's behaviour and heads, measured on
    held-out-combination samples (fixed seeds, so re-running gives the same numbers)."""
    model.eval()
    report: dict = {
        "accuracy": {
            "heldout_combinations": evaluate(model, processor, n=n, seed=20_000, heldout=True, layout=layout,
                                             n_objects=n_objects),
            "training_distribution": evaluate(model, processor, n=n, seed=30_000, heldout=False, layout=layout,
                                              n_objects=n_objects),
            "n_per_query": n,
            "metric": "argmax over the full vocabulary at the last prompt position == answer",
        }
    }
    gen = S.ShapesGenerator(40_000, layout, n_objects)
    flips = {}
    for kind, query in (("swap_positions", "shape_item"), ("swap_shapes", "shape_item"),
                        ("swap_colours", "shape_item"), ("swap_shapes", "colour_item"),
                        ("change_colour", "shape_colour"), ("swap_positions", "scene"),
                        ("change_colour", "scene")):
        pairs = gen.pairs(min(256, n), kind, query, split="heldout")
        cf_pred = predict(model, processor, [cf for _, cf in pairs])
        flips[f"{kind}/{query}"] = {
            "expected_flip": S.EXPECTED_FLIP[(kind, query)],
            "cf_correct": round(float(np.mean([p == cf.answer for p, (_, cf) in zip(cf_pred, pairs)])), 4),
        }
    report["counterfactuals_heldout"] = flips
    mass_samples = [gen.sample(q, "heldout") for q in BINDING_QUERIES for _ in range(min(64, n))]
    report["planted_attention_mass"] = attention_mass(model, processor, mass_samples, family)
    report["final_token_image_mass_shape_item"] = final_token_image_mass(
        model, processor, S.ShapesGenerator(45_000, layout, n_objects).samples(min(64, n), "shape_item", "heldout"))
    ablations = {}
    for query in S.QUERIES:
        samples = S.ShapesGenerator(50_000, layout, n_objects).samples(min(512, n), query, "heldout")
        ablations[query] = {**head_ablation(model, processor, samples),
                            **head_ablation(model, processor, samples, ABLATION_GROUPS)}
    report["head_zero_ablation_heldout"] = ablations
    return report
