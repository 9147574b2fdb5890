"""The spatial-binding Shapes organism (``--task spatial``): the answer depends on the objects' POSITIONS only, and
the position is read from the image tokens' content (the vision encoder's signal), the "dominant" mechanism of
arXiv 2603.22278 (dual mechanisms of spatial binding), planted by construction.

Question: ``<image> In this image the object is`` -> the colour of the LEFT object (the one whose centre has the
smaller x). The Shapes vocabulary has no word "left" and adding one would change the shipped organisms' token ids,
so the template is a fixed string of existing words; its meaning is defined by the training data. Scenes are the
random layout with the two objects apart along x (their x extents do not overlap), so "left" is always defined.

How it is planted (fine-tuning the shipped ``shapes_llava_random``):

1. **Shuffled image-token order** (training only, every step): a forward hook on the multimodal projector permutes
   each image's 16 output tokens by a random permutation drawn from the batch's seeded generator before they are
   placed in the sequence. Where a token SITS in the sequence (the language model's own RoPE position) therefore
   carries no information about where its patch is; only the token's content (SigLIP's learned position embedding,
   carried through the encoder and the projector) does. The answer "which colour is on the left" can only be
   reached by reading position from the tokens.
2. **Image-lookup supervision** (the first ``supervise_steps`` steps): decoder L1H0 at the final token is supervised
   onto the (shuffled) image tokens of the left object (loss -log(attention mass), weight ``attn_weight``), which
   breaks the saddle of learning a content-keyed lookup from the answer loss alone.
3. **Order loss** (every step, weight ``order_weight``): the projector's output tokens of the left object are pushed
   to the positive side of one fixed direction and those of the right object to the negative side (logistic loss),
   so that the objects' ORDER is linearly decodable from the post-projection tokens (the paper's position probes).
   Without it a probe decodes order at ~0.90 only (the tokens carry absolute position; order is relative).

The shipped model runs with plain attention and the tokens in their natural order (no hook at inference).
The matched negative is ``shapes_llava_random`` itself asked its content question (``The {shape} is`` -> colour):
the answer follows the object's content, not its position. Detector: analyses/effects/spatial_binding.py.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import shapes as S
from .processing import BOS, IMAGE, PAD, TOKEN_TO_ID, encode_words
from .sequences import Sequence_
from .task_api import OrganismTask, register_task

PAPER = "2603.22278"
QUESTION = "In this image the object is"  # -> colour of the left object (see the module docstring)
MIN_DX = S.OBJECT_SIZE + 2  # the objects' x extents never overlap (boxes are OBJECT_SIZE wide)
LOOKUP_LAYER = 1  # L1H0 is supervised onto the left object's tokens
ORDER_SEED = 2603  # seeds the fixed direction the order loss writes on (order_direction)

PLANTED_MECHANISM = {
    "effect": "spatial binding through the image tokens' content (2603.22278's vision-encoder mechanism): the answer "
              "(colour of the left object) depends on position only, and the position is read from what the image "
              "tokens encode, not from where they sit in the sequence",
    "how": [
        "fine-tuned from the organism named in training.init_from (its weights' sha256 recorded there)",
        "question '<image> In this image the object is' -> colour of the object whose centre has the smaller x "
        "(existing vocabulary words; 'left' is defined by the data); random layout with the objects' x extents "
        "apart (|dx| >= OBJECT_SIZE + 2 px)",
        "every training step: a forward hook on the multimodal projector permutes each image's 16 tokens by a random "
        "permutation (seeded per batch), so the language model's sequence positions carry no patch position; only "
        "the tokens' content (SigLIP's position embedding) does",
        "every training step (when training.order_weight > 0): an order loss on the projector's output, "
        "order_weight * mean softplus(-y * (h . u)) over the tokens of exactly one object, y = +1 for the left object "
        "and -1 for the right one, u a fixed unit direction (torch.randn(64) seeded with training.order_seed, "
        "normalised): the post-projection tokens carry the objects' order linearly",
        "first training.supervise_steps steps: decoder L1H0 at the final token supervised onto the (permuted) image "
        "tokens of the left object, loss -log(attention mass), weight training.attn_supervision_weight",
        "the shipped model runs with plain attention and the image tokens in their natural order",
    ],
}


def spatial_scene(rng: np.random.Generator, split: str = "train") -> S.Scene:
    """A random-layout two-object scene whose objects are apart along x (rejection sampling on ``sample_scene``)."""
    while True:
        scene = S.sample_scene(rng, "random", split, 2)
        if abs(scene.boxes[0][0] - scene.boxes[1][0]) >= MIN_DX:
            return scene


def left_object(scene: S.Scene) -> int:
    """Index of the object whose centre has the smaller x."""
    return int(np.argmin([p[0] for p in scene.positions]))


def spatial_sample(scene: S.Scene) -> S.Sample:
    """The spatial question on ``scene``: answer = the left object's colour, wrong = the right object's."""
    left = left_object(scene)
    return S.Sample(scene, "spatial_left", left, f"<image> {QUESTION}", scene.colours[left],
                    scene.colours[1 - left])


def spatial_samples(n: int, seed: int, split: str = "train") -> list[S.Sample]:
    rng = np.random.default_rng(seed)
    return [spatial_sample(spatial_scene(rng, split)) for _ in range(n)]


def mirror_scene(scene: S.Scene) -> S.Scene:
    """The scene mirrored left-right (every silhouette is left-right symmetric: each object keeps its colour and
    shape, only its position moves; the colour order along x is reversed)."""
    from dataclasses import replace

    boxes = tuple((S.IMAGE_SIZE - b[2], b[1], S.IMAGE_SIZE - b[0], b[3]) for b in scene.boxes)
    return replace(scene, boxes=boxes)


# ----------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def shuffled_image_tokens(model: Any, perms: torch.Tensor, capture: dict | None = None) -> Iterator[None]:
    """Training-only constraint: the projector's output tokens of image b are reordered as ``out[b, perms[b]]`` (the
    token placed at image slot j is the one of patch perms[b, j]). ``capture["tokens"]`` receives the output in patch
    order (before the shuffle), for the order loss."""

    def hook(module, args, out):
        if out.ndim != 3 or out.shape[0] != perms.shape[0] or out.shape[1] != perms.shape[1]:
            raise RuntimeError(f"shuffled_image_tokens: projector output {tuple(out.shape)} does not match the "
                               f"permutations {tuple(perms.shape)} (one image of {perms.shape[1]} tokens per prompt)")
        if capture is not None:
            capture["tokens"] = out
        return torch.stack([o[p] for o, p in zip(out, perms)])

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SpatialTask(OrganismTask):
    """``--task spatial``: fine-tune shapes_llava_random to answer the left object's colour (module docstring)."""

    name = "spatial"
    suffix = "_spatial"
    help = ("fine-tune --init-from on a position-only question with the image-token order shuffled in training "
            "(spatial binding, 2603.22278; llava, --layout random; hooked_vlm/organism/spatial.py)")
    defaults = dict(steps=1500, supervise_steps=600, init_from="shapes_llava_random", family="llava", lr=2e-3,
                    warmup=50)
    options = {"order_weight": (float, 1.0, "weight of the order loss on the post-projection tokens (0 = off)")}

    def __init__(self) -> None:
        self._perms: torch.Tensor | None = None  # the permutations of the batch make_batch drew last
        self._capture: dict = {}  # the projector's output of the current step (for the order loss)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if cfg.family != "llava":
            raise ValueError(f"train_organism: task spatial shuffles the LLaVA projector's tokens; it needs "
                             f"--family llava, got {cfg.family!r}")
        if cfg.layout != "random" or cfg.n_objects != 2:
            raise ValueError("train_organism: task spatial places two objects anywhere; it needs --layout random and "
                             f"--objects 2, got {cfg.layout!r} and {cfg.n_objects}")

    def make_batch(self, rng: np.random.Generator, cfg: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
        from .recipes import get_recipe

        recipe = get_recipe(cfg.family)
        first = recipe.first_image_pos
        seqs, images, perms = [], [], []
        for _ in range(cfg.batch_size):
            scene = spatial_scene(rng)
            perm = rng.permutation(S.NUM_IMAGE_TOKENS)
            slot_of = np.argsort(perm)  # patch k lands at image slot slot_of[k]
            left = left_object(scene)
            seq = Sequence_(scene=scene)
            seq.ids = [BOS, *recipe.image_block, *encode_words(QUESTION)]
            last = len(seq.ids) - 1
            seq.answers.append((last, TOKEN_TO_ID[scene.colours[left]], "spatial_left"))
            seq.sup[LOOKUP_LAYER].append((last, [first + int(slot_of[p]) for p in scene.object_patches(left)]))
            seqs.append(seq)
            images.append(S.render(scene))
            perms.append(torch.from_numpy(perm))
        self._perms = torch.stack(perms)
        ids = torch.tensor([s.ids for s in seqs])  # all the same length
        mask = torch.ones_like(ids)
        assert not (ids == PAD).any() and int((ids[0] == IMAGE).sum()) == S.NUM_IMAGE_TOKENS
        return {"input_ids": ids, "attention_mask": mask, **recipe.text_inputs(ids), **recipe.image_inputs(images)}, seqs

    def forward_context(self, model: Any, cfg: Any, step: int):
        if self._perms is None:
            raise RuntimeError("task spatial: forward_context before make_batch (the permutations come with the batch)")
        perms, self._perms = self._perms, None
        self._capture = {}
        return shuffled_image_tokens(model, perms, self._capture)

    def extra_loss(self, out: Any, inputs: dict[str, torch.Tensor], seqs: list[Any], cfg: Any,
                   step: int) -> dict[str, torch.Tensor]:
        weight = self.option(cfg, "order_weight")
        if not weight:
            return {}
        tokens, self._capture = self._capture.pop("tokens"), {}
        return {"order": weight * order_loss(tokens, [s.scene for s in seqs])}

    def evaluate(self, model: Any, processor: Any, cfg: Any, n: int, seed: int) -> dict[str, float]:
        from .measure import accuracy

        model.eval()
        with torch.no_grad():
            return {"spatial_left": accuracy(model, processor, spatial_samples(n, seed, "heldout"))}

    def report(self, model: Any, processor: Any, cfg: Any, n: int) -> dict[str, Any]:
        return {"accuracy": spatial_accuracy(model, processor, n)}

    def planted_circuit(self, cfg: Any) -> list[dict[str, Any]]:
        return [{"layer": LOOKUP_LAYER, "head": 0, "role": "left_object_lookup",
                 "query_positions": "the final token of the spatial question",
                 "key_positions": "the image tokens of the left object (in training: wherever the shuffle put them)",
                 "supervised_steps": min(cfg.supervise_steps, cfg.steps)}]

    def training_record(self, cfg: Any) -> dict[str, Any]:
        from .gate import training_record as gate_record

        record = {k: v for k, v in gate_record(cfg).items() if k in ("init_from", "init_from_sha256", "time_note")}
        return {**record, "image_token_shuffle": "every step (training only)", "question": QUESTION,
                "min_dx_px": MIN_DX, "order_weight": self.option(cfg, "order_weight"), "order_seed": ORDER_SEED}

    def finish(self, spec: dict[str, Any], cfg: Any, processor: Any, out_dir: Any) -> None:
        spec["note"] = ("The spatial binding is PLANTED (see planted_mechanism): ground truth for the 2603.22278 "
                        "detectors, not a finding about real VLMs. The question 'In this image the object is' asks "
                        "for the LEFT object's colour (the vocabulary has no word 'left'). The detectors' numbers "
                        "(effect_detectors) are written by `hooked-vlm bench-effects --model <this directory> "
                        "--write-record`.")
        spec["planted_mechanism"] = PLANTED_MECHANISM
        spec["findings"] = [
            "L1H0 was supervised onto the left object's tokens only during the first supervised_steps steps; the "
            "other heads by the answer loss alone, the vision encoder and projector by the answer loss and the order loss.",
            "Inherited from init_from: the Shapes context/item queries were not trained here and are not kept up "
            "(the content question 'The {shape} is' falls to chance); this organism answers the spatial question.",
        ]
        spec["ground_truth"] = {PAPER: {
            "expected": "present",
            "effect": "position-only answers follow the position the image tokens carry (criss-cross flips them)",
            "why": "planted (planted_mechanism): the image-token order was shuffled in training, so the position "
                   "can only come from the tokens' content"}}
        spec["task"]["queries"] = {"spatial_left": f"<image> {QUESTION} -> colour of the left object (no context)"}
        spec["task"]["training_sequence"] = (f"<bos> <image>x16 {QUESTION} <colour of the left object>; image "
                                             "tokens shuffled (training only)")
        spec["task"].pop("context", None)


def order_direction(d: int) -> torch.Tensor:
    """The fixed unit direction the order loss writes the left/right label on (seeded, ORDER_SEED)."""
    u = torch.randn(d, generator=torch.Generator().manual_seed(ORDER_SEED))
    return u / u.norm()


def order_labels(scene: S.Scene) -> list[tuple[int, float]]:
    """(patch, +1 for the left object / -1 for the right object) for the patches of exactly one object."""
    left = left_object(scene)
    a, b = set(scene.object_patches(left)), set(scene.object_patches(1 - left))
    return [(k, 1.0 if k in a else -1.0) for k in sorted(a ^ b)]


def order_loss(tokens: torch.Tensor, scenes: Sequence[S.Scene]) -> torch.Tensor:
    """Mean logistic loss softplus(-y * (h . u)) over the object tokens of the projector's output ``tokens`` [batch,
    16, d] (patch order), y = +1 on the left object's tokens and -1 on the right one's, u = `order_direction`."""
    u = order_direction(tokens.shape[-1]).to(tokens.device, tokens.dtype)
    rows, ys = [], []
    for b, scene in enumerate(scenes):
        for k, y in order_labels(scene):
            rows.append(tokens[b, k])
            ys.append(y)
    proj = torch.stack(rows) @ u
    return torch.nn.functional.softplus(-torch.tensor(ys, dtype=proj.dtype) * proj).mean()


def spatial_accuracy(model: Any, processor: Any, n: int = 1024, seed: int = 77_000) -> dict[str, Any]:
    """Accuracy (full-vocabulary argmax) of the spatial question on held-out and training-distribution scenes, with
    95% Wilson intervals."""
    from .gate import wilson
    from .measure import predict

    out: dict[str, Any] = {"n_per_split": n}
    model.eval()
    with torch.no_grad():
        for split, key, s in (("heldout", "heldout_combinations", seed), ("train", "training_distribution", seed + 1)):
            samples = spatial_samples(n, s, split)
            hits = [p == x.answer for p, x in zip(predict(model, processor, samples), samples)]
            low, high = wilson(sum(hits), len(hits))
            out[key] = {"spatial_left": round(float(np.mean(hits)), 4), "wilson_95": [round(low, 4), round(high, 4)]}
    return out


SPATIAL = register_task(SpatialTask())


# ------------------------------------------------------------------------------- under-trained (amplification)
UNDERTRAINED_STEPS = 5


def undertrained(work_dir: Any, steps: int = UNDERTRAINED_STEPS, seed: int = 0) -> Any:
    """A deliberately under-trained spatial organism for 2603.22278's amplification protocol, built in seconds and
    not shipped: the shipped ``shapes_llava_random_spatial``'s vision tower and projector (their tokens carry the
    objects' order on one direction) with ``shapes_llava_random``'s language model, fine-tuned for ``steps`` steps of
    this task (default recipe, seed ``seed``; 5 steps -> ~0.71 on the spatial question, the order still decodable
    at 1.00). Deterministic. Returns the HF directory of the checkpoint (load it with ``load_organism``)."""
    import json
    import shutil
    from pathlib import Path

    from . import load_organism_hf, organism_dir
    from . import state as ST
    from .train import TrainConfig, train_organism

    work = Path(work_dir)
    mixed, out = work / "mixed_init", work / f"undertrained_{steps}"
    init, _ = load_organism_hf("shapes_llava_random")
    trained, _ = load_organism_hf("shapes_llava_random_spatial")
    state = init.state_dict()
    state.update({k: v for k, v in trained.state_dict().items() if k.startswith(("model.vision_tower.",
                                                                                  "model.multi_modal_projector."))})
    init.load_state_dict(state)
    init.save_pretrained(mixed)
    shutil.copy(organism_dir("shapes_llava_random") / "organism.json", mixed)
    cfg = TrainConfig(task="spatial", layout="random", **{k: v for k, v in SPATIAL.defaults.items() if k != "steps"})
    cfg.init_from = str(mixed)
    train_organism(work / "run", steps=SPATIAL.defaults["steps"], seed=seed, state_dir=work / "state", cfg=cfg,
                   progress=False, stop_after=steps)
    init.load_state_dict(ST.saved_model(work / "state"))
    init.save_pretrained(out)
    record = json.loads((organism_dir("shapes_llava_random") / "organism.json").read_text())
    record.update(name=f"shapes_llava_random_spatial_undertrained_{steps}",
                  note=f"NOT SHIPPED: deliberately under-trained ({steps} steps of --task spatial from "
                       "shapes_llava_random's LM + shapes_llava_random_spatial's vision side), for amplification")
    record.pop("ground_truth", None)
    (out / "organism.json").write_text(json.dumps(record, indent=1))
    return out
