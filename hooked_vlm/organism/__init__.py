"""The Shapes model organism: a tiny trained LLaVA whose binding circuit is partly known.

``load_organism()`` gives a shipped organism as a HookedVLM, ``load_organism_hf()`` the HF model and
processor; the generator API
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

CHECKPOINTS: Path = Path(__file__).resolve().parent / "checkpoints"
ORGANISM_DIR: Path = CHECKPOINTS / "shapes_llava"


def organism_dir(name: str | Path | None = None) -> Path:
    """Directory of a shipped organism by name ("shapes_llava", "shapes_qwen2_vl", ...), or ``name``
    itself when it is a path. ``None`` gives the default LLaVA organism."""
    if name is None:
        return ORGANISM_DIR
    path = Path(name)
    if (path / "config.json").exists():
        return path
    shipped = CHECKPOINTS / str(name)
    if (shipped / "config.json").exists():
        return shipped
    available = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "config.json").exists())
    raise FileNotFoundError(
        f"no organism checkpoint at {name!r}; shipped organisms: {available}; "
        f"train one with `hooked-vlm train-organism --out DIR`"
    )


def shipped_organisms(kind: str | None = None) -> list[str]:
    """Names of the organisms shipped with the package (directories under CHECKPOINTS with an organism.json).

    kind: None (all), "circuit" (the Shapes organisms whose planted_circuit holds the three planted heads) or
    "effect" (organisms with one paper's effect planted, whose organism.json has a planted_mechanism)."""
    import json

    if kind not in (None, "circuit", "effect"):
        raise ValueError(f"shipped_organisms: kind must be None, 'circuit' or 'effect', got {kind!r}")
    names = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "organism.json").exists())
    if kind is None:
        return names
    effect = {n for n in names if "planted_mechanism" in json.loads((CHECKPOINTS / n / "organism.json").read_text())}
    return sorted(effect) if kind == "effect" else [n for n in names if n not in effect]


def organism_record(path: str | Path | None = None) -> dict:
    """The organism.json of an organism (planted circuit, accuracies, family)."""
    import json

    return json.loads((organism_dir(path) / "organism.json").read_text())


def load_organism_hf(path: str | Path | None = None, attn_implementation: str = "eager"):
    """(HF model, processor) of a Shapes organism (default: the shipped LLaVA one), in eval mode.

    The family comes from organism.json; the processor is built in code (the Qwen2-VL one has no
    video processor, so no torchvision). Eager attention by default so that
    ``output_attentions=True`` returns the patterns (sdpa returns none silently).
    """
    from .recipes import get_recipe

    path = organism_dir(path)
    recipe = get_recipe(organism_record(path).get("family", "llava"))
    model = recipe.model_class().from_pretrained(path, attn_implementation=attn_implementation)
    return model.eval(), recipe.build_processor()


def load_organism(path: str | Path | None = None, strict: bool = True, **kwargs):
    """A ``HookedVLM`` of a Shapes organism with its processor attached (``kwargs`` go to
    ``HookedVLM.from_pretrained``, e.g. ``dtype``). Strict like ``from_pretrained``: a checkpoint whose tensors
    do not match its config.json raises naming them; ``strict=False`` only forgives unused tensors (with a warning)."""
    from ..model import HookedVLM
    from .recipes import get_recipe

    path = organism_dir(path)
    processor = get_recipe(organism_record(path).get("family", "llava")).build_processor()
    return HookedVLM.from_pretrained(str(path), processor=processor, strict=strict, **kwargs)


__all__ = [
    "ORGANISM_DIR", "CHECKPOINTS", "organism_dir", "organism_record", "shipped_organisms", "load_organism", "load_organism_hf", "COLOURS", "SHAPES", "ITEMS", "QUERIES", "LAYOUTS", "VOCAB",
    "HELDOUT_TRIPLES", "COUNTERFACTUALS", "EXPECTED_FLIP", "NUM_IMAGE_TOKENS", "Scene", "Sample",
    "ShapesGenerator", "render", "sample_scene", "make_sample", "counterfactual_scene",
    "counterfactual_pair", "heldout_samples", "training_samples",
]
