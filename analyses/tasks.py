"""The Shapes task (the organism's synthetic scenes), in one module: samples -> model inputs, answer ids and
metrics, and the Shapes-specific position sets. Paper modules never import it; it sits beside the demo."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from jaxtyping import Bool

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
def predictions(model: Any, batch: Batch, chunk: int = 256) -> Tensor:
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
