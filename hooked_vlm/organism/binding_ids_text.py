"""The two-ID binding organism (``--task binding_ids_text``): like ``binding_ids`` (hooked_vlm/organism/binding_ids.py)
but the question also passes through the colour words, so that all three of 2505.22200's mean interventions (Delta_O,
Delta_C, Delta_I) can act under the frozen-context protocol.

Two content-free IDs in the ID subspace (the last 8 residual dims): the image ID a_k (the object's block; ID dims 0, 1)
and the text ID t_m (the sentence the context mentions it in; ID dims 2, 3). Route:
- L0H2 (values from the ID subspace only): each colour word reads a_k from its object's patches;
- L0H1 (the order head, the one content head allowed to write the ID subspace): every text token after the image
  attends only to <bos> and the context's sentence-final '.' tokens (training mask, then penalty), so its output says
  which sentence it is in: t_m at the colour word and the item of sentence m;
- the question: L0H0 gathers the shape word; L1H3 reads a of the queried object's patches; L2H2 (keys and values
  from the ID subspace only) finds the colour word whose a matches and reads its t; L3H0 retrieves the item whose t
  matches and copies the letter.
So Delta_O (a at the image), Delta_C (t at the colour word, the paper's pairing swaps the sentence order) and Delta_I
(t at the item) each swap the answer. Colour content never reaches an item, and the question compares colour words by
a only (L2 group-1 keys read the ID subspace only).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from . import binding_ids as B
from . import shapes as S
from .task_api import register_task

A_DIMS, T_DIMS = (0, 1), (2, 3)  # within the ID subspace
ORDER_HEAD = (0, 1)  # (layer, head) that writes t
MATCH_LAYER = 2  # group-1 keys there read the ID subspace only

PLANTED = (
    {"layer": 0, "head": 2, "role": "image_id_writer", "query_positions": "each context colour word",
     "key_positions": "the image patches of the object with that colour (reads their ID subspace only)"},
    {"layer": 0, "head": 1, "role": "order_id_writer", "query_positions": "every text token after the image",
     "key_positions": "<bos> and the context's sentence-final '.' tokens only (masked, then penalised)"},
    {"layer": 0, "head": 0, "role": "gather", "query_positions": "the last token of each question",
     "key_positions": "the question's shape word"},
    {"layer": 1, "head": 3, "role": "image_id_lookup", "query_positions": "the last token of each question",
     "key_positions": "the image patches of the queried object (reads their ID subspace only)"},
    {"layer": 2, "head": 2, "role": "colour_by_image_id", "query_positions": "the last token of each question",
     "key_positions": "the colour word whose image ID matches (keys and values from the ID subspace only)"},
    {"layer": 3, "head": 0, "role": "item_by_text_id", "query_positions": "the last token of each question",
     "key_positions": "the item letter whose text ID matches"},
)

PLANTED_MECHANISM = {
    "effect": "binding IDs (2505.22200) with two content-free IDs: an image ID (the object's block) shared by the "
              "object's patches and its colour word, and a text ID (the sentence) shared by the colour word and the "
              "item; the question goes object -> colour word (image ID) -> item (text ID)",
    "how": [
        "ID subspace = the last 8 residual dims; image ID in its dims 0-1, text ID in dims 2-3; image tokens' projector "
        "output there regressed onto the block code (MSE); the route's states regressed onto their IDs (colour words "
        "and items entering layer 1; the question's last token: image ID entering layer 2, text ID entering layer 3)",
        "structural zeros kept in the shipped weights: heads 2-3 (key/value group 1) read values only from the ID "
        "subspace, and in layer 2 their keys too; no writer of the ID subspace but group 1 and L0H1 (token "
        "embeddings, the other content heads' o_proj rows and the MLP down_proj rows there are zero)",
        "training-only per-head mask (training.mask_steps steps), then the same attention penalised: heads 0-1 of "
        "context tokens see only <bos> and themselves, except L0H1 which every text token after the image may use "
        "only on <bos> and the context's '.' tokens; question tokens' heads 0-1 see no colour word; no question "
        "token sees an earlier question block",
        "attention supervision (-log mass, all steps) on the six planted heads (planted_circuit)",
        "the shipped model runs plain attention: no mask, no hook at inference",
    ],
}


def _code(dims: Sequence[int], k: int) -> dict[int, float]:
    return {d: (B.ID_SCALE if i == k else 0.0) for i, d in enumerate(dims)}


class BindingIdsTextTask(B.BindingIdsTask):
    """``--task binding_ids_text``: two IDs, the question passes through the colour words (module docstring)."""

    name = "binding_ids_text"
    suffix = "_binding_ids_text"
    help = ("Shapes organism with two content-free binding IDs (image and text) so that Delta_O, Delta_C and Delta_I "
            "all act (llava; hooked_vlm/organism/binding_ids_text.py)")
    option_prefix = "text_"
    options = {"text_mask_steps": (int, 1800, "masked-phase steps; the free phase (forbidden-attention penalty) follows"),
               "text_mask_weight": (float, 5.0, "weight of the free phase's forbidden-attention penalty"),
               "text_id_weight": (float, 1.0, "weight of the ID-subspace regressions (image tokens, route states)")}
    state_layers = (1, 2, 3)
    planted = PLANTED
    mechanism = PLANTED_MECHANISM

    def forbidden(self, seqs: Sequence[Any], length: int) -> list[torch.Tensor]:
        base = B.forbidden_attention(seqs, length)
        for b, s in enumerate(seqs):
            bind = s.bind
            colours = list(bind["colour"].values())
            for start, end, *_ in bind["blocks"]:
                for h in B.ID_HEADS:  # group 1 of questions may read colour words (their ID subspace)
                    base[b, h, start:end, colours] = False
        layer0 = base.clone()
        for b, s in enumerate(seqs):
            bind = s.bind
            first_text = bind["image"] + S.NUM_IMAGE_TOKENS
            stops = [p + 5 for p in bind["colour"].values()]  # each context sentence's '.'
            end = bind["blocks"][-1][1]
            row = torch.ones(length, dtype=torch.bool)
            row[[0, *stops]] = False
            layer0[b, ORDER_HEAD[1], first_text:end] = row
        return [layer0, base, base, base]

    def head_targets(self, seqs: Sequence[Any]) -> dict:
        out: dict[tuple[int, int], list] = {(0, 2): [], (0, 0): [], (1, 3): [], (2, 2): [], (3, 0): []}
        for b, s in enumerate(seqs):
            bind, scene = s.bind, s.scene
            patches = {i: [bind["image"] + p for p in B.BLOCK_PATCHES[scene.slots[i]]] for i in range(2)}
            for i in range(2):
                out[0, 2].append((b, bind["colour"][i], patches[i]))
            for start, end, last, shape_pos, t in bind["blocks"]:
                out[0, 0].append((b, last, [shape_pos]))
                out[1, 3].append((b, last, patches[t]))
                out[2, 2].append((b, last, [bind["colour"][t]]))
                out[3, 0].append((b, last, [bind["item"][t]]))
        return out

    def state_targets(self, seqs: Sequence[Any]) -> dict:
        rows: dict[int, list] = {1: [], 2: [], 3: []}
        for b, s in enumerate(seqs):
            bind, scene = s.bind, s.scene
            order = {i: scene.mention_order.index(i) for i in range(2)}
            for i in range(2):
                rows[1].append((b, bind["colour"][i], {**_code(A_DIMS, scene.slots[i]), **_code(T_DIMS, order[i])}))
                rows[1].append((b, bind["item"][i], {**_code(A_DIMS, -1), **_code(T_DIMS, order[i])}))
            for *_, last, _, t in bind["blocks"]:
                rows[2].append((b, last, _code(A_DIMS, scene.slots[t])))
                rows[3].append((b, last, _code(T_DIMS, order[t])))
        return rows

    def impose(self, model: Any) -> None:
        impose_text_invariant(model)

    def check_invariant(self, model: Any) -> dict[str, float]:
        return check_text_invariant(model)

    def finish(self, spec: dict[str, Any], cfg: Any, processor: Any, out_dir: Any) -> None:
        super().finish(spec, cfg, processor, out_dir)
        spec["ground_truth"]["2505.22200"]["effect"] = ("Delta_O, Delta_C and Delta_I (paired per-token binding-ID "
                                                       "differences) each swap the answers")
        spec["ground_truth"]["2505.22200"]["per_effect"] = {"Delta_O": "present", "Delta_C": "present",
                                                           "Delta_I": "present"}


@torch.no_grad()
def impose_text_invariant(model: Any) -> None:
    """binding_ids' invariant, except that L0H1 may write the ID subspace; plus ID-only keys for layer-2 group 1."""
    lm = model.model.language_model
    d = lm.config.hidden_size
    hd = d // lm.config.num_attention_heads
    o = lm.layers[ORDER_HEAD[0]].self_attn.o_proj.weight
    keep = o[d - B.ID_DIMS:, ORDER_HEAD[1] * hd:(ORDER_HEAD[1] + 1) * hd].clone()
    B.impose_id_invariant(model)
    o[d - B.ID_DIMS:, ORDER_HEAD[1] * hd:(ORDER_HEAD[1] + 1) * hd] = keep
    lm.layers[MATCH_LAYER].self_attn.k_proj.weight[hd:2 * hd, : d - B.ID_DIMS] = 0


def check_text_invariant(model: Any) -> dict[str, float]:
    lm = model.model.language_model
    d = lm.config.hidden_size
    hd = d // lm.config.num_attention_heads
    ids = slice(d - B.ID_DIMS, d)
    m = lambda t: float(t.detach().abs().max())  # noqa: E731
    o_rows = [m(l.self_attn.o_proj.weight[ids, : 2 * hd]) for l in lm.layers[1:]]
    o_rows.append(m(lm.layers[0].self_attn.o_proj.weight[ids, :hd]))
    return {"embed_tokens_id_columns": m(lm.embed_tokens.weight[:, ids]),
            "v_proj_group1_content_columns": max(m(l.self_attn.v_proj.weight[hd: 2 * hd, : d - B.ID_DIMS])
                                                 for l in lm.layers),
            "o_proj_content_heads_id_rows_except_L0H1": max(o_rows),
            "mlp_down_proj_id_rows": max(m(l.mlp.down_proj.weight[ids, :]) for l in lm.layers),
            "k_proj_layer2_group1_content_columns": m(lm.layers[MATCH_LAYER].self_attn.k_proj.weight[hd:2 * hd,
                                                                                                  : d - B.ID_DIMS])}


BINDING_IDS_TEXT = register_task(BindingIdsTextTask())
