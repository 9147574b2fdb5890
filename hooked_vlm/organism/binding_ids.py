"""The binding-ID Shapes organism (``--task binding_ids``): the answer is reachable only through a content-free
binding vector shared by an object's image tokens, its colour word and its item (arXiv 2505.22200, after Feng &
Steinhardt), planted by construction. LLaVA family (SigLIP + Qwen2, 1-D RoPE), trained from scratch.

The ID is the object's block in the fixed layout (slot 0 upper-left, slot 1 lower-right), written as a fixed vector
a_k into a dedicated ID subspace (the last ``ID_DIMS`` residual dimensions). The route:

1. image tokens: the projector's output in the ID subspace is regressed onto a_k for the patches of block k (0 on the
   other patches): an MSE loss, weight ``id_weight``;
2. L0H2: each colour word attends to the image patches of the object with its colour and copies their ID (not their
   content: see the invariant below) -> the colour word holds a_k;
3. L1H2: each item letter attends to its own colour word and copies the ID -> the item holds a_k, nothing else of
   the object;
4. the question: L0H0 gathers the queried shape word into the final token; L1H3 reads the ID of the queried object's
   patches; L2H0 retrieves the item whose ID matches and copies its letter.

The invariant that makes the ID content-free (structural zeros, re-imposed before every step, kept in the shipped
weights): every head of key/value group 1 (heads 2, 3 of each layer) reads values from the ID subspace only
(v_proj columns outside it are zero); no other writer touches the ID subspace (token embeddings, the o_proj rows of
heads 0, 1 and the MLP down_proj rows there are zero). So the ID subspace of every token is a function of the image
tokens' ID subspace alone, which the MSE loss pins to a position code: a colour or shape cannot ride along.

Training-only constraints (removed afterwards: the shipped model runs plain attention, no mask, no hook):
- masked phase (``mask_steps``): an additive per-head mask. Heads 0, 1 (the content readers) of context tokens see
  only <bos> and themselves (so an item never reads its colour word's content); heads 0, 1 of question tokens see
  no colour word and no earlier question block; no head of a question token sees a colour word or an earlier block
  (the question never reads the colour words: it reaches the item only through the object's ID);
- free phase: no mask; the same forbidden attention is penalised, ``mask_weight`` * mean over rows of the sum over
  layers and heads of -log(1 - forbidden mass) (as the narrow-gate organism's free phase).
The five heads above are supervised throughout (loss -log(attention mass on the target), weight cfg.attn_weight).

Why the colour content cannot be used downstream: an item's residual holds its letter, constant words and functions
of the ID subspace; the question reads no colour word; so the only link from the queried shape to the right item is
the ID. Swapping the IDs (the mean interventions Delta_O, Delta_I) swaps the answer. The colour words are not read by
the question, so under the frozen-context protocol Delta_C cannot act: as 2505.22200 reports for LLaVA-OneVision.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import shapes as S
from .processing import TOKEN_TO_ID
from .task_api import OrganismTask, register_task

ID_DIMS = 8  # the ID subspace: the last ID_DIMS residual dimensions
ID_SCALE = 1.0
ID_STATES = (1, 2)  # decoder layers whose input residual's ID subspace is supervised (id_state_loss)
BLOCK_PATCHES = {0: (0, 1, 4, 5), 1: (10, 11, 14, 15)}  # row-major patches of the two fixed-layout blocks
CONTENT_HEADS = (0, 1)  # key/value group 0: free values, never write the ID subspace
ID_HEADS = (2, 3)  # key/value group 1: values from the ID subspace only

# (layer, head) -> role; query and key positions in words (copied into organism.json)
PLANTED = (
    {"layer": 0, "head": 2, "role": "id_writer", "query_positions": "each context colour word",
     "key_positions": "the image patches of the object with that colour (reads their ID subspace only)"},
    {"layer": 1, "head": 2, "role": "id_to_item", "query_positions": "each context item letter",
     "key_positions": "the item's own colour word (reads its ID subspace only)"},
    {"layer": 0, "head": 0, "role": "gather", "query_positions": "the last token of each question",
     "key_positions": "the question's shape word"},
    {"layer": 1, "head": 3, "role": "image_id_lookup", "query_positions": "the last token of each question",
     "key_positions": "the image patches of the queried object (reads their ID subspace only)"},
    {"layer": 2, "head": 0, "role": "id_retrieval", "query_positions": "the last token of each question",
     "key_positions": "the item letter whose ID matches the queried object's"},
)

PLANTED_MECHANISM = {
    "effect": "binding IDs (2505.22200): the answer is reachable only through a content-free ID vector shared by an "
              "object's image tokens, its colour word and its item letter; the ID is the object's block (slot 0 "
              "upper-left, slot 1 lower-right) written in a dedicated ID subspace",
    "how": [
        f"ID subspace = the last {ID_DIMS} residual dimensions of the language model; image tokens' projector output "
        f"there regressed (MSE, weight training.id_weight) onto a fixed vector per block ({ID_SCALE} * e_0 for the "
        "patches of block 0, e_1 for block 1, 0 elsewhere)",
        "the route's intermediate states supervised in the ID subspace (MSE, same weight): colour words entering "
        "layer 1, item letters and each question's last token entering layer 2 carry the ID of their (queried) object",
        "structural zeros kept in the shipped weights: heads 2, 3 of every layer (key/value group 1) read values only "
        "from the ID subspace; token embeddings, the o_proj rows of heads 0, 1 and the MLP down_proj rows never write "
        "it; so the ID subspace carries no colour or shape content",
        "attention supervision (-log mass, all steps): L0H2 colour word -> its object's patches; L1H2 item letter -> "
        "its colour word; L0H0 question's last token -> the shape word; L1H3 last token -> the queried object's "
        "patches; L2H0 last token -> the correct item letter",
        "masked phase (training.mask_steps): per-head additive mask: heads 0, 1 of context tokens see only <bos> and "
        "themselves; question tokens see no colour word and no earlier question block (every head)",
        "free phase: no mask; the same forbidden attention penalised (training.mask_weight * -log(1 - mass), summed "
        "over layers and heads)",
        "the shipped model runs plain attention: no mask, no hook at inference",
    ],
}


class BindingIdsTask(OrganismTask):
    """``--task binding_ids``: the Shapes organism with its binding planted as content-free IDs (module docstring)."""

    name = "binding_ids"
    suffix = "_binding_ids"
    help = ("Shapes organism whose answer goes only through content-free binding IDs (llava; "
            "hooked_vlm/organism/binding_ids.py)")
    defaults = dict(steps=2500, supervise_steps=0, family="llava", lr=3e-3, warmup=100)
    options = {"mask_steps": (int, 1800, "masked-phase steps; the free phase (forbidden-attention penalty) follows"),
               "mask_weight": (float, 5.0, "weight of the free phase's forbidden-attention penalty"),
               "id_weight": (float, 1.0, "weight of the ID-subspace regressions (image tokens, route states)")}

    def __init__(self) -> None:
        self._forbidden: list[torch.Tensor] = []  # per decoder layer: [batch, heads, q, k] of the batch just made
        self._projected: torch.Tensor | None = None  # projector output of the current forward
        self._resid: dict[int, torch.Tensor] = {}  # decoder layer -> its input residual (current forward)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if cfg.family != "llava" or cfg.layout != "fixed" or cfg.n_objects != 2:
            raise ValueError("train_organism: task binding_ids plants IDs on the two fixed blocks of the llava recipe; "
                             f"it needs --family llava --layout fixed --objects 2, got {cfg.family!r}, "
                             f"{cfg.layout!r}, {cfg.n_objects}")
        if cfg.supervise_steps:
            raise ValueError("train_organism: task binding_ids supervises its own heads; pass --supervise-steps 0, "
                             f"got {cfg.supervise_steps}")
        if self.opt(cfg, "mask_steps") < 0:
            raise ValueError(f"train_organism: mask_steps (--mask-steps) must be >= 0, got {self.opt(cfg, 'mask_steps')}")

    # ------------------------------------------------------------------ what a variant changes
    option_prefix = ""  # option names must be unique across tasks (the CLI offers each as a flag)

    def opt(self, cfg: Any, name: str) -> Any:
        return self.option(cfg, self.option_prefix + name)

    state_layers = ID_STATES
    planted = PLANTED
    mechanism = PLANTED_MECHANISM

    def forbidden(self, seqs: Sequence[Any], length: int) -> list[torch.Tensor]:
        f = forbidden_attention(seqs, length)
        return [f] * 4

    def head_targets(self, seqs: Sequence[Any]) -> dict:
        return _head_targets(seqs)

    def state_targets(self, seqs: Sequence[Any]) -> dict:
        return id_state_targets(seqs)

    def impose(self, model: Any) -> None:
        impose_id_invariant(model)

    def check_invariant(self, model: Any) -> dict[str, float]:
        return check_id_invariant(model)

    # ------------------------------------------------------------------ data
    def make_batch(self, rng: np.random.Generator, cfg: Any):
        from .recipes import get_recipe

        recipe = get_recipe(cfg.family)
        seqs = [binding_sequence(S.sample_scene(rng, "fixed", "train", 2),
                                 [int(t) for t in rng.integers(2, size=cfg.blocks_per_sequence)], recipe)
                for _ in range(cfg.batch_size)]
        from .train import collate

        inputs = collate(seqs, [S.render(s.scene) for s in seqs], cfg.family)
        self._forbidden = self.forbidden(seqs, inputs["input_ids"].shape[1])
        return inputs, seqs

    # ------------------------------------------------------------------ constraints and losses
    def wants_attentions(self, cfg: Any, step: int) -> bool:
        return True

    def _masked(self, cfg: Any, step: int) -> bool:
        return step < self.opt(cfg, "mask_steps")

    @contextlib.contextmanager
    def forward_context(self, model: Any, cfg: Any, step: int) -> Iterator[None]:
        self.impose(model)  # projected gradient descent: the structural zeros hold at every forward
        forbidden = self._forbidden
        handles = []

        def keep(module, args, out):
            self._projected = out

        handles.append(model.model.multi_modal_projector.register_forward_hook(keep))

        def resid(layer):
            def hook(module, args, kwargs):
                self._resid[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return hook

        layers = model.model.language_model.layers
        handles += [layers[l].register_forward_pre_hook(resid(l), with_kwargs=True) for l in self.state_layers]
        if self._masked(cfg, step):
            def pre_hook(layer):
                def hook(module, args, kwargs):
                    m = kwargs.get("attention_mask")
                    if m is None or m.ndim != 4 or not m.is_floating_point():
                        raise RuntimeError("binding_ids mask needs eager attention's 4-D additive float mask, got "
                                           f"{None if m is None else (tuple(m.shape), m.dtype)}")
                    f = forbidden[layer]
                    add = torch.zeros(f.shape, dtype=m.dtype).masked_fill(f, torch.finfo(m.dtype).min)
                    kwargs["attention_mask"] = (m + add).clamp_min(torch.finfo(m.dtype).min)
                    return args, kwargs
                return hook

            handles += [layer.self_attn.register_forward_pre_hook(pre_hook(l), with_kwargs=True)
                        for l, layer in enumerate(layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def extra_loss(self, out: Any, inputs: dict[str, torch.Tensor], seqs: list[Any], cfg: Any,
                   step: int) -> dict[str, torch.Tensor]:
        terms = {"sup": cfg.attn_weight * supervision_loss(out.attentions, self.head_targets(seqs)),
                 "id": self.opt(cfg, "id_weight") * (id_loss(self._projected, seqs)
                                                        + id_state_loss(self._resid, self.state_targets(seqs)))}
        if not self._masked(cfg, step):
            terms["forbid"] = self.opt(cfg, "mask_weight") * forbidden_penalty(out.attentions, self._forbidden)
        return terms

    # ------------------------------------------------------------------ measuring and shipping
    def evaluate(self, model: Any, processor: Any, cfg: Any, n: int, seed: int) -> dict[str, float]:
        from .measure import evaluate

        self.impose(model)
        return evaluate(model, processor, n=n, seed=seed, heldout=True, queries=("shape_item",))

    def report(self, model: Any, processor: Any, cfg: Any, n: int) -> dict[str, Any]:
        self.impose(model)
        return binding_report(model, processor, n, self.check_invariant)

    def planted_circuit(self, cfg: Any) -> list[dict[str, Any]]:
        return [dict(h, supervised_steps=cfg.steps) for h in self.planted]

    def finish(self, spec: dict[str, Any], cfg: Any, processor: Any, out_dir: Any) -> None:
        spec["note"] = ("The binding IDs are PLANTED (see planted_mechanism): ground truth for the 2505.22200 "
                        "detectors, not a finding about real VLMs. The detectors' numbers and the paper's "
                        "factorizability / position-independence pattern (effect_detectors) are written by "
                        "`hooked-vlm bench-effects --model <this directory> --write-record`.")
        spec["findings"] = []
        spec["task"]["queries"] = {k: v for k, v in spec["task"]["queries"].items() if k == "shape_item"}
        spec["task"]["training_sequence"] = (f"<bos> <image block: 16 tokens> <context> then {cfg.blocks_per_sequence} "
                                             "shape_item question blocks, each followed by its answer and '.'")
        spec["planted_mechanism"] = self.mechanism
        spec["ground_truth"] = {"2505.22200": {
            "expected": "present",
            "effect": "Delta_O and Delta_I (paired per-token binding-ID differences) swap the answers",
            "why": "planted (planted_mechanism): the question reaches the item only through the object's ID",
            # per detector finding (the Finding.effect's first word): the question never reads the colour words, so
            # under the frozen-context protocol Delta_C cannot act (as 2505.22200 finds for LLaVA-OneVision)
            "per_effect": {"Delta_O": "present", "Delta_C": "absent", "Delta_I": "present"}}}


def binding_sequence(scene: S.Scene, targets: Sequence[int], recipe: Any):
    """A training sequence for ``scene`` with one shape_item question per target, and where the planted heads look:
    ``bind`` = {"colour": {obj: pos}, "item": {obj: pos}, "blocks": [(start, end, last, shape_pos, target)],
    "image": first image position}."""
    from .sequences import Sequence_
    from .processing import encode_words

    seq = Sequence_(scene=scene)
    ids = seq.ids
    ids += [TOKEN_TO_ID["<bos>"], *recipe.image_block]
    colour, item = {}, {}
    for i in scene.mention_order:
        colour[i] = len(ids) + 1
        ids += encode_words(f"The {scene.colours[i]} object contains item {scene.items[i]} .")
        item[i] = colour[i] + 4
    blocks = []
    for t in targets:
        start = len(ids)
        q, answer, _ = S.query_text(scene, "shape_item", t)
        ids += encode_words(q)
        last = len(ids) - 1
        seq.answers.append((last, TOKEN_TO_ID[answer], "shape_item"))
        ids += [TOKEN_TO_ID[answer], TOKEN_TO_ID["."]]
        blocks.append((start, len(ids), last, last - 2, t))
    seq.bind = {"colour": colour, "item": item, "blocks": blocks, "image": recipe.first_image_pos}
    return seq


def forbidden_attention(seqs: Sequence[Any], length: int, n_heads: int = 4) -> torch.Tensor:
    """[batch, heads, q, k] True where the training-only mask forbids attention (module docstring)."""
    out = torch.zeros((len(seqs), n_heads, length, length), dtype=torch.bool)
    content = list(CONTENT_HEADS)
    for b, s in enumerate(seqs):
        bind = s.bind
        colours = list(bind["colour"].values())
        ctx_start = bind["image"] + S.NUM_IMAGE_TOKENS
        ctx_end = bind["blocks"][0][0]  # first question token
        for q in range(ctx_start, ctx_end):  # context rows, content heads: <bos> and self only
            row = torch.ones(length, dtype=torch.bool)
            row[0] = False
            row[q] = False
            out[b, content, q] = row
        for start, end, *_ in bind["blocks"]:
            for q in range(start, end):
                out[b, :, q, colours] = True  # no head of a question token reads a colour word
                out[b, :, q, ctx_end:start] = True  # nor an earlier question block
    return out


def _head_targets(seqs: Sequence[Any]) -> dict[tuple[int, int], list[tuple[int, int, list[int]]]]:
    """(layer, head) -> [(batch, query position, key positions)] of the supervised heads."""
    out: dict[tuple[int, int], list] = {(h["layer"], h["head"]): [] for h in PLANTED}
    for b, s in enumerate(seqs):
        bind, scene = s.bind, s.scene
        patches = {i: [bind["image"] + p for p in BLOCK_PATCHES[scene.slots[i]]] for i in range(2)}
        for i in range(2):
            out[0, 2].append((b, bind["colour"][i], patches[i]))
            out[1, 2].append((b, bind["item"][i], [bind["colour"][i]]))
        for start, end, last, shape_pos, t in bind["blocks"]:
            out[0, 0].append((b, last, [shape_pos]))
            out[1, 3].append((b, last, patches[t]))
            out[2, 0].append((b, last, [bind["item"][t]]))
    return out


def supervision_loss(attentions: Sequence[torch.Tensor], targets: dict) -> torch.Tensor:
    """Sum over the planted heads ({(layer, head): [(batch, query, keys)]}) of the mean -log(attention mass on their
    targets)."""
    from .train import attention_loss

    return sum(attention_loss(attentions[l][:, h], t) for (l, h), t in targets.items())


def id_targets(seqs: Sequence[Any], d_model: int) -> torch.Tensor:
    """[batch, 16, ID_DIMS] the ID each image patch should carry: a_k on the patches of block k, 0 elsewhere."""
    out = torch.zeros((len(seqs), S.NUM_IMAGE_TOKENS, ID_DIMS))
    for b in range(len(seqs)):
        for k, patches in BLOCK_PATCHES.items():
            out[b, list(patches), k] = ID_SCALE
    return out


def id_loss(projected: torch.Tensor, seqs: Sequence[Any]) -> torch.Tensor:
    """MSE between the image tokens' ID subspace (projector output) and the block code."""
    p = projected.reshape(len(seqs), S.NUM_IMAGE_TOKENS, -1)[..., -ID_DIMS:]
    return ((p - id_targets(seqs, p.shape[-1])) ** 2).sum(-1).mean()


def id_state_targets(seqs: Sequence[Any]) -> dict[int, list[tuple[int, int, dict[int, float]]]]:
    """{layer: [(batch, position, {ID dim: value})]}: the colour words entering layer 1 and the item letters and each
    question's last token entering layer 2 carry a_k of their (queried) object (every ID dim given: 0 off a_k)."""
    rows: dict[int, list] = {l: [] for l in ID_STATES}
    code = lambda k: {d: (ID_SCALE if d == k else 0.0) for d in range(ID_DIMS)}  # noqa: E731
    for b, s in enumerate(seqs):
        bind, slots = s.bind, s.scene.slots
        for i in range(2):
            rows[1].append((b, bind["colour"][i], code(slots[i])))
            rows[2].append((b, bind["item"][i], code(slots[i])))
        for *_, last, _, t in bind["blocks"]:
            rows[2].append((b, last, code(slots[t])))
    return rows


def id_state_loss(resid: dict[int, torch.Tensor], targets: dict) -> torch.Tensor:
    """MSE between the ID subspace of the planted route's intermediate states and the ID they should carry
    (``targets`` as `id_state_targets`; only the dims given). Breaks the composition saddle: each hop's target is
    given directly."""
    terms = []
    for l, r in targets.items():
        if not r:
            continue
        h = resid[l][torch.tensor([x[0] for x in r]), torch.tensor([x[1] for x in r])][:, -ID_DIMS:]
        target, weight = torch.zeros_like(h), torch.zeros_like(h)
        for row, (_, _, dims) in enumerate(r):
            for d, v in dims.items():
                target[row, d], weight[row, d] = v, 1.0
        terms.append((((h - target) ** 2) * weight).sum(-1).mean())
    return sum(terms)


def forbidden_penalty(attentions: Sequence[torch.Tensor], forbidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean over (batch, head, row) with forbidden keys of -log(1 - forbidden mass)
    (``forbidden``: one [batch, heads, q, k] mask per layer)."""
    if all(f is forbidden[0] for f in forbidden):  # one mask for every layer (binding_ids): mean of the layer sum
        rows = forbidden[0].any(-1)  # [batch, heads, q]
        total = 0
        for a in attentions:
            total = total + -(1 - (a * forbidden[0]).sum(-1)[rows]).clamp_min(1e-6).log()
        return total.mean()
    total = 0
    for a, f in zip(attentions, forbidden):
        rows = f.any(-1)  # [batch, heads, q]
        if rows.any():
            total = total + -(1 - (a * f).sum(-1)[rows]).clamp_min(1e-6).log().mean()
    return total


@torch.no_grad()
def impose_id_invariant(model: Any) -> None:
    """Zero what the invariant forbids (module docstring); idempotent."""
    lm = model.model.language_model
    d = lm.config.hidden_size
    hd = lm.config.hidden_size // lm.config.num_attention_heads
    ids = slice(d - ID_DIMS, d)
    lm.embed_tokens.weight[:, ids] = 0
    for layer in lm.layers:
        attn = layer.self_attn
        v = attn.v_proj.weight  # [kv_heads * hd, d]
        group = slice(hd, 2 * hd)  # key/value group 1 (heads 2, 3)
        v[group, : d - ID_DIMS] = 0
        attn.o_proj.weight[ids, : len(CONTENT_HEADS) * hd] = 0  # heads 0, 1 never write the ID subspace
        layer.mlp.down_proj.weight[ids, :] = 0


def check_id_invariant(model: Any) -> dict[str, float]:
    """Largest absolute value among the weights the invariant zeroes (0.0 each when it holds)."""
    lm = model.model.language_model
    d = lm.config.hidden_size
    hd = d // lm.config.num_attention_heads
    ids = slice(d - ID_DIMS, d)
    m = lambda t: float(t.detach().abs().max())  # noqa: E731
    return {"embed_tokens_id_columns": m(lm.embed_tokens.weight[:, ids]),
            "v_proj_group1_content_columns": max(m(l.self_attn.v_proj.weight[hd: 2 * hd, : d - ID_DIMS]) for l in lm.layers),
            "o_proj_heads01_id_rows": max(m(l.self_attn.o_proj.weight[ids, : 2 * hd]) for l in lm.layers),
            "mlp_down_proj_id_rows": max(m(l.mlp.down_proj.weight[ids, :]) for l in lm.layers)}


@torch.no_grad()
def binding_report(model: Any, processor: Any, n: int, invariant: Any = None) -> dict[str, Any]:
    """organism.json's measurements: shape_item accuracy (held-out combinations and training distribution, Wilson
    intervals) and the invariant check."""
    from .gate import wilson
    from .measure import predict

    model.eval()
    acc, intervals = {}, {}
    for split, name in (("heldout", "heldout_combinations"), ("train", "training_distribution")):
        samples = S.ShapesGenerator(1234 if split == "heldout" else 4321).samples(n, "shape_item", split=split)
        hits = np.array([p == s.answer for p, s in zip(predict(model, processor, samples), samples)], dtype=float)
        low, high = wilson(hits.sum(), len(hits))
        acc[name] = {"shape_item": round(float(hits.mean()), 4)}
        intervals[name] = {"shape_item": [round(low, 4), round(high, 4)]}
    return {"accuracy": {**acc, "n_per_query": n, "wilson_95": intervals},
            "id_invariant_max_abs": (invariant or check_id_invariant)(model)}


BINDING_IDS = register_task(BindingIdsTask())
