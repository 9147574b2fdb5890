"""The Shapes model organism: a tiny trained LLaVA whose binding circuit is partly known.

``load_organism_hf()`` gives the shipped HF model and processor; the generator API
(``ShapesGenerator``, ``make_sample``, ``counterfactual_pair``, ...) makes matching prompts,
counterfactual pairs and held-out samples. Training code lives in ``hooked_vlm.organism.train``
(imported lazily so that using the generator does not import the trainer).
"""

from __future__ import annotations

from pathlib import Path

from .shapes import (
    COLOURS,
    COUNTERFACTUALS,
    EXPECTED_FLIP,
    HELDOUT_TRIPLES,
    ITEMS,
    LAYOUTS,
    NUM_IMAGE_TOKENS,
    QUERIES,
    SHAPES,
    VOCAB,
    Sample,
    Scene,
    ShapesGenerator,
    counterfactual_pair,
    counterfactual_scene,
    heldout_samples,
    make_sample,
    render,
    sample_scene,
    training_samples,
)

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "checkpoints" / "shapes_llava"


def load_organism_hf(path: str | Path | None = None, attn_implementation: str = "eager"):
    """(LlavaForConditionalGeneration, LlavaProcessor) of the shipped organism, in eval mode.

    Eager attention by default so that ``output_attentions=True`` returns the patterns (sdpa
    returns none silently).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else ORGANISM_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no organism checkpoint at {path}; train one with `hooked-vlm train-organism --out {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


__all__ = [
    "ORGANISM_DIR", "load_organism_hf", "COLOURS", "SHAPES", "ITEMS", "QUERIES", "LAYOUTS", "VOCAB",
    "HELDOUT_TRIPLES", "COUNTERFACTUALS", "EXPECTED_FLIP", "NUM_IMAGE_TOKENS", "Scene", "Sample",
    "ShapesGenerator", "render", "sample_scene", "make_sample", "counterfactual_scene",
    "counterfactual_pair", "heldout_samples", "training_samples",
]
