"""The Shapes task (the organism's synthetic scenes), in one module: samples -> model inputs, answer ids and
metrics, and the Shapes-specific position sets. Paper modules never import it; it sits beside the demo."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .binding import (CONDITIONS, BindingQuery, MeanInterventionResult, SlotPairs, binding_deltas, factorizability,
                      mean_intervention_protocol, pad_slot, position_swap)
from .metrics import Accuracy, LogitDiff
from .toolkit import word_positions

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


@dataclass
class Batch:
    """Model inputs for a list of samples plus the token ids of each sample's answer and its competitor."""

    inputs: dict[str, Any]
    answer: Tensor
    wrong: Tensor
    samples: Sequence[Any]

    def logit_diff(self) -> LogitDiff:
        return LogitDiff(self.answer, self.wrong, self.inputs.get("attention_mask"))

    def accuracy(self) -> Accuracy:
        return Accuracy(self.answer, self.inputs.get("attention_mask"))


def word_ids(processor: Any, words: Sequence[str]) -> Tensor:
    tok = getattr(processor, "tokenizer", processor)
    ids = tok.convert_tokens_to_ids(list(words))
    unknown = [w for w, i in zip(words, ids) if i is None or i == tok.unk_token_id]
    if unknown:
        raise ValueError(f"answer words not in the vocabulary as single tokens: {unknown[:5]}")
    return torch.tensor(ids)


def encode(processor: Any, samples: Sequence[Any]) -> Batch:
    """Samples (with .image, .prompt, .answer, .wrong) -> a Batch; prompts of one query type share a length."""
    inputs = dict(processor(images=[s.image for s in samples], text=[s.prompt for s in samples],
                            return_tensors="pt", padding=True))
    return Batch(inputs, word_ids(processor, [s.answer for s in samples]), word_ids(processor, [s.wrong for s in samples]),
                 samples)


@torch.no_grad()
def predictions(model: "HookedVLM", batch: Batch, chunk: int = 256) -> Tensor:
    """Argmax token id at the last real position of each prompt."""
    from .metrics import final_logits

    from hooked_vlm.batching import slice_prompts

    out = []
    n = batch.inputs["input_ids"].shape[0]
    images = (model.layout(batch.inputs).image_index.amax(1) + 1).tolist() if n > chunk else [0] * n
    for i in range(0, n, chunk):
        part = batch.inputs if n <= chunk else slice_prompts(batch.inputs, i, min(i + chunk, n), images)
        out.append(final_logits(model(**part), part.get("attention_mask")).argmax(-1))
    return torch.cat(out)


def shapes_described_positions(model: "HookedVLM", inputs: dict[str, Any], samples: Sequence[Any]) -> Bool[Tensor, "batch pos"]:
    """Tokens that describe the object a Shapes prompt asks about (ID-retrieval heads patch here): the colour and
    shape words of the described object for "scene" prompts, the shape word (both mentions) for shape queries,
    the question's colour word for colour_item (its last mention; the first is in the context)."""
    ids = inputs["input_ids"]
    rows = []
    for bi, s in enumerate(samples):
        sc, t = s.scene, s.target
        if s.query == "scene":
            words, occurrence = [sc.colours[1 - t], sc.shapes[1 - t]], None
        elif s.query in ("shape_item", "shape_colour"):
            words, occurrence = [sc.shapes[t]], None
        else:
            words, occurrence = [sc.colours[t]], -1
        rows.append(word_positions(model, ids[bi:bi + 1], [words], occurrence))
    return torch.cat(rows)


# ------------------------------------------------------------------------------ Shapes slots (binding IDs)
def slot_objects(scene: Any, order: str = "mention") -> tuple[int, int]:
    """Object index of slot 0 and slot 1: in mention order (the k-th object the context names) or in image
    order (slot k = the object in block k: upper-left 0, lower-right 1)."""
    if order == "mention":
        return tuple(scene.mention_order)
    if order == "position":
        return tuple(sorted(range(2), key=lambda i: scene.slots[i]))
    raise ValueError(f"order must be 'mention' or 'position', got {order!r}")


def shapes_slots(model: "HookedVLM", inputs: dict[str, Any], scenes: Sequence[Any], layout: Any = None,
                 image_size: tuple[int, int] | None = None, order: str = "mention",
                 padded: bool = False) -> dict[str, list[Tensor]]:
    """{"object": [slot0, slot1], "colour": [...], "item": [...]} masks for Shapes prompts (one scene, or
    Sample, per prompt); slot k = the k-th entity the context mentions (order="mention") or the object in
    image block k (order="position"): its image tokens (patch centres inside scene.boxes, via layout.in_box),
    its colour word and its item letter (first occurrences: in the context). padded: 2505.22200's factorizability
    slots, the item slot with the token before the letter ("item") and the colour slot with the token after the
    colour word ("object").
    image_size: (width, height) in pixels, default the organism's."""
    from hooked_vlm.organism.shapes import IMAGE_SIZE

    if layout is not None:
        layout.check_inputs(inputs["input_ids"])  # a layout of other prompts would select wrong tokens silently
    layout = layout or model.layout(inputs)
    scenes = [getattr(s, "scene", s) for s in scenes]
    w, h = image_size or (IMAGE_SIZE, IMAGE_SIZE)
    ids = inputs["input_ids"]
    out: dict[str, list[Tensor]] = {"object": [], "colour": [], "item": []}
    for k in range(2):
        objs = [slot_objects(sc, order)[k] for sc in scenes]
        out["object"].append(layout.in_box([[sc.boxes[i][0] / w, sc.boxes[i][1] / h, sc.boxes[i][2] / w,
                                             sc.boxes[i][3] / h] for sc, i in zip(scenes, objs)]))
        colour = word_positions(model, ids, [sc.colours[i] for sc, i in zip(scenes, objs)], 0)
        item = word_positions(model, ids, [sc.items[i] for sc, i in zip(scenes, objs)], 0)
        if padded:
            mask = inputs.get("attention_mask")
            colour, item = pad_slot(colour, after=1, attention_mask=mask), pad_slot(item, before=1, attention_mask=mask)
        out["colour"].append(colour)
        out["item"].append(item)
    return out


def shapes_context(model: "HookedVLM", inputs: dict[str, Any]) -> Bool[Tensor, "batch pos"]:
    """The image and the text context (every real position up to the context's second '.')."""
    end = word_positions(model, inputs["input_ids"], ".", occurrence=1).int().argmax(1)
    pos = torch.arange(inputs["input_ids"].shape[1])
    return (pos[None] <= end[:, None]) & inputs["attention_mask"].bool().cpu()


def disjoint_scene(scene: Any, rng: np.random.Generator) -> Any:
    """A second context c' for `scene`: other shapes, colours and items, same boxes and mention order, so that
    slot k of both sits at the same positions."""
    from hooked_vlm.organism import COLOURS, ITEMS, SHAPES

    def pick(pool: Sequence[str], used: Sequence[str]) -> tuple[str, str]:
        free = [x for x in pool if x not in used]
        a, b = rng.choice(len(free), size=2, replace=False)
        return free[int(a)], free[int(b)]

    return replace(scene, shapes=pick(SHAPES, scene.shapes), colours=pick(COLOURS, scene.colours),
                   items=pick(ITEMS, scene.items))


def _shape_query(scene: Any, context_scene: Any, obj: int) -> str:
    from hooked_vlm.organism.shapes import query_text

    return f"<image> {context_scene.context()} {query_text(scene, 'shape_item', obj)[0]}"


def _encode(model: "HookedVLM", images: list, texts: list[str]) -> dict[str, Any]:
    return dict(model.processor(images=images, text=texts, padding=True, return_tensors="pt"))


SWAPS = ("slot 0", "slot 1", "both slots")


@torch.no_grad()
def shapes_factorizability(
    model: "HookedVLM", n: int = 32, seed: int = 0, kinds: Sequence[str] = ("object", "colour", "item"),
    readout: str = "choice", frozen_context: bool = True, swaps: Sequence[str] = SWAPS, padded: bool = True,
    batch_size: int | None = None,
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Factorizability matrices on the Shapes organism (2505.22200): n scene pairs (c, c') with disjoint attributes,
    the same boxes and mention order; for each slot kind and swap ("slot 0", "slot 1", "both slots"), that slot of c
    replaced by the same slot of c' at all layers, the context frozen (`frozen_context`), the item and colour slots
    padded with the paper's extra token (`padded`). Rows: the four questions, about O0, O1, O'0, O'1 (asked in
    context c); columns: answers I0, I1, I'0, I'1. Keys "{kind} {swap}" (e.g. "item slot 1") and "none" (the
    unedited matrix)."""
    from hooked_vlm.organism import ShapesGenerator, render

    bad = set(swaps) - set(SWAPS)
    if bad:
        raise ValueError(f"swaps must be among {SWAPS}, got {sorted(bad)}")
    gen = ShapesGenerator(seed)
    rng = np.random.default_rng(seed + 1)
    cs = [gen.scene() for _ in range(n)]
    cps = [disjoint_scene(c, rng) for c in cs]
    images = [render(c) for c in cs]
    tok = model.tokenizer
    # queries: about the k-th mentioned object of c, then of c'
    queries = [_encode(model, images, [_shape_query(s, c, s.mention_order[k]) for s, c in zip(sc_list, cs)])
               for sc_list, k in [(cs, 0), (cs, 1), (cps, 0), (cps, 1)]]
    answers = torch.tensor([[tok.convert_tokens_to_ids(s.items[s.mention_order[k]]) for s in sc_list]
                            for sc_list, k in [(cs, 0), (cs, 1), (cps, 0), (cps, 1)]])
    corrupt = _encode(model, [render(c) for c in cps], [_shape_query(c, c, c.mention_order[0]) for c in cps])
    corrupt_slots = shapes_slots(model, corrupt, cps, padded=padded)
    out = {"none": factorizability(model, queries, answers, readout=readout, batch_size=batch_size)}
    query_slots = [shapes_slots(model, q, cs, padded=padded) for q in queries]
    freeze = [shapes_context(model, q) for q in queries] if frozen_context else None
    for kind in kinds:
        for swap in swaps:
            pick = {"slot 0": lambda m: m[0], "slot 1": lambda m: m[1], "both slots": lambda m: m[0] | m[1]}[swap]
            out[f"{kind} {swap}"] = factorizability(
                model, queries, answers, corrupt, slots=[pick(qs[kind]) for qs in query_slots],
                corrupt_slot=pick(corrupt_slots[kind]), freeze=freeze, readout=readout, batch_size=batch_size)
    labels = ["O0", "O1", "O'0", "O'1"], ["I0", "I1", "I'0", "I'1"]
    return out, *labels


def shapes_item_prompts(model: "HookedVLM", scenes: Sequence[Any], objs: Sequence[int]) -> dict[str, Any]:
    """Model inputs asking "Which item does the <shape> contain ?" about object objs[i] of scenes[i]."""
    from hooked_vlm.organism import render

    return _encode(model, [render(s) for s in scenes], [_shape_query(s, s, i) for s, i in zip(scenes, objs)])


def paired_scene(scene: Any, rng: np.random.Generator, order: str = "mention") -> Any:
    """The pair partner of `scene` for the paired Delta: its slot-0 entity X (shape, colour, item) at slot 1 of a new
    scene, beside a fresh entity (attributes other than X's) at slot 0. order="mention": X mentioned second, in
    its own box (its image tokens look the same); order="position": X moved to the other image block at the same
    offset inside the block (token j of the slot covers the same part of X), mention order kept."""
    from hooked_vlm.organism import COLOURS, ITEMS, SHAPES
    from hooked_vlm.organism.shapes import BLOCK

    x, y = slot_objects(scene, order)
    fresh = [str(rng.choice([v for v in pool if v != own[x]])) for pool, own in
             ((SHAPES, scene.shapes), (COLOURS, scene.colours), (ITEMS, scene.items))]
    attrs = [list(t) for t in (scene.shapes, scene.colours, scene.items)]
    for a, v in zip(attrs, fresh):
        a[y] = v
    if order == "mention":
        return replace(scene, shapes=tuple(attrs[0]), colours=tuple(attrs[1]), items=tuple(attrs[2]),
                       mention_order=(y, x))
    shift = [BLOCK if scene.slots[i] == 0 else -BLOCK for i in range(2)]  # each object to the other block
    boxes = tuple(tuple(v + shift[i] for v in scene.boxes[i]) for i in range(2))
    return replace(scene, shapes=tuple(attrs[0]), colours=tuple(attrs[1]), items=tuple(attrs[2]), boxes=boxes)


def shapes_binding_queries(model: "HookedVLM", scenes: Sequence[Any], order: str = "mention",
                           frozen_context: bool = True) -> dict[str, BindingQuery]:
    """Questions about the slot-0 and the slot-1 object of each scene ("Which item does the <shape> contain ?"),
    with every kind's slot masks, the kept answer (the queried object's item) and the swapped one (the other's)."""
    out = {}
    tok = model.tokenizer
    for k in (0, 1):
        inputs = shapes_item_prompts(model, scenes, [slot_objects(s, order)[k] for s in scenes])
        slots = shapes_slots(model, inputs, scenes, order=order)
        item = [torch.tensor([tok.convert_tokens_to_ids(s.items[slot_objects(s, order)[j]]) for s in scenes])
                for j in (0, 1)]
        out[f"slot {k}"] = BindingQuery(inputs, {kind: (m[0], m[1]) for kind, m in slots.items()}, item[k],
                                        item[1 - k], shapes_context(model, inputs) if frozen_context else None)
    return out


@torch.no_grad()
def shapes_mean_intervention(
    model: "HookedVLM", conditions: Sequence[str] = ("O", "C", "I", "O+I", "O+C"), n_fit: int = 64,
    n_eval: int = 64, seed: int = 0, order: str = "mention", frozen_context: bool = True,
    scales: Sequence[float | int] = (1, 2, 4), control_seed: int = 0, n_random: int = 1, estimator: str = "paired",
    batch_size: int | None = None,
) -> MeanInterventionResult:
    """Mean interventions on Shapes as 2505.22200 ran them (see `binding.mean_intervention_protocol`): per slot kind,
    Delta from n_fit paired scenes (`paired_scene`: the same entity at slot 0 of one and slot 1 of the other), per
    layer and token; on n_eval other scenes, questions about the slot-0 and the slot-1 object, slot 0 += s * Delta
    and slot 1 -= s * Delta at every layer's resid_pre for each condition's kinds, the image and context sentences
    frozen at their clean residuals; the same-norm random control at every scale. estimator="pooled" is the
    simplified option: one Delta per layer, mean(slot 1) - mean(slot 0) over the n_fit unpaired scenes."""
    from hooked_vlm.organism import ShapesGenerator

    gen = ShapesGenerator(seed)
    fit = [gen.scene() for _ in range(n_fit)]
    ev = [gen.scene() for _ in range(n_eval)]
    kinds = sorted({k for c in conditions for k in CONDITIONS[c]})
    fit_in = shapes_item_prompts(model, fit, [slot_objects(s, order)[0] for s in fit])
    fit_slots = shapes_slots(model, fit_in, fit, order=order)
    if estimator == "paired":
        rng = np.random.default_rng(seed + 7)
        partners = [paired_scene(s, rng, order) for s in fit]
        part_in = shapes_item_prompts(model, partners, [slot_objects(s, order)[1] for s in partners])
        part_slots = shapes_slots(model, part_in, partners, order=order)
        deltas: dict[str, Any] = {k: SlotPairs(fit_in, fit_slots[k][0], part_in, part_slots[k][1]) for k in kinds}
    elif estimator == "pooled":
        deltas = {k: binding_deltas(model, fit_in, fit_slots[k][0], fit_slots[k][1]) for k in kinds}
    else:
        raise ValueError(f"estimator must be 'paired' or 'pooled', got {estimator!r}")
    res = mean_intervention_protocol(model, deltas, shapes_binding_queries(model, ev, order, frozen_context),
                                     conditions=conditions, scales=scales, n_random=n_random,
                                     control_seed=control_seed, batch_size=batch_size)
    res.estimator = estimator
    return res


@torch.no_grad()
def shapes_position_swap(
    model: "HookedVLM", kind: str = "object", n: int = 32, seed: int = 0,
    fractions: Sequence[float | int] = (0.0, 0.25, 0.5, 0.75, 1.0), order: str = "mention", frozen_context: bool = True,
) -> dict[str, list[float]]:
    """Position independence on Shapes: the keys of slot 0 and slot 1 (`kind`) re-rotated toward each other's
    positions by each fraction, at every layer, the context frozen at its clean residuals (`frozen_context`, the
    paper's protocol: without the freeze, context tokens that read the moved keys carry the change too);
    questions about the slot-0 object. Returns the fraction of answers that stay I0 ("kept") and that become I1
    ("swapped"), per fraction."""
    from hooked_vlm.organism import ShapesGenerator

    gen = ShapesGenerator(seed)
    scenes = [gen.scene() for _ in range(n)]
    inputs = shapes_item_prompts(model, scenes, [slot_objects(s, order)[0] for s in scenes])
    slots = shapes_slots(model, inputs, scenes, order=order)[kind]
    tok = model.tokenizer
    ids = [torch.tensor([tok.convert_tokens_to_ids(s.items[slot_objects(s, order)[k]]) for s in scenes]) for k in (0, 1)]
    mask = inputs.get("attention_mask")
    runs = position_swap(model, inputs, slots[0], slots[1], fractions,
                         freeze=shapes_context(model, inputs) if frozen_context else None)
    return {"kept": [float(Accuracy(ids[0], mask)(r).mean()) for r in runs],
            "swapped": [float(Accuracy(ids[1], mask)(r).mean()) for r in runs]}


# ------------------------------------------------------------------------------------------ Shapes labels
def shapes_token_labels(model: "HookedVLM", inputs: dict[str, Any], scenes: Sequence[Any], attribute: str = "colour",
                        layout: Any = None) -> Int[Tensor, "batch pos"]:
    """Per image token of Shapes prompts: the covering object's colour / shape index (COLOURS / SHAPES order;
    len(...) = background), or for attribute="block" 0 background, 1 + the object's block (upper-left 0 /
    lower-right 1). Coverage = Scene.object_patches (row-major patch indices); -1 off the image."""
    from hooked_vlm.organism import COLOURS, SHAPES

    if layout is not None:
        layout.check_inputs(inputs["input_ids"])  # a layout of other prompts would select wrong tokens silently
    layout = layout or model.layout(inputs)
    scenes = [getattr(s, "scene", s) for s in scenes]
    out = torch.full(layout.shape, -1, dtype=torch.long)
    for bi, sc in enumerate(scenes):
        img = layout.image_positions(0)[bi]
        cols = int(layout.grids[bi][0][0][1])
        patch = layout.row[bi] * cols + layout.col[bi]
        bg = {"colour": len(COLOURS), "shape": len(SHAPES), "block": 0}[attribute]
        out[bi, img] = bg
        for i in range(2):
            val = {"colour": lambda: COLOURS.index(sc.colours[i]), "shape": lambda: SHAPES.index(sc.shapes[i]),
                   "block": lambda: 1 + sc.slots[i]}[attribute]()
            covered = torch.isin(patch, torch.tensor(sc.object_patches(i))) & img
            out[bi, covered] = val
    return out


# =========================================================================================================
# Spatial binding (2603.22278) on Shapes scenes. The organisms were never asked left/right questions: the
# position probes need no question; criss-cross and amplification use the image-only query "The {shape} is"
# -> colour (candidates: the scene's colours), so they measure whether the answer follows the moved tokens.
# =========================================================================================================
def shapes_spatial_prompts(model: "HookedVLM", n: int, seed: int = 0, layout: str = "random", query: str = "shape_colour",
                           split: str = "any", n_objects: int = 2,
                           ) -> tuple[Batch, list[Any], list[list[tuple[float, float, float, float]]]]:
    """(Batch, scenes, per prompt the objects' boxes as fractions of the image) for n Shapes prompts."""
    from hooked_vlm.organism import ShapesGenerator

    from .spatial_probes import pixel_boxes_to_fractions

    samples = ShapesGenerator(seed, layout, n_objects).samples(n, query, split=split)
    batch = encode(model.processor, samples)
    scenes = [s.scene for s in samples]
    return batch, scenes, [pixel_boxes_to_fractions(sc.boxes, s.image.size) for sc, s in zip(scenes, samples)]


def _colour_candidates(model: "HookedVLM", scenes: Sequence[Any]) -> Tensor:
    return torch.stack([word_ids(model.processor, list(sc.colours)) for sc in scenes])


@torch.no_grad()
def shapes_position_probes(model: "HookedVLM", n: int = 128, seed: int = 0, layout: str = "random",
                           hooks: Sequence[str] | None = None, kind: str = "order", n_objects: int = 2,
                           **train: Any) -> dict[str, Any]:
    """Order probes ("which is left", 2 classes; left / middle / right with n_objects=3) on Shapes scenes, at
    hook_embed (post-projection visual tokens) and every resid_post by default; `train` goes to train_probe."""
    from .spatial_probes import position_labels, position_probes

    batch, scenes, boxes = shapes_spatial_prompts(model, n, seed, layout, n_objects=n_objects)
    hooks = list(hooks or ["hook_embed"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)])
    labels = position_labels(model.layout(batch.inputs), boxes, kind)
    return position_probes(model, batch.inputs, labels, hooks, seed=seed, **train)


@torch.no_grad()
def shapes_criss_cross(model: "HookedVLM", n: int = 64, seed: int = 0, layout: str = "random", kind: str = "object",
                       golden: bool = True) -> Any:
    """Criss-cross on Shapes: clean scene vs the same scene with its colours reversed (text unchanged); the leftmost
    object's region <- the counterfactual's rightmost object's region and back. Query "The {shape} is": with two
    objects the tokens moved onto the asked shape's place carry the other shape, so 'flipped' = the answer follows
    the moved tokens (content), 'kept' = it stays with the place."""
    from hooked_vlm.organism import render

    from .criss_cross import criss_cross, criss_cross_pairs

    batch, scenes, boxes = shapes_spatial_prompts(model, n, seed, layout)
    cf_scenes = [replace(sc, colours=tuple(reversed(sc.colours))) for sc in scenes]
    cf_inputs = dict(model.processor(images=[render(sc) for sc in cf_scenes], text=[s.prompt for s in batch.samples],
                                     return_tensors="pt", padding=True))
    if scenes[0].n_objects != 2:
        raise ValueError(f"shapes_criss_cross: written for two-object scenes, got {scenes[0].n_objects} objects")
    a, b = 0, 1  # with two objects: the left one and the right one, in either order
    pairs, valid = criss_cross_pairs(model.layout(batch.inputs), model.layout(cf_inputs), boxes, a, b, kind)
    t = torch.tensor([s.target for s in batch.samples])
    # the counterfactual's answer: the colour its target object has, as an index into the clean colours
    cf_answer = torch.tensor([list(sc.colours).index(cf.colours[s.target])
                              for sc, cf, s in zip(scenes, cf_scenes, batch.samples)])
    return criss_cross(model, batch.inputs, cf_inputs, pairs, _colour_candidates(model, scenes), t, cf_answer,
                       valid=valid, golden=golden)


@torch.no_grad()
def shapes_amplification(model: "HookedVLM", n_probe: int = 128, n_eval: int = 128, seed: int = 0,
                         layout: str = "random", query: str = "shape_colour", split: str = "any",
                         alphas: Sequence[float | int] | None = None, control_seeds: Sequence[int] = (0, 1, 2, 3, 4),
                         columns: Tensor | None = None) -> Any:
    """Amplification on Shapes: the order probe (hook_embed, trained on n_probe scenes of `layout`; or `columns`) amplified at
    the layer-0 input of n_eval other prompts (`query`, `split`, same layout); fix rate on the organism's failures.
    The organisms answer their own layout's prompts almost perfectly (no failures to fix); a fixed-layout organism
    on random-layout scenes fails on about a quarter, failures caused by positions it never saw."""
    from .spatial_amplify import DEFAULT_ALPHAS, amplification_protocol

    if columns is None:  # the probe's columns, unless given (e.g. from a probe trained elsewhere)
        columns = shapes_position_probes(model, n_probe, seed, layout, ["hook_embed"])["hook_embed"].columns()
    batch, scenes, _ = shapes_spatial_prompts(model, n_eval, seed + 1, layout, query, split)
    t = torch.tensor([s.target for s in batch.samples])
    cands = _colour_candidates(model, scenes) if query == "shape_colour" else None
    answer = t if cands is not None else batch.answer
    return amplification_protocol(model, batch.inputs, columns, answer, cands,
                                  alphas=alphas or DEFAULT_ALPHAS, control_seeds=control_seeds)


@torch.no_grad()
def shapes_vision_ablation(model: "HookedVLM", n: int = 64, seed: int = 0, layout: str = "random") -> Any:
    """The full-grid vision-encoder ablation on Shapes "The {shape} is" prompts: each object's tokens from a
    reference image with that object alone at the centre, the background from an empty image."""
    from hooked_vlm.organism import render

    from .criss_cross import vision_ablation
    from .spatial_probes import object_masks, pixel_boxes_to_fractions

    batch, scenes, boxes = shapes_spatial_prompts(model, n, seed, layout)
    size = render(scenes[0]).size
    texts = [s.prompt for s in batch.samples]
    enc = lambda imgs: dict(model.processor(images=imgs, text=texts, return_tensors="pt", padding=True))  # noqa: E731
    empty = enc([render(replace(sc, shapes=(), colours=(), items=(), boxes=(), mention_order=())) for sc in scenes])
    refs, ref_regions = [], []
    for k in range(scenes[0].n_objects):
        centred = []
        for sc in scenes:
            x0, y0, x1, y1 = sc.boxes[k]
            w, h = x1 - x0, y1 - y0
            cx0, cy0 = (size[0] - w) // 2, (size[1] - h) // 2
            centred.append(replace(sc, shapes=(sc.shapes[k],), colours=(sc.colours[k],), items=(sc.items[k],),
                                   boxes=((cx0, cy0, cx0 + w, cy0 + h),), mention_order=(0,)))
        ref = enc([render(c) for c in centred])
        refs.append(ref)
        ref_regions.append(object_masks(model.layout(ref), [pixel_boxes_to_fractions(c.boxes, size) for c in centred])[0])
    regions = object_masks(model.layout(batch.inputs), boxes)
    t = torch.tensor([s.target for s in batch.samples])
    return vision_ablation(model, batch.inputs, regions, refs, ref_regions, empty, _colour_candidates(model, scenes), t)


@torch.no_grad()
def shapes_absolute_vs_relative(model: "HookedVLM", n: int = 128, seed: int = 0, layout: str = "random") -> Any:
    """The absolute-vs-relative control on randomly placed Shapes objects: order ("which is left") against the
    image half the object's centre lies in; pairs with both objects in one half disagree for one of them."""
    from .spatial_probes import absolute_vs_relative, position_labels

    batch, scenes, boxes = shapes_spatial_prompts(model, n, seed, layout)
    lay = model.layout(batch.inputs)
    n_cls = scenes[0].n_objects
    return absolute_vs_relative(model, batch.inputs, position_labels(lay, boxes, "order"),
                                position_labels(lay, boxes, "absolute", n_cls), seed=seed)
