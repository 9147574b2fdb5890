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
with ``weights_only=True``) and a manifest naming the step go to ``state_dir``, atomically
(hooked_vlm/organism/state.py); ``--resume`` refuses a run whose seed, family, layout, objects or
recipe differ from the saved one. Each step's batch is drawn from
``numpy.random.default_rng([seed, step])``, so a resumed run sees the same data.

Measurement lives in measure.py, the training sequences and the planted circuit in sequences.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import shapes as S
from . import state as ST
from .measure import (ABLATION_GROUPS, CIRCUIT_NOTES, accuracy, attention_mass, circuit_report,  # noqa: F401
                      evaluate, final_token_image_mass, head_ablation, predict)
from .processing import PAD
from .task_api import get_task, task_names
from .recipes import RECIPES, get_recipe
from .sequences import (BINDING_QUERIES, PLANTED_HEADS, Sequence_, build_sequence,  # noqa: F401  (re-exported)
                        planted_targets)


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
    # the training task (hooked_vlm/organism/task_api.py registry): shapes, or an organism with an effect planted
    task: str = "shapes"
    init_from: Optional[str] = None  # shipped organism name or checkpoint directory to start from
    options: dict[str, Any] = field(default_factory=dict)  # the task's own knobs (OrganismTask.options)


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


def init_checkpoint(name: str) -> Path:
    """The model.safetensors a run starts from (``init_from``: shipped organism name or directory)."""
    from . import organism_dir

    return organism_dir(name) / "model.safetensors"


def load_init(model, name: str) -> None:
    """Start from a trained organism's weights (strict: the architectures must match)."""
    trained = type(model).from_pretrained(init_checkpoint(name).parent, attn_implementation="eager")
    model.load_state_dict(trained.state_dict())


# --------------------------------------------------------------------------- sequences


def make_batch(rng: np.random.Generator, cfg: TrainConfig):
    """A batch of fresh training sequences for cfg.task (right-padded; loss only at answer positions)."""
    return get_task(cfg.task).make_batch(rng, cfg)


def shapes_batch(rng: np.random.Generator, cfg: TrainConfig, split: str = "train"):
    """A batch of fresh Shapes training sequences (right-padded; loss only at answer positions)."""
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
    return collate(seqs, images, cfg.family), seqs


def collate(seqs: Sequence, images: Sequence, family: str) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for training sequences (each with ``ids``) and their images."""
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        mask[b, : len(s.ids)] = 1
    recipe = get_recipe(family)
    return {"input_ids": ids, "attention_mask": mask, **recipe.text_inputs(ids), **recipe.image_inputs(list(images))}


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


# --------------------------------------------------------------------------- training


def check_run(cfg: TrainConfig, final_eval_n: int, stop_after: Optional[int]) -> None:
    """Refuse numbers that would write an untrained organism or NaN accuracies, naming the bound."""
    bounds = [("steps (--steps)", cfg.steps, 1), ("final_eval_n (--eval-n)", final_eval_n, 1),
              ("eval_n", cfg.eval_n, 1), ("batch_size", cfg.batch_size, 1), ("threads (--threads)", cfg.threads, 1),
              ("save_every", cfg.save_every, 1), ("eval_every", cfg.eval_every, 1), ("log_every", cfg.log_every, 1),
              ("supervise_steps (--supervise-steps)", cfg.supervise_steps, 0)]
    for name, value, low in bounds:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"train_organism: {name} must be an integer >= {low}, got {value!r}")
    get_task(cfg.task).check(cfg)
    if stop_after is not None and not 1 <= stop_after <= cfg.steps:
        raise ValueError(f"train_organism: stop_after (--stop-after) must be in 1..steps={cfg.steps}, got {stop_after}")


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
    finishing (for time-boxed chunks; continue with ``resume=True``). Runs with gradients whatever
    the caller's grad mode, and leaves the grad mode and torch's thread count as it found them."""
    cfg = replace(cfg or TrainConfig(), steps=steps, seed=seed)
    check_run(cfg, final_eval_n, stop_after)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads)
        with torch.enable_grad():  # restores the caller's mode on exit, exceptions included
            return _train(Path(out_dir), cfg, resume, state_dir, final_eval_n, progress, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, cfg: TrainConfig, resume: bool, state_dir: Optional[str | os.PathLike], final_eval_n: int,
           progress: bool, stop_after: Optional[int]) -> dict:
    seed = cfg.seed
    state_dir = Path(state_dir) if state_dir is not None else out_dir / "train_state"
    manifest = ST.read_manifest(state_dir) if resume else None
    if manifest is not None:
        ST.check_resumable(manifest, asdict(cfg), cfg.steps, state_dir)
    recipe, task = get_recipe(cfg.family), get_task(cfg.task)
    processor = recipe.build_processor()
    model = build_model(seed, cfg.init_range, cfg.family)
    if cfg.init_from is not None:
        load_init(model, cfg.init_from)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start, log, elapsed = 0, [], 0.0
    if manifest is not None:
        ST.load_state(state_dir, manifest, model, opt)
        start, log, elapsed = manifest["step"], manifest["log"], manifest["elapsed_s"]
        print(f"resumed from step {start} ({elapsed:.0f} s trained)")
        if stop_after is not None and stop_after <= start:
            return {}  # that chunk is done already

    t0 = time.time() - elapsed
    window: dict[str, list] = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="organism")
    for step in bar:
        model.train()
        rng = np.random.default_rng([seed, step])
        inputs, seqs = make_batch(rng, cfg)
        supervise = step < cfg.supervise_steps
        with task.forward_context(model, cfg, step):
            out = model(**inputs, output_attentions=supervise or task.wants_attentions(cfg, step), use_cache=False)
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
        for term, value in task.extra_loss(out, inputs, seqs, cfg, step).items():
            window.setdefault(term, []).append(value.item())
            loss = loss + value
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
            acc = task.evaluate(model, processor, cfg, n=cfg.eval_n, seed=10_000 + done)
            log.append({"step": done, "eval_heldout": acc})
            tqdm.write(f"step {done}: held-out {acc}")
        if done % cfg.save_every == 0 or done == cfg.steps or done == stop_after:
            ST.save_state(state_dir, model, opt, done, log, time.time() - t0, asdict(cfg))
        if done == stop_after:
            bar.close()
            return {}
    train_time = time.time() - t0
    return finish_organism(model, processor, out_dir, cfg, log, train_time, final_eval_n)


# --------------------------------------------------------------------------- shipping


def organism_name(family: str, layout: str = "fixed", n_objects: int = 2) -> str:
    return f"shapes_{family}" + ("" if layout == "fixed" else f"_{layout}") + ("" if n_objects == 2 else f"_{n_objects}obj")


def finish_organism(model, processor, out_dir: Path, cfg: TrainConfig, log: list, train_time: float,
                    n: int = 1024) -> dict:
    """Measure, then write the HF checkpoint, processor, organism.json and train_log.json."""
    recipe, task = get_recipe(cfg.family), get_task(cfg.task)
    report = task.report(model, processor, cfg, n)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    circuit = task.planted_circuit(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    spec = {
        "name": organism_name(cfg.family, cfg.layout, cfg.n_objects) + task.suffix,
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
                     "time_s": round(train_time, 1), "data": "fresh samples each step, training combinations only",
                     "task": cfg.task, **task.training_record(cfg)},
        "planted_circuit": circuit,
        "findings": CIRCUIT_NOTES,
        **report,
    }
    task.finish(spec, cfg, processor, out_dir)
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
    from ..cli import int_at_least

    p = argparse.ArgumentParser(prog="hooked-vlm train-organism", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="shapes_organism",
                   help="where the finished organism is saved (the shipped one lives in hooked_vlm.organism.ORGANISM_DIR)")
    tasks = {name: get_task(name) for name in task_names()}
    p.add_argument("--task", default="shapes", choices=sorted(tasks),
                   help="; ".join(f"{name}: {t.help}" for name, t in tasks.items()))
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="default " + ", ".join(f"{t.defaults.get('steps', TrainConfig.steps)} ({name})"
                                               for name, t in tasks.items()))
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--resume", action="store_true",
                   help="continue from STATE_DIR if it holds a checkpoint (same seed, family, layout and objects)")
    p.add_argument("--state-dir", default=None, help="training state (default OUT/train_state)")
    p.add_argument("--supervise-steps", type=int_at_least(0), default=None,
                   help="default " + ", ".join(f"{t.defaults.get('supervise_steps', TrainConfig.supervise_steps)} "
                                               f"({name})" for name, t in tasks.items()))
    p.add_argument("--init-from", default=None,
                   help="organism (shipped name or directory) to fine-tune, for tasks that start from one: "
                        + ", ".join(f"{name} (default {t.defaults['init_from']})" for name, t in tasks.items()
                                    if "init_from" in t.defaults))
    owners: dict[str, str] = {}
    for name, t in tasks.items():  # each task's own knobs (TrainConfig.options)
        for opt, (kind, default, text) in t.options.items():
            if opt in owners:
                raise RuntimeError(f"tasks {owners[opt]!r} and {name!r} both declare option {opt!r}")
            owners[opt] = name
            p.add_argument("--" + opt.replace("_", "-"), dest=f"option_{opt}", metavar=opt.upper(), type=kind, default=None,
                           help=f"{name}: {text} (default {default})")
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--stop-after", type=int_at_least(1), default=None, help="save state after this step and exit")
    p.add_argument("--eval-n", type=int_at_least(1), default=1024, help="samples per query type in the final evaluation")
    p.add_argument("--layout", default="fixed", choices=S.LAYOUTS,
                   help="object placement: two fixed 32x32 blocks (default) or anywhere in the image")
    p.add_argument("--objects", type=int, default=2, choices=S.N_OBJECTS,
                   help="objects per scene (3 needs --layout random)")
    p.add_argument("--family", default=None, choices=sorted(RECIPES),
                   help="model family: llava (SigLIP, 1-D RoPE), qwen2_vl (Qwen ViT + merger, M-RoPE), qwen3_vl "
                        "(Qwen3 ViT, DeepStack, qk-norm, interleaved M-RoPE) or gemma3 (SigLIP + pooled projector, "
                        "local/global Gemma 3 decoder)")
    args = p.parse_args(argv)
    task = dict(tasks[args.task].defaults)
    for name in ("steps", "supervise_steps", "init_from", "family"):
        if getattr(args, name) is not None:
            task[name] = getattr(args, name)
    args.steps = task.pop("steps", TrainConfig.steps)
    options = {opt: getattr(args, f"option_{opt}") for opt in owners if getattr(args, f"option_{opt}") is not None}
    foreign = [f"--{opt.replace('_', '-')}" for opt in options if owners[opt] != args.task]
    if foreign:
        p.error(f"{', '.join(foreign)} belong(s) to another task than --task {args.task}")
    if args.stop_after is not None and args.stop_after > args.steps:
        p.error(f"argument --stop-after: expected at most --steps ({args.steps}), got {args.stop_after}")
    cfg = TrainConfig(**{"family": "llava", **task}, task=args.task, threads=args.threads, layout=args.layout,
                      n_objects=args.objects, options=options)
    spec = train_organism(args.out, steps=args.steps, seed=args.seed, resume=args.resume,
                          state_dir=args.state_dir, cfg=cfg, final_eval_n=args.eval_n, stop_after=args.stop_after)
    if spec:
        print(json.dumps(spec["accuracy"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
