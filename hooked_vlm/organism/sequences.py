"""Token sequences of the Shapes organism's training data, and where its planted heads look (the planted circuit
is described in hooked_vlm/organism/train.py and recorded in organism.json)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from . import shapes as S
from .processing import TOKEN_TO_ID, encode_words
from .recipes import get_recipe

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
class Sequence_:
    """Token ids plus where the answers and the planted-head targets are."""

    ids: list[int] = field(default_factory=list)
    answers: list[tuple[int, int, str]] = field(default_factory=list)  # (last prompt pos, answer id, query)
    sup: dict[int, list[tuple[int, list[int]]]] = field(default_factory=lambda: {0: [], 1: [], 2: []})
    scene: Optional[S.Scene] = None


def build_sequence(scene: S.Scene, blocks: Sequence[tuple[str, int]], with_answers: bool = True,
                   family: str = "llava") -> Sequence_:
    """Token sequence for ``scene`` with question ``blocks`` [(query, target), ...] in ``family``'s format.

    With ``with_answers=False`` and one block, ``ids`` equal the processor's output for
    ``make_sample(scene, query, target).prompt`` (tested), so the planted-head positions returned
    here can be used on evaluation samples too. ``sup[layer]`` lists (query pos, key positions).
    """
    recipe = get_recipe(family)
    seq = Sequence_(scene=scene)
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
