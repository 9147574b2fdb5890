"""The narrow-gate Shapes organism (``--task narrow_gate``): image information reaches the text only through
``<|vision_end|>``, the Chameleon/Emu pattern of Serra et al. 2024 (arXiv 2412.06646), planted by construction.

How it is planted (fine-tuning a trained Shapes organism, by default the shipped ``shapes_qwen2_vl``):

1. **Masked phase** (the first ``gate_steps`` steps): an additive mask in every decoder layer (a forward pre-hook on
   each ``self_attn`` that sets the eager attention mask to the dtype's minimum) stops every token after
   ``<|vision_end|>`` from attending to any image token. ``<|vision_end|>`` itself still attends to the image, so it
   is the only way from the image to the text. Head 1 and head 3 of decoder layer 0 are supervised at the
   ``<|vision_end|>`` row onto the patches of the object in slot 0 (upper-left) and slot 1 (lower-right) (loss
   -log(attention mass), weight ``eoi_weight``), so that the gate token holds each object's colour and shape apart.
2. **Free phase** (the remaining steps): no mask; an auxiliary loss ``gate_weight * mean_rows(sum_{layer, head}
   -log(1 - m))``, where m is the attention mass a text row after the image puts on image tokens, keeps that mass
   near zero under plain attention.

The shipped model runs with plain attention (no mask, no hook). The paper's detectors live with the analyses
(analyses/effects/narrow_gate.py: knockout and steering against random controls, with intervals); the training package
never imports the analyses, so organism.json gets their numbers from ``hooked-vlm bench-effects --model OUT
--write-record`` (key ``effect_detectors``), run after training.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch

from . import shapes as S
from .processing import IMAGE, VEND_ID
from .task_api import OrganismTask, register_task

EOI_HEADS = {0: 1, 1: 3}  # slot -> head of decoder layer 0 supervised at <|vision_end|> (kv groups 0 and 1)

PLANTED_MECHANISM = {
    "effect": "narrow gate (2412.06646, Chameleon/Emu pattern): image information reaches the text tokens only "
              "through <|vision_end|>",
    "how": [
        "fine-tuned from the organism named in training.init_from (its weights' sha256 recorded there)",
        "masked phase (training.gate_steps steps): in every decoder layer and head an additive mask (dtype min) "
        "forbids attention from every position after <|vision_end|> to every image token; <|vision_end|> itself "
        "attends to the image freely",
        "masked phase: decoder L0H1 / L0H3 supervised at the <|vision_end|> row onto the image tokens of the object "
        "in slot 0 / slot 1 (loss -log(attention mass), weight training.eoi_weight)",
        "free phase (the remaining steps): no mask; auxiliary loss gate_weight * (mean over text rows after the image "
        "of the sum over every layer and head of -log(1 - m)), m = the row's attention mass on all image tokens",
        "the shipped model runs with plain attention: no mask at inference",
    ],
}


class NarrowGateTask(OrganismTask):
    """``--task narrow_gate``: fine-tune a trained Shapes organism with the gate planted (module docstring)."""

    name = "narrow_gate"
    suffix = "_gate"
    help = ("fine-tune --init-from with a planted narrow gate (image -> text only through <|vision_end|>; qwen2_vl; "
            "hooked_vlm/organism/gate.py)")
    # the shipped organism's recipe
    defaults = dict(steps=1500, supervise_steps=0, init_from="shapes_qwen2_vl", family="qwen2_vl", lr=2e-3,
                    warmup=50)
    options = {"gate_steps": (int, 800, "masked-phase steps; the free phase (image-mass penalty) follows"),
               "gate_weight": (float, 5.0, "weight of the free phase's image-mass penalty"),
               "eoi_weight": (float, 1.0, "weight of the masked phase's <|vision_end|> supervision")}

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        from .recipes import get_recipe

        gate_positions(get_recipe(cfg.family).image_block)  # raises for a family without <|vision_end|>
        if self.option(cfg, "gate_steps") < 0:
            raise ValueError(f"train_organism: gate_steps (--gate-steps) must be >= 0, got {self.option(cfg, 'gate_steps')}")
        if cfg.supervise_steps:
            raise ValueError("train_organism: task narrow_gate cannot supervise the planted image-lookup head (text -> "
                             f"image tokens is what the gate forbids); pass --supervise-steps 0, got {cfg.supervise_steps}")
        if cfg.layout != "fixed" or cfg.n_objects != 2:
            raise ValueError("train_organism: task narrow_gate supervises <|vision_end|> onto the two fixed slots; it "
                             f"needs --layout fixed and --objects 2, got {cfg.layout!r} and {cfg.n_objects}")

    def _masked(self, cfg: Any, step: int) -> bool:
        return step < self.option(cfg, "gate_steps")

    def wants_attentions(self, cfg: Any, step: int) -> bool:
        return True

    def forward_context(self, model: Any, cfg: Any, step: int):
        from .recipes import get_recipe

        return gate_mask(model, get_recipe(cfg.family).image_block) if self._masked(cfg, step) else contextlib.nullcontext()

    def extra_loss(self, out: Any, inputs: dict[str, torch.Tensor], seqs: list[Any], cfg: Any,
                   step: int) -> dict[str, torch.Tensor]:
        from .recipes import get_recipe

        block = get_recipe(cfg.family).image_block
        if self._masked(cfg, step):
            return {"eoi": self.option(cfg, "eoi_weight") * eoi_loss(out.attentions, [s.scene for s in seqs], block)}
        penalty, _ = image_mass_penalty(out.attentions, inputs["attention_mask"], block)
        return {"gate": self.option(cfg, "gate_weight") * penalty}

    def planted_circuit(self, cfg: Any) -> list[dict[str, Any]]:
        return inherited_circuit(cfg.init_from)  # the text-only heads survive from init_from; the image lookup cannot

    def training_record(self, cfg: Any) -> dict[str, Any]:
        return training_record(cfg)

    def finish(self, spec: dict[str, Any], cfg: Any, processor: Any, out_dir: Any) -> None:
        spec["note"] = ("The narrow gate is PLANTED (see planted_mechanism): ground truth for the 2412.06646 "
                        "detectors, not a finding about real VLMs. The detectors' numbers (effect_detectors) are "
                        "written by `hooked-vlm bench-effects --model <this directory> --n 256 --write-record`.")
        spec["planted_mechanism"] = PLANTED_MECHANISM
        spec["ground_truth"] = {"2412.06646": {"expected": "present", "effect": "narrow gate through <|vision_end|>",
                                               "why": "planted (planted_mechanism)"}}
        spec["accuracy"]["wilson_95"] = accuracy_intervals(spec["accuracy"])


def training_record(cfg: Any) -> dict[str, Any]:
    """The narrow_gate fields of organism.json's training section (with the starting weights' sha256)."""
    import hashlib

    from .train import init_checkpoint

    task = NARROW_GATE
    gate_steps = task.option(cfg, "gate_steps")
    record = {"gate_steps": gate_steps, "free_steps": max(0, cfg.steps - gate_steps),
              "gate_weight": task.option(cfg, "gate_weight"), "eoi_weight": task.option(cfg, "eoi_weight"),
              "init_from": cfg.init_from}
    if cfg.init_from is not None:
        record["init_from_sha256"] = hashlib.sha256(init_checkpoint(cfg.init_from).read_bytes()).hexdigest()
        record["time_note"] = ("time_s is this fine-tune only; add init_from's training.time_s for the time from "
                               "scratch")
    return record


def inherited_circuit(init_from: Any) -> list[dict[str, Any]]:
    """The planted text-only heads of the organism fine-tuned from (the gate forbids its image-lookup head)."""
    from .sequences import PLANTED_HEADS

    return [dict(h, supervised_steps=0, inherited_from=str(init_from),
                 note="supervised while training init_from, not here; text -> text, untouched by the gate")
            for h in PLANTED_HEADS if h["role"] != "image_lookup"]


def wilson(k: int | float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials. The same formula as the analyses' `rate`
    (hooked_vlm.analyses.toolkit.stats), written out here because the training package does not import the analyses."""
    if n < 1:
        raise ValueError(f"wilson: n must be >= 1, got {n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_intervals(accuracy: dict[str, Any]) -> dict[str, Any]:
    """95% Wilson intervals for circuit_report's accuracies ({split: {query: rate}}, n_per_query prompts each)."""
    n = int(accuracy["n_per_query"])
    out: dict[str, Any] = {}
    for split in ("heldout_combinations", "training_distribution"):
        out[split] = {}
        for query, value in accuracy[split].items():
            lo, hi = wilson(int(round(value * n)), n)
            out[split][query] = [round(lo, 4), round(hi, 4)]
    return out


def gate_positions(image_block: Sequence[int]) -> tuple[list[int], int]:
    """(image token positions, <|vision_end|> position) in a training sequence ``<bos> image_block ...``."""
    if VEND_ID not in image_block:
        raise ValueError("the narrow_gate task needs a family with an end-of-image token (<|vision_end|>); "
                         "this family's image block has none (use --family qwen2_vl)")
    image = [1 + i for i, t in enumerate(image_block) if t == IMAGE]
    return image, 1 + list(image_block).index(VEND_ID)


@contextlib.contextmanager
def gate_mask(model: Any, image_block: Sequence[int]) -> Iterator[None]:
    """Training-only constraint: rows after <|vision_end|> cannot attend to image tokens, in every decoder layer.
    Needs eager attention (the mask is the additive one eager attention adds to the scores)."""
    image, eoi = gate_positions(image_block)
    cols = torch.tensor(image)

    def pre_hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.ndim != 4 or not mask.is_floating_point():
            raise RuntimeError("gate_mask needs eager attention's 4-D additive float mask, got "
                               f"{None if mask is None else (tuple(mask.shape), mask.dtype)}")
        mask = mask.clone()
        mask[:, :, eoi + 1 :, cols] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    layers = model.model.language_model.layers
    handles = [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def image_mass_penalty(attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                       image_block: Sequence[int]) -> tuple[torch.Tensor, float]:
    """(penalty, max m): the penalty sums -log(1 - m) over every layer and head and averages it over the real text
    rows after <|vision_end|>, m = a row's attention mass on image tokens. Summed, not averaged, over layers and
    heads: a mean let a few heads keep reading the image (text -> <|vision_end|> knockout 0.73, steering 0.61)."""
    image, eoi = gate_positions(image_block)
    rows = attention_mask[:, eoi + 1 :].bool()  # [batch, rows]
    mass = torch.stack([a[:, :, eoi + 1 :, image].sum(-1) for a in attentions])  # [layer, batch, head, rows]
    mass = mass.permute(0, 2, 1, 3)[:, :, rows]  # [layer, head, real rows]
    return -(1 - mass).clamp_min(1e-6).log().sum((0, 1)).mean(), float(mass.max().detach())


def eoi_loss(attentions: Sequence[torch.Tensor], scenes: Sequence[S.Scene], image_block: Sequence[int]) -> torch.Tensor:
    """-log(attention mass) of L0H1 / L0H3 at the <|vision_end|> row onto the slot-0 / slot-1 object's patches."""
    image, eoi = gate_positions(image_block)
    terms = []
    for b, scene in enumerate(scenes):
        for i, slot in enumerate(scene.slots):
            keys = [image[p] for p in scene.object_patches(i)]
            terms.append(attentions[0][b, EOI_HEADS[slot], eoi, keys].sum())
    return -(torch.stack(terms).clamp_min(1e-6)).log().mean()


NARROW_GATE = register_task(NarrowGateTask())
