"""Train the Shapes organism: a 0.3M-parameter LLaVA (SigLIP + Qwen2) that solves the Shapes task.

Why the recipe looks the way it does (see /work/shared/notes/organism.md): plain answer
cross-entropy sits at chance for thousands of steps, because the circuit needs two heads to
compose (a "gather" head writes colour into the item positions; a "retrieval" head's QK needs
those features) and at std-0.02 init each side's gradient is ~0. Two changes break the saddle:

1. ``initializer_range=0.1`` in the vision and text configs;
2. an auxiliary attention loss, -log(attention mass on the target positions), on head 0 of text
   layers 0, 1, 2 for the first ``supervise_steps`` steps, then switched off:

   * L0H0 "gather": each context item token -> its own colour word; each query's last token ->
     the query's key word (shape or colour).
   * L1H0 "image_lookup": the last token of shape queries -> the queried object's image tokens.
   * L2H0 "retrieval": the last token of -> item queries -> the correct item token.

Those three heads are therefore *planted*: they are ground truth for checking attribution /
patching / knockout tools, not a discovery about real VLMs. ``organism.json`` records them.

Resumable: every ``save_every`` steps the model (safetensors), optimizer (tensors only, loaded
with ``weights_only=True``) and step/log (JSON) go to ``state_dir``. Each step's batch is drawn
from ``numpy.random.default_rng([seed, step])``, so a resumed run sees the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import shapes as S
from .processing import IMAGE, PAD, TOKEN_TO_ID, encode_words
from .recipes import RECIPES, Recipe, get_recipe

BINDING_QUERIES = ("shape_item", "colour_item", "shape_colour")

# The planted circuit: (layer, head) -> role. Descriptions are copied into organism.json.
PLANTED_HEADS = (
    {
        "layer": 0, "head": 0, "role": "gather",
        "query_positions": "each context item letter; the last token of every binding query",
        "key_positions": "the item's own colour word in the context; the query's key word "
                         "(the last shape word for shape queries, the colour word for colour_item)",
    },
    {
        "layer": 1, "head": 0, "role": "image_lookup",
        "query_positions": "the last token of shape_item and shape_colour queries",
        "key_positions": "the image tokens (patches) covered by the queried object's silhouette",
    },
    {
        "layer": 2, "head": 0, "role": "retrieval",
        "query_positions": "the last token of shape_item and colour_item queries",
        "key_positions": "the correct item letter in the context",
    },
)


@dataclass
class TrainConfig:
    steps: int = 4000
    seed: int = 0
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    clip: float = 1.0
    warmup: int = 100
    final_lr_frac: float = 0.1
    batch_size: int = 32
    blocks_per_sequence: int = 3
    scene_fraction: float = 0.25  # share of sequences that are scene descriptions (no context)
    supervise_steps: int = 2500
    attn_weight: float = 1.0
    init_range: float = 0.1
    layout: str = "fixed"
    family: str = "llava"
    n_objects: int = 2
    save_every: int = 250
    eval_every: int = 500
    eval_n: int = 256
    log_every: int = 50
    threads: int = 1


# --------------------------------------------------------------------------- model


def build_config(init_range: float = 0.1, family: str = "llava"):
    return get_recipe(family).build_config(init_range)


def build_model(seed: int = 0, init_range: float = 0.1, family: str = "llava"):
    """A freshly initialised organism of ``family`` (eager attention: the attention loss needs the patterns)."""
    recipe = get_recipe(family)
    torch.manual_seed(seed)
    config = recipe.build_config(init_range)
    config._attn_implementation = "eager"
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = "eager"
    return recipe.model_class()(config)


# --------------------------------------------------------------------------- sequences


@dataclass
class Sequence_:
    """Token ids plus where the answers and the planted-head targets are."""

    ids: list[int] = field(default_factory=list)
    answers: list[tuple[int, int, str]] = field(default_factory=list)  # (last prompt pos, answer id, query)
    sup: dict[int, list[tuple[int, list[int]]]] = field(default_factory=lambda: {0: [], 1: [], 2: []})


def build_sequence(scene: S.Scene, blocks: Sequence[tuple[str, int]], with_answers: bool = True,
                   family: str = "llava") -> Sequence_:
    """Token sequence for ``scene`` with question ``blocks`` [(query, target), ...] in ``family``'s format.

    With ``with_answers=False`` and one block, ``ids`` equal the processor's output for
    ``make_sample(scene, query, target).prompt`` (tested), so the planted-head positions returned
    here can be used on evaluation samples too. ``sup[layer]`` lists (query pos, key positions).
    """
    recipe = get_recipe(family)
    seq = Sequence_()
    ids = seq.ids
    ids += [TOKEN_TO_ID["<bos>"], *recipe.image_block]
    scene_only = blocks[0][0] == "scene"
    if scene_only and len(blocks) != 1:
        raise ValueError("a scene-description sequence holds exactly one block")
    item_pos: dict[int, int] = {}
    if not scene_only:
        for i in scene.mention_order:
            colour_pos = len(ids) + 1
            ids += encode_words(f"The {scene.colours[i]} object contains item {scene.items[i]} .")
            item_pos[i] = colour_pos + 4
            seq.sup[0].append((item_pos[i], [colour_pos]))
    for n, (query, target) in enumerate(blocks):
        q, answer, _ = S.query_text(scene, query, target)
        ids += encode_words(q)
        last = len(ids) - 1
        seq.answers.append((last, TOKEN_TO_ID[answer], query))
        if query == "shape_item":
            seq.sup[0].append((last, [last - 2]))
        elif query == "colour_item":
            seq.sup[0].append((last, [last - 3]))
        elif query == "shape_colour":
            seq.sup[0].append((last, [last - 1]))
        if query in ("shape_item", "shape_colour"):
            seq.sup[1].append((last, [recipe.first_image_pos + p for p in scene.object_patches(target)]))
        if query in ("shape_item", "colour_item"):
            seq.sup[2].append((last, [item_pos[target]]))
        if with_answers or n < len(blocks) - 1:
            ids += [TOKEN_TO_ID[answer], TOKEN_TO_ID["."]]
    return seq


def planted_targets(sample: S.Sample, family: str = "llava") -> dict[int, list[tuple[int, list[int]]]]:
    """Planted-head (query pos, key positions) for an unpadded evaluation sample, per layer."""
    return build_sequence(sample.scene, [(sample.query, sample.target)], with_answers=False, family=family).sup


def make_batch(rng: np.random.Generator, cfg: TrainConfig, split: str = "train"):
    """A batch of fresh training sequences (right-padded; loss only at answer positions)."""
    seqs, images = [], []
    for _ in range(cfg.batch_size):
        scene = S.sample_scene(rng, cfg.layout, split, cfg.n_objects)
        if rng.random() < cfg.scene_fraction:
            blocks = [("scene", int(rng.integers(cfg.n_objects)))]
        else:
            qs = rng.integers(len(BINDING_QUERIES), size=cfg.blocks_per_sequence)
            ts = rng.integers(cfg.n_objects, size=cfg.blocks_per_sequence)
            blocks = [(BINDING_QUERIES[q], int(t)) for q, t in zip(qs, ts)]
        seqs.append(build_sequence(scene, blocks, family=cfg.family))
        images.append(S.render(scene))
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        mask[b, : len(s.ids)] = 1
    recipe = get_recipe(cfg.family)
    return {"input_ids": ids, "attention_mask": mask, **recipe.text_inputs(ids), **recipe.image_inputs(images)}, seqs


def attention_loss(attn: torch.Tensor, targets: list[tuple[int, int, list[int]]]) -> torch.Tensor:
    """Mean of -log(attention mass on the target keys) over (batch, query pos, keys) rows of one
    head's pattern ``attn`` [batch, query, key]."""
    rows = torch.stack([attn[b, q, keys].sum() for b, q, keys in targets])
    return -(rows.clamp_min(1e-6)).log().mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- training


def _save_state(state_dir: Path, model, opt, step: int, log: list, elapsed: float, cfg: TrainConfig) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "elapsed_s": elapsed, "log": log, "config": cfg.__dict__}, indent=1))
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        os.replace(tmp / name, state_dir / name)  # the last write completes the checkpoint
    tmp.rmdir()


def train_organism(
    out_dir: str | os.PathLike,
    steps: int = 4000,
    seed: int = 0,
    resume: bool = False,
    state_dir: Optional[str | os.PathLike] = None,
    cfg: Optional[TrainConfig] = None,
    final_eval_n: int = 1024,
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> dict:
    """Train (or resume) and save the finished organism to ``out_dir`` (HF format + processor +
    organism.json + train_log.json). Training state lives in ``state_dir``
    (default ``out_dir/train_state``). Returns the organism.json dict.

    ``stop_after``: save the training state after this global step and return ``{}`` without
    finishing (for time-boxed chunks; continue with ``resume=True``)."""
    cfg = cfg or TrainConfig()
    cfg.steps, cfg.seed = steps, seed
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir is not None else out_dir / "train_state"
    processor = get_recipe(cfg.family).build_processor()
    model = build_model(seed, cfg.init_range, cfg.family)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start, log, elapsed = 0, [], 0.0
    if resume and (state_dir / "state.json").exists():
        state = json.loads((state_dir / "state.json").read_text())
        model.load_state_dict(load_file(str(state_dir / "model.safetensors")))
        opt.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
        start, log, elapsed = state["step"], state["log"], state["elapsed_s"]
        print(f"resumed from step {start} ({elapsed:.0f} s trained)")

    t0 = time.time() - elapsed
    window: dict[str, list] = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="organism")
    for step in bar:
        model.train()
        rng = np.random.default_rng([seed, step])
        inputs, seqs = make_batch(rng, cfg)
        supervise = step < cfg.supervise_steps
        out = model(**inputs, output_attentions=supervise, use_cache=False)
        logits = out.logits
        rows = [(b, p, a, q) for b, s in enumerate(seqs) for p, a, q in s.answers]
        bidx = torch.tensor([r[0] for r in rows])
        pidx = torch.tensor([r[1] for r in rows])
        labels = torch.tensor([r[2] for r in rows])
        ans_logits = logits[bidx, pidx]
        ce = F.cross_entropy(ans_logits, labels)
        loss = ce
        attn_terms = {}
        if supervise:
            for layer in (0, 1, 2):
                targets = [(b, q, keys) for b, s in enumerate(seqs) for q, keys in s.sup[layer]]
                if targets:
                    attn_terms[layer] = attention_loss(out.attentions[layer][:, 0], targets)
            loss = ce + cfg.attn_weight * sum(attn_terms.values())
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()

        correct = (ans_logits.argmax(-1) == labels).tolist()
        window.setdefault("ce", []).append(ce.item())
        window.setdefault("attn", []).append(float(sum(v.item() for v in attn_terms.values())))
        for (_, _, _, q), c in zip(rows, correct):
            window.setdefault(q, []).append(c)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            entry = {"step": done, "elapsed_s": round(time.time() - t0, 1), "lr": lr_at(step, cfg),
                     "supervised": supervise}
            entry.update({k: round(float(np.mean(v)), 4) for k, v in window.items()})
            log.append(entry)
            window = {}
            bar.set_postfix(ce=entry["ce"], si=entry.get("shape_item"), sc=entry.get("scene"))
        if done % cfg.eval_every == 0 and done < cfg.steps:
            acc = evaluate(model, processor, n=cfg.eval_n, seed=10_000 + done, heldout=True, layout=cfg.layout,
                           n_objects=cfg.n_objects)
            log.append({"step": done, "eval_heldout": acc})
            tqdm.write(f"step {done}: held-out {acc}")
        if done % cfg.save_every == 0 or done == cfg.steps or done == stop_after:
            _save_state(state_dir, model, opt, done, log, time.time() - t0, cfg)
        if done == stop_after:
            bar.close()
            return {}
    train_time = time.time() - t0
    return finish_organism(model, processor, out_dir, cfg, log, train_time, final_eval_n)


# --------------------------------------------------------------------------- shipping


def organism_name(family: str, layout: str = "fixed", n_objects: int = 2) -> str:
    return f"shapes_{family}" + ("" if layout == "fixed" else f"_{layout}") + ("" if n_objects == 2 else f"_{n_objects}obj")


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


def finish_organism(model, processor, out_dir: Path, cfg: TrainConfig, log: list, train_time: float,
                    n: int = 1024) -> dict:
    """Measure, then write the HF checkpoint, processor, organism.json and train_log.json."""
    report = circuit_report(model, processor, n=n, layout=cfg.layout, family=cfg.family, n_objects=cfg.n_objects)
    recipe = get_recipe(cfg.family)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    circuit = [dict(h, supervised_steps=min(cfg.supervise_steps, cfg.steps)) for h in PLANTED_HEADS]
    n_params = sum(p.numel() for p in model.parameters())
    spec = {
        "name": organism_name(cfg.family, cfg.layout, cfg.n_objects),
        "family": cfg.family,
        "note": ("Part of this model's circuit is PLANTED by an auxiliary attention loss during the first "
                 "supervised_steps steps (see planted_circuit). Use it as ground truth for tools; do not "
                 "read it as a finding about real VLMs."),
        "task": {
            "vocab": list(S.VOCAB), "colours": list(S.COLOURS), "shapes": list(S.SHAPES),
            "shape_silhouettes": {"cube": "square", "sphere": "disc", "cylinder": "rounded tall rectangle",
                                  "cone": "triangle"},
            "items": list(S.ITEMS), "layout": cfg.layout, "n_objects": cfg.n_objects, "image_size": S.IMAGE_SIZE,
            "patch_size": S.PATCH_SIZE, "object_size": S.OBJECT_SIZE, "jitter": list(S.JITTER),
            "slots": ({"0": "upper-left 32x32 block (patches 0,1,4,5)", "1": "lower-right 32x32 block (patches 10,11,14,15)"}
                      if cfg.layout == "fixed" else
                      {"0": "object centre above the anti-diagonal (cx + cy < 64)", "1": "otherwise"}),
            "heldout_triples": [list(t) for t in S.HELDOUT_TRIPLES],
            "heldout_rule": "a held-out sample has at least one object whose (colour, shape, slot) is held out; "
                            "training samples have none",
            "queries": {
                "shape_item": "<context> Which item does the {shape} contain ? Answer : The {shape} contains item -> item",
                "colour_item": "<context> The {colour} object contains item -> item (text only)",
                "shape_colour": "<context> The {shape} is -> colour (image only)",
                "scene": "In this image there is a {colour} {shape} and a -> the other object's colour (no context)",
            },
            "context": "The {c0} object contains item {A} . The {c1} object contains item {B} . "
                       "(mention order random, independent of position)",
            "training_sequence": f"<bos> <image block: {len(recipe.image_block)} tokens> <context> then {cfg.blocks_per_sequence} binding question blocks "
                                 f"each followed by its answer and '.'; {cfg.scene_fraction:.0%} of sequences are "
                                 "a scene description instead: <bos> <image block> In this image ... and a {colour} .",
        },
        "model": {"class": recipe.hf_class, **recipe.description, "parameters": n_params,
                  "image_tokens": S.NUM_IMAGE_TOKENS, "first_image_position": recipe.first_image_pos},
        "training": {"steps": cfg.steps, "seed": cfg.seed, "lr": cfg.lr, "betas": list(cfg.betas),
                     "weight_decay": cfg.weight_decay, "grad_clip": cfg.clip, "warmup": cfg.warmup,
                     "schedule": f"linear warm-up then cosine to {cfg.final_lr_frac}x", "batch_size": cfg.batch_size,
                     "init_range": cfg.init_range, "attn_supervision_weight": cfg.attn_weight,
                     "supervise_steps": cfg.supervise_steps, "threads": cfg.threads,
                     "time_s": round(train_time, 1), "data": "fresh samples each step, training combinations only"},
        "planted_circuit": circuit,
        "findings": CIRCUIT_NOTES,
        **report,
    }
    (out_dir / "organism.json").write_text(json.dumps(spec, indent=1))
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=None))
    return spec


def refresh_report(path: str | os.PathLike, n: int = 1024, findings: Optional[list[str]] = None) -> dict:
    """Re-measure ``circuit_report`` for a saved organism and rewrite its organism.json (task and
    training fields kept). ``findings``: checkpoint-specific observations to record."""
    from . import load_organism_hf

    path = Path(path)
    spec = json.loads((path / "organism.json").read_text())
    model, processor = load_organism_hf(path, attn_implementation="eager")
    spec.update(circuit_report(model, processor, n=n, layout=spec["task"]["layout"],
                               family=spec.get("family", "llava"), n_objects=spec["task"].get("n_objects", 2)))
    spec["findings"] = CIRCUIT_NOTES + list(findings or [])
    (path / "organism.json").write_text(json.dumps(spec, indent=1))
    return spec


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``hooked-vlm train-organism --out DIR --steps N --seed S [--resume]``."""
    p = argparse.ArgumentParser(prog="hooked-vlm train-organism", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="shapes_organism",
                   help="where the finished organism is saved (the shipped one lives in hooked_vlm.organism.ORGANISM_DIR)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--resume", action="store_true", help="continue from STATE_DIR if it holds a checkpoint")
    p.add_argument("--state-dir", default=None, help="training state (default OUT/train_state)")
    p.add_argument("--supervise-steps", type=int, default=TrainConfig.supervise_steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after", type=int, default=None, help="save state after this step and exit")
    p.add_argument("--eval-n", type=int, default=1024, help="samples per query type in the final evaluation")
    p.add_argument("--layout", default="fixed", choices=S.LAYOUTS,
                   help="object placement: two fixed 32x32 blocks (default) or anywhere in the image")
    p.add_argument("--objects", type=int, default=2, choices=S.N_OBJECTS,
                   help="objects per scene (3 needs --layout random)")
    p.add_argument("--family", default="llava", choices=sorted(RECIPES),
                   help="model family: llava (SigLIP, 1-D RoPE), qwen2_vl (Qwen ViT + merger, M-RoPE) or gemma3 (SigLIP + "
                        "pooled projector, local/global Gemma 3 decoder)")
    args = p.parse_args(argv)
    cfg = TrainConfig(supervise_steps=args.supervise_steps, threads=args.threads, layout=args.layout,
                      family=args.family, n_objects=args.objects)
    spec = train_organism(args.out, steps=args.steps, seed=args.seed, resume=args.resume,
                          state_dir=args.state_dir, cfg=cfg, final_eval_n=args.eval_n, stop_after=args.stop_after)
    if spec:
        print(json.dumps(spec["accuracy"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
