"""The symbolic-heads Shapes organism (``--task symbolic_heads``): the three-stage position-ID circuit of Assouel
et al. ("Visual symbolic mechanisms", arXiv 2506.15871) planted by construction for the scene-description query
"In this image there is a {colour} {shape} and a" -> the other object's colour.

Planted heads (decoder layer, head), one per stage in successive layers:

* ID retrieval ``L1H3``: at the described object's colour and shape words, attends to that object's image patches
  and writes its position ID (which image slot it sits in).
* ID selection ``L2H3``: at the final token, attends to the described-object words and writes the position ID of
  the OTHER object.
* Feature retrieval ``L3H3``: at the final token, attends to the image patches of the object at that position ID
  and writes its colour.

How it is planted (fine-tuning a trained Shapes organism, by default the shipped ``shapes_llava``):

1. Attention supervision, -log(attention mass on the target keys) (weight ``head_weight``), on every scene
   sequence of every step, for the three heads at the rows above.
2. Interchange-intervention training (Geiger et al.'s IIT): ``iit_rows`` extra scene sequences per stage and
   step whose planted head's output (the head's slice of the ``o_proj`` input) at its rows is replaced by its
   value on an INDEPENDENT source scene (other colours, shapes, items and slots), and whose label is what the
   three-stage mechanism predicts: ID retrieval -> the colour of the base object in the slot opposite the
   source's described object; ID selection -> the colour of the base object in the source's selected slot;
   feature retrieval -> the source's answer colour. Because the source's content is unrelated to the base scene,
   only a content-free position ID (resp. the retrieved colour) can carry the answer: the mechanism, not only the
   attention pattern, is planted.
3. An auxiliary slot loss: the image slot must be readable (binary cross-entropy) off L1H3's output at the
   described words and off L2H3's at the final token along a fixed direction (ones / sqrt(d_head)), weight
   ``slot_weight``. Without it the three heads' composition sat at chance on the interchange rows for 500+ steps
   (each head's gradient needs the others' output); with it the interchange rows reach 1.00 by step ~350.
4. The Shapes task's own sequences keep training alongside (answer cross-entropy, no other supervision), so the
   binding queries stay solved.

The shipped model runs with plain attention: no hook, no mask. `analyses/effects/symbolic_heads.py` is the
paper's detector (causal-mediation head scores, rank stability, the alpha * (d_t - d_o) intervention).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import shapes as S
from .processing import TOKEN_TO_ID
from .sequences import Sequence_, build_sequence
from .task_api import OrganismTask, register_task

PAPER = "2506.15871"
ID_RETRIEVAL, ID_SELECTION, FEATURE_RETRIEVAL = (1, 3), (2, 3), (3, 3)  # (decoder layer, head)
STAGES = {"id_retrieval": ID_RETRIEVAL, "id_selection": ID_SELECTION, "feature_retrieval": FEATURE_RETRIEVAL}
# word offsets after the image block in "In this image there is a {c} {s} and a"
COLOUR_AT, SHAPE_AT, FINAL_AT = 6, 7, 9

PLANTED_MECHANISM = {
    "effect": "visual symbolic mechanisms (2506.15871): the scene query 'In this image there is a {colour} {shape} "
              "and a' -> the other object's colour is answered by ID retrieval (L1H3), ID selection (L2H3) and "
              "feature retrieval (L3H3) heads passing a content-free position ID (the object's image slot)",
    "how": [
        "fine-tuned from the organism named in training.init_from (its weights' sha256 recorded there)",
        "attention supervision (loss -log(attention mass), weight training.head_weight, every step) on scene "
        "sequences: L1H3 at the described colour and shape words -> the described object's image patches; L2H3 at "
        "the final token -> the described colour and shape words; L3H3 at the final token -> the image patches of "
        "the object whose colour is the label",
        "interchange-intervention training (training.iit_rows extra scene sequences per stage and step): the head's "
        "output (its slice of o_proj's input) at its rows is taken from an independent source scene; label = "
        "ID retrieval: the base colour in the slot opposite the source's described object; ID selection: the base "
        "colour in the source's selected (answer) slot; feature retrieval: the source's answer colour",
        "auxiliary slot loss (weight training.slot_weight, every step): the image slot must be readable off L1H3's "
        "output at the described words (the described object's slot) and L2H3's at the final token (the slot to "
        "read) along a fixed direction (auxiliary_slot_loss)",
        "the Shapes task's sequences keep training alongside (answer cross-entropy only)",
        "the shipped model runs with plain attention: no hook, no mask at inference",
    ],
    "heads": [
        {"layer": 1, "head": 3, "role": "id_retrieval", "query_positions": "the described object's colour and shape "
         "words of the scene query", "key_positions": "the described object's image patches",
         "writes": "the described object's image slot (position ID)"},
        {"layer": 2, "head": 3, "role": "id_selection", "query_positions": "the final token of the scene query",
         "key_positions": "the described object's colour and shape words", "writes": "the other object's image slot"},
        {"layer": 3, "head": 3, "role": "feature_retrieval", "query_positions": "the final token of the scene query",
         "key_positions": "the image patches of the object in that slot (the answer object)", "writes": "its colour"},
    ],
    "auxiliary_slot_loss": "weight training.slot_weight, every step: binary cross-entropy of the image slot read off "
                           "the ID head's output (its o_proj input slice, 16 dims) along the fixed direction "
                           "ones/sqrt(16): L1H3 at the described words -> the described object's slot, L2H3 at the "
                           "final token -> the slot of the object to read; on every scene row whose head is not "
                           "interchanged (without it the three-head composition sat at chance for 500+ steps)",
}


def scene_positions(image_block: Sequence[int]) -> dict[str, int]:
    """Positions of the described colour / shape words and the final token in a scene sequence
    ``<bos> image_block In this image there is a {c} {s} and a``."""
    base = 1 + len(image_block)
    return {"colour": base + COLOUR_AT, "shape": base + SHAPE_AT, "final": base + FINAL_AT}


def slot_object(scene: S.Scene, slot: int) -> int:
    """The object in image slot ``slot`` (fixed layout: exactly one object per slot)."""
    return scene.slots.index(slot)


def iit_label(stage: str, base: S.Scene, base_target: int, source: S.Scene, source_target: int) -> int:
    """The object of ``base`` whose colour the planted mechanism answers when ``stage``'s head output comes from
    ``source`` (for feature retrieval: -1, the answer is the source's own answer colour)."""
    if stage == "id_retrieval":
        described = source.partner(source_target)
        return slot_object(base, 1 - source.slots[described])
    if stage == "id_selection":
        return slot_object(base, source.slots[source_target])
    if stage == "feature_retrieval":
        return -1
    raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")


def scene_supervision(scene: S.Scene, target: int, read: int, image_block: Sequence[int],
                      first_image: int) -> dict[tuple[int, int], list[tuple[int, list[int]]]]:
    """The planted heads' attention targets on a scene sequence asking for object ``target``'s colour, whose
    feature-retrieval head should read object ``read`` (= ``target`` unless an IIT label says otherwise)."""
    pos = scene_positions(image_block)
    described = scene.partner(target)
    words = [pos["colour"], pos["shape"]]
    patches = lambda i: [first_image + p for p in scene.object_patches(i)]  # noqa: E731
    return {ID_RETRIEVAL: [(w, patches(described)) for w in words],
            ID_SELECTION: [(pos["final"], words)],
            FEATURE_RETRIEVAL: [(pos["final"], patches(read))]}


def _collate(seqs: Sequence[Sequence_], images: Sequence[Any], family: str) -> dict[str, torch.Tensor]:
    from .train import collate

    return collate(seqs, images, family)


def _scene_sequence(scene: S.Scene, target: int, read: int, label: str, query: str, family: str) -> Sequence_:
    """A scene-description sequence (no answer token) labelled with the colour ``label``, carrying the planted
    heads' attention targets in ``.planted``."""
    from .recipes import get_recipe

    recipe = get_recipe(family)
    seq = build_sequence(scene, [("scene", target)], with_answers=False, family=family)
    seq.answers = [(seq.answers[0][0], TOKEN_TO_ID[label], query)]
    seq.planted = scene_supervision(scene, target, read, recipe.image_block, recipe.first_image_pos)
    return seq


def slot_targets(scene: S.Scene, target: int, read: int, patched: str | None = None) -> dict[tuple[int, int], int]:
    """The position IDs the ID heads should write on a scene sequence (the auxiliary slot loss): ID retrieval the
    described object's image slot, ID selection the slot of the object the feature-retrieval head should read;
    none for the head whose output an interchange replaces."""
    out = {ID_RETRIEVAL: scene.slots[scene.partner(target)], ID_SELECTION: scene.slots[read]}
    return {k: v for k, v in out.items() if patched is None or k != STAGES[patched]}


def symbolic_batch(rng: np.random.Generator, cfg: Any, iit_rows: int) -> tuple[dict[str, torch.Tensor], list[Sequence_],
                                                                             dict[str, torch.Tensor], list[tuple[int, str, int]]]:
    """(inputs, sequences, source inputs, plan): ``cfg.batch_size`` Shapes training sequences (drawn as the Shapes
    task draws them; scene sequences carry the planted heads' targets), then ``iit_rows`` interchange rows per
    stage. plan = [(row, stage, source row)]: that row's stage head output comes from that source row."""
    from .recipes import get_recipe
    from .sequences import BINDING_QUERIES

    recipe = get_recipe(cfg.family)
    seqs, images = [], []
    for _ in range(cfg.batch_size):
        scene = S.sample_scene(rng, cfg.layout, "train", cfg.n_objects)
        if rng.random() < cfg.scene_fraction:
            target = int(rng.integers(cfg.n_objects))
            seq = build_sequence(scene, [("scene", target)], family=cfg.family)
            seq.planted = scene_supervision(scene, target, target, recipe.image_block, recipe.first_image_pos)
            seq.slots = slot_targets(scene, target, target)
        else:
            qs = rng.integers(len(BINDING_QUERIES), size=cfg.blocks_per_sequence)
            ts = rng.integers(cfg.n_objects, size=cfg.blocks_per_sequence)
            seq = build_sequence(scene, [(BINDING_QUERIES[q], int(t)) for q, t in zip(qs, ts)], family=cfg.family)
        seqs.append(seq)
        images.append(S.render(scene))
    sources, source_images, plan = [], [], []
    for stage in STAGES:
        for _ in range(iit_rows):
            base, source = (S.sample_scene(rng, cfg.layout, "train", cfg.n_objects) for _ in range(2))
            bt, st = (int(t) for t in rng.integers(cfg.n_objects, size=2))
            read = iit_label(stage, base, bt, source, st)
            label = source.colours[st] if read < 0 else base.colours[read]
            plan.append((len(seqs), stage, len(sources)))
            seqs.append(_scene_sequence(base, bt, bt if read < 0 else read, label, f"iit_{stage}", cfg.family))
            seqs[-1].slots = slot_targets(base, bt, bt if read < 0 else read, patched=stage)
            images.append(S.render(base))
            sources.append(build_sequence(source, [("scene", st)], with_answers=False, family=cfg.family))
            source_images.append(S.render(source))
    src = _collate(sources, source_images, cfg.family) if sources else {}
    return _collate(seqs, images, cfg.family), seqs, src, plan


def _o_proj(model: Any, layer: int) -> torch.nn.Module:
    return model.model.language_model.layers[layer].self_attn.o_proj


def _head_slice(model: Any, head: int) -> slice:
    text = model.config.text_config
    d = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return slice(head * d, (head + 1) * d)


@contextlib.contextmanager
def interchange(model: Any, source: dict[str, torch.Tensor], plan: Sequence[tuple[int, str, int]],
                image_block: Sequence[int]) -> Iterator[None]:
    """Run ``source`` (no grad), then, inside the block, replace each planned row's stage head output (its slice of
    o_proj's input) at the stage's rows by the source row's: ID retrieval at the described colour and shape words,
    ID selection and feature retrieval at the final token. Scene sequences share their positions, so a source
    position is the base position."""
    pos = scene_positions(image_block)
    rows = {"id_retrieval": [pos["colour"], pos["shape"]], "id_selection": [pos["final"]],
            "feature_retrieval": [pos["final"]]}
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        if plan:
            for stage, (layer, _) in STAGES.items():
                def grab(module, args, layer=layer):
                    captured[layer] = args[0].detach()
                handles.append(_o_proj(model, layer).register_forward_pre_hook(grab))
            with torch.no_grad():
                model(**source, use_cache=False)
            for h in handles:
                h.remove()
            handles = []
            for stage, (layer, head) in STAGES.items():
                picks = [(b, p, s) for b, st, s in plan if st == stage for p in rows[stage]]
                if not picks:
                    continue
                b_idx, p_idx, s_idx = (torch.tensor(v) for v in zip(*picks))
                cols = _head_slice(model, head)

                def patch(module, args, layer=layer, b_idx=b_idx, p_idx=p_idx, s_idx=s_idx, cols=cols):
                    x = args[0].clone()
                    x[b_idx, p_idx, cols] = captured[layer][s_idx, p_idx, cols].to(x.dtype)
                    return (x,) + tuple(args[1:])
                handles.append(_o_proj(model, layer).register_forward_pre_hook(patch))
        yield
    finally:
        for h in handles:
            h.remove()


class SymbolicHeadsTask(OrganismTask):
    """``--task symbolic_heads``: fine-tune a trained Shapes organism with the three-stage position-ID circuit of
    2506.15871 planted for the scene query (module docstring)."""

    name = "symbolic_heads"
    suffix = "_symbolic"
    help = ("fine-tune --init-from with planted ID-retrieval / ID-selection / feature-retrieval heads (2506.15871) for "
            "the scene query (hooked_vlm/organism/symbolic.py)")
    defaults = dict(steps=1500, supervise_steps=0, init_from="shapes_llava", family="llava", lr=2e-3, warmup=50)
    options = {"iit_rows": (int, 8, "interchange-intervention rows per planted stage and step"),
               "head_weight": (float, 1.0, "weight of the planted heads' attention supervision"),
               "slot_weight": (float, 1.0, "weight of the ID heads' auxiliary slot loss (a fixed readout of the "
                                           "head's output must give the image slot)")}

    def __init__(self) -> None:
        self._pending: Any = None  # (source inputs, plan) of the batch make_batch drew last
        self._z: dict[int, torch.Tensor] = {}  # o_proj inputs of the ID heads' layers in the training forward

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if cfg.layout != "fixed" or cfg.n_objects != 2:
            raise ValueError("train_organism: task symbolic_heads plants image-slot position IDs; it needs --layout "
                             f"fixed and --objects 2, got {cfg.layout!r} and {cfg.n_objects}")
        if self.option(cfg, "iit_rows") < 0:
            raise ValueError(f"train_organism: iit_rows (--iit-rows) must be >= 0, got {self.option(cfg, 'iit_rows')}")

    def make_batch(self, rng: np.random.Generator, cfg: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
        inputs, seqs, src, plan = symbolic_batch(rng, cfg, self.option(cfg, "iit_rows"))
        self._pending = (src, plan)
        return inputs, seqs

    def wants_attentions(self, cfg: Any, step: int) -> bool:
        return True

    def forward_context(self, model: Any, cfg: Any, step: int):
        from .recipes import get_recipe

        if self._pending is None:
            raise RuntimeError("symbolic_heads: forward_context needs the batch of make_batch (call it first)")
        src, plan = self._pending
        self._pending = None
        return self._context(model, src, plan, get_recipe(cfg.family).image_block)

    @contextlib.contextmanager
    def _context(self, model: Any, src: dict[str, torch.Tensor], plan: Any, block: Sequence[int]) -> Iterator[None]:
        """The interchange, plus grab hooks (registered first, so they see the unpatched head outputs) keeping the
        ID heads' layers' o_proj inputs of the training forward for the slot loss."""
        self._z = {}
        handles = []
        try:
            for layer, _ in (ID_RETRIEVAL, ID_SELECTION):
                def grab(module, args, layer=layer):
                    self._z[layer] = args[0]
                handles.append(_o_proj(model, layer).register_forward_pre_hook(grab))
            self._slice = {h: _head_slice(model, h) for _, h in (ID_RETRIEVAL, ID_SELECTION)}
            with interchange(model, src, plan, block):
                yield
        finally:
            for h in handles:
                h.remove()

    def extra_loss(self, out: Any, inputs: dict[str, torch.Tensor], seqs: list[Any], cfg: Any,
                   step: int) -> dict[str, torch.Tensor]:
        from .train import attention_loss

        terms = []
        for layer, head in STAGES.values():
            targets = [(b, q, keys) for b, s in enumerate(seqs) for q, keys in getattr(s, "planted", {}).get((layer, head), [])]
            if targets:
                terms.append(attention_loss(out.attentions[layer][:, head], targets))
        out = {"heads": self.option(cfg, "head_weight") * sum(terms)} if terms else {}
        slot = self.slot_loss(seqs, cfg)
        if slot is not None:
            out["slot"] = self.option(cfg, "slot_weight") * slot
        self._z = {}
        return out

    def slot_loss(self, seqs: list[Any], cfg: Any) -> torch.Tensor | None:
        """Binary cross-entropy of the image slot read off each ID head's output (its o_proj input slice) along a
        fixed direction (all ones / sqrt(d_head)): ID retrieval at the described words, ID selection at the final
        token, on every scene row whose head is not interchanged."""
        from .recipes import get_recipe

        if not self._z:
            return None
        pos = scene_positions(get_recipe(cfg.family).image_block)
        rows = {ID_RETRIEVAL: [pos["colour"], pos["shape"]], ID_SELECTION: [pos["final"]]}
        logits, labels = [], []
        for head in (ID_RETRIEVAL, ID_SELECTION):
            z = self._z[head[0]][..., self._slice[head[1]]]
            for b, s in enumerate(seqs):
                if head in getattr(s, "slots", {}):
                    for p in rows[head]:
                        logits.append(z[b, p].sum() / z.shape[-1] ** 0.5)
                        labels.append(float(s.slots[head]))
        if not logits:
            return None
        return torch.nn.functional.binary_cross_entropy_with_logits(torch.stack(logits), torch.tensor(labels))

    def planted_circuit(self, cfg: Any) -> list[dict[str, Any]]:
        """The binding-query heads inherited from init_from (what bench-circuits checks on shape / colour queries);
        the symbolic heads planted here are in planted_mechanism["heads"] (scene query only)."""
        from .sequences import PLANTED_HEADS

        return [dict(h, supervised_steps=0, inherited_from=str(cfg.init_from),
                     note="supervised while training init_from, not here (binding queries)") for h in PLANTED_HEADS]

    def training_record(self, cfg: Any) -> dict[str, Any]:
        import hashlib

        from .train import init_checkpoint

        record = {name: self.option(cfg, name) for name in self.options}
        record["init_from"] = cfg.init_from
        if cfg.init_from is not None:
            record["init_from_sha256"] = hashlib.sha256(init_checkpoint(cfg.init_from).read_bytes()).hexdigest()
            record["time_note"] = ("time_s is this fine-tune only; add init_from's training.time_s for the time from "
                                   "scratch")
        return record

    def finish(self, spec: dict[str, Any], cfg: Any, processor: Any, out_dir: Any) -> None:
        from .gate import accuracy_intervals

        spec["note"] = ("The three-stage position-ID circuit is PLANTED (see planted_mechanism): ground truth for the "
                        "2506.15871 detectors, not a finding about real VLMs. The measurements of the planted heads and "
                        "the detectors' numbers (effect_detectors) are written by `hooked-vlm bench-effects --model "
                        "<this directory> --n 64 --write-record`.")
        spec["planted_mechanism"] = PLANTED_MECHANISM
        spec["ground_truth"] = {PAPER: {"expected": "present",
                                        "effect": "ID-retrieval, ID-selection and feature-retrieval heads passing a "
                                                  "position ID (L1H3, L2H3, L3H3)",
                                        "why": "planted (planted_mechanism)"}}
        spec["accuracy"]["wilson_95"] = accuracy_intervals(spec["accuracy"])


SYMBOLIC_HEADS = register_task(SymbolicHeadsTask())
