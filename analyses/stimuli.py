"""The four papers' stimulus sets, rendered at any model's resolution and tokenised by that model's own processor,
so the same analysis calls run on a real checkpoint as on the Shapes organism (whose own task, with its tiny
vocabulary, lives in hooked_vlm/organism/shapes.py).

Every generator is deterministic given `seed` and returns `Stimulus` objects: the image(s), the user text, the
answer and its competitors, and per object its colour, shape, pixel box and order labels (left/middle/right, top/
bottom), so that position sets come from `TokenLayout.in_box` on the object's box, never from a fixed geometry.

- `binding_id_scenes` (2505.22200): two objects placed in the paper's blocks of a 27 x 27 patch grid (object 0
  rows 3-7, cols 6-10; object 1 rows 6-10, cols 20-24), scaled to `image_size`; the item context and the
  question "Which item does the {shape} contain?", completed by "The {shape} contains item" -> the letter. Both
  objects are asked about (`target` 0 and 1).
- `spatial_scenes` (2603.22278): two or three squares in a row (left / middle / right) of distinct colours, the
  question "What colour is the square on the {left|middle|right}?" -> the colour; `colour_reversed` gives the
  counterfactual with the colours in reverse order (positions kept), the one criss-cross patching interchanges
  regions with.
- `scene_descriptions` (2506.15871): no text context; "In this image there is a {colour} {shape} and a" -> the
  other object's colour.
- `short_answers` (2412.06646): VQA-style "What colour is the {shape}? Answer with one word." -> the colour.

`to_inputs(processor, stimuli)` wraps each text in the processor's chat template when it has one (image first,
then the text, then the generation prompt, then the answer prefix for completion-style prompts) and returns the
processor's batch (left padding is the tokenizer's choice). `answer_ids(tokenizer, stimuli)` gives the first token
of each answer as the model would write it after the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 80, 230), "cyan": (0, 215, 215), "green": (40, 170, 40),
    "purple": (145, 45, 200), "red": (220, 35, 35), "yellow": (235, 220, 30),
}
SHAPES: tuple[str, ...] = ("cone", "cube", "cylinder", "sphere")
ITEMS: tuple[str, ...] = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ")
BACKGROUND = (128, 128, 128)
ORDER = ("left", "middle", "right")
# 2505.22200: object blocks on the 27 x 27 patch grid, (row0, col0, row1, col1) inclusive
BINDING_BLOCKS: tuple[tuple[int, int, int, int], ...] = ((3, 6, 7, 10), (6, 20, 10, 24))
BINDING_GRID = 27


@dataclass
class SceneObject:
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the image, for TokenLayout.in_box
    order: str = ""  # left / middle / right along x (spatial scenes)


@dataclass
class Stimulus:
    """One prompt: `image`, the user `text`, the `answer_prefix` the assistant turn starts with (completion-style
    prompts), the `answer` and `wrong` competitors (one per other object), the queried object `target`, and the
    scene's `objects`."""

    image: Image.Image
    text: str
    answer: str
    wrong: list[str]
    target: int
    objects: list[SceneObject]
    answer_prefix: str = ""
    task: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def target_box(self) -> tuple[float, float, float, float]:
        return self.objects[self.target].box


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape in ("cube", "square"):
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "sphere":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "cylinder":
        w = x1 - x0
        draw.rounded_rectangle([x0 + 0.15 * w, y0, x1 - 0.15 * w, y1], radius=0.25 * w, fill=fill)
    elif shape == "cone":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + ('square',)}")


def render(objects: Sequence[SceneObject], image_size: int | tuple[int, int]) -> Image.Image:
    """Draw the objects (boxes in image fractions) on a grey canvas of `image_size` (side, or (width, height))."""
    w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
    if w < 8 or h < 8:
        raise ValueError(f"image_size: expected at least 8 px per side, got {(w, h)}")
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw(draw, o.shape, (o.box[0] * w, o.box[1] * h, o.box[2] * w - 1, o.box[3] * h - 1), COLOURS[o.colour])
    return img


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of stimuli, got {n!r}")


def binding_id_scenes(n: int, image_size: int = 384, seed: int = 0, targets: Sequence[int] = (0, 1)) -> list[Stimulus]:
    """2505.22200's shapes task: `n` scenes, each asked about every object in `targets` (so len = n * len(targets))."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colours = [str(c) for c in rng.choice(list(COLOURS), 2, replace=False)]
        shapes = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]
        items = [str(i) for i in rng.choice(ITEMS, 2, replace=False)]
        objects = [SceneObject(c, s, (c0 / BINDING_GRID, r0 / BINDING_GRID, (c1 + 1) / BINDING_GRID, (r1 + 1) / BINDING_GRID))
                   for c, s, (r0, c0, r1, c1) in zip(colours, shapes, BINDING_BLOCKS)]
        image = render(objects, image_size)
        context = " ".join(f"The {colours[i]} object contains item {items[i]}." for i in (0, 1))
        for t in targets:
            out.append(Stimulus(
                image, f"Context: {context} Question: Which item does the {shapes[t]} contain?", items[t],
                [items[1 - t]], t, objects, answer_prefix=f"Answer: The {shapes[t]} contains item", task="binding_ids",
                meta={"items": items},
            ))
    return out


def spatial_scenes(n: int, n_objects: int = 3, image_size: int = 384, seed: int = 0) -> list[Stimulus]:
    """2603.22278's squares in a row: object k is the k-th from the left (`order` label); one question per scene
    about a random position."""
    _check_n(n)
    if n_objects not in (2, 3):
        raise ValueError(f"n_objects: expected 2 or 3 squares, got {n_objects}")
    rng = np.random.default_rng(seed)
    names = ORDER if n_objects == 3 else ("left", "right")
    out = []
    for _ in range(n):
        colours = [str(c) for c in rng.choice(list(COLOURS), n_objects, replace=False)]
        side = 0.8 / (2 * n_objects)
        y0 = float(rng.uniform(0.2, 0.8 - 2 * side))
        jitter = min(0.05, 0.5 / n_objects - side - 0.01)  # keeps every square inside the image
        objects = []
        for k in range(n_objects):
            cx = (k + 0.5) / n_objects + float(rng.uniform(-jitter, jitter))
            objects.append(SceneObject(colours[k], "square", (cx - side, y0, cx + side, y0 + 2 * side), names[k]))
        t = int(rng.integers(n_objects))
        out.append(Stimulus(render(objects, image_size), f"What colour is the square on the {names[t]}? Answer with one word.",
                            colours[t], [colours[k] for k in range(n_objects) if k != t], t, objects, task="spatial"))
    return out


def colour_reversed(stimulus: Stimulus, image_size: int | None = None) -> Stimulus:
    """The counterfactual of criss-cross patching: the same squares with their colours in reverse order, so the
    square at each position has another colour and each colour sits at another position. Its answer is the colour
    now at the queried position."""
    objects = [SceneObject(o.colour, o.shape, o.box, o.order) for o in stimulus.objects]
    for o, c in zip(objects, [o.colour for o in stimulus.objects][::-1]):
        o.colour = c
    size = image_size or stimulus.image.size
    t = stimulus.target
    return Stimulus(render(objects, size), stimulus.text, objects[t].colour,
                    [o.colour for k, o in enumerate(objects) if k != t], t, objects, stimulus.answer_prefix,
                    stimulus.task, dict(stimulus.meta, counterfactual="colour_reversed"))


def scene_descriptions(n: int, image_size: int = 384, seed: int = 0) -> list[Stimulus]:
    """2506.15871's scene description: two objects anywhere (non-overlapping); the text names one -> the other's
    colour."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colours = [str(c) for c in rng.choice(list(COLOURS), 2, replace=False)]
        shapes = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]
        side = 0.3
        x = [float(rng.uniform(0.02, 0.48 - side)), float(rng.uniform(0.52, 0.98 - side))]
        if rng.random() < 0.5:
            x = x[::-1]
        objects = [SceneObject(colours[i], shapes[i], (x[i], y, x[i] + side, y + side))
                   for i, y in enumerate(float(rng.uniform(0.02, 0.98 - side)) for _ in range(2))]
        t = int(rng.integers(2))
        named = 1 - t
        out.append(Stimulus(render(objects, image_size), "Describe the image.", colours[t], [colours[named]], t, objects,
                            answer_prefix=f"In this image there is a {colours[named]} {shapes[named]} and a",
                            task="scene_description"))
    return out


def short_answers(n: int, image_size: int = 384, seed: int = 0) -> list[Stimulus]:
    """2412.06646-style short-answer VQA on two-object scenes: "What colour is the {shape}?" -> the colour."""
    _check_n(n)
    out = []
    for s in scene_descriptions(n, image_size, seed + 10_000):
        o = s.objects[s.target]
        out.append(Stimulus(s.image, f"What colour is the {o.shape}? Answer with one word.", o.colour,
                            [p.colour for p in s.objects if p is not o], s.target, s.objects, task="short_answer"))
    return out


def chat_text(processor: Any, stimulus: Stimulus) -> str:
    """The full prompt text for one stimulus: the processor's chat template (user turn = the image, then the text;
    then the generation prompt) followed by the answer prefix; without a template, "<image token> text prefix"."""
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": stimulus.text}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        token = getattr(processor, "image_token", None) or getattr(getattr(processor, "tokenizer", None), "image_token", None)
        if token is None:
            raise ValueError("the processor has neither a chat template nor an image_token; pass text yourself")
        text = f"{token} {stimulus.text}"
    return f"{text}{' ' if stimulus.answer_prefix and not template else ''}{stimulus.answer_prefix}"


def to_inputs(processor: Any, stimuli: Sequence[Stimulus], **kwargs: Any) -> dict[str, Any]:
    """The processor's batch for these stimuli (`return_tensors="pt"`, padding on), one image per prompt."""
    if not stimuli:
        raise ValueError("to_inputs: expected at least one stimulus, got none")
    texts = [chat_text(processor, s) for s in stimuli]
    return dict(processor(images=[s.image for s in stimuli], text=texts, return_tensors="pt", padding=True, **kwargs))


def answer_ids(tokenizer: Any, stimuli: Sequence[Stimulus], prompts: Sequence[str] | None = None) -> tuple[list[int], list[list[int]]]:
    """(answer token id per stimulus, competitor ids per stimulus): the first token the model would write for the
    answer right after the prompt (with a leading space where the tokenizer marks word starts: we tokenize
    prompt + " " + answer and take the first token past the prompt)."""
    def first_new(prompt: str, word: str) -> int:
        base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(f"{prompt} {word}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise ValueError(f"could not isolate the answer {word!r}: the tokenizer merges it with the prompt's end")
        return full[len(base)]

    prompts = prompts or [s.answer_prefix or s.text for s in stimuli]
    return ([first_new(p, s.answer) for p, s in zip(prompts, stimuli)],
            [[first_new(p, w) for w in s.wrong] for p, s in zip(prompts, stimuli)])
