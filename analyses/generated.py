"""The narrow gate (arXiv 2412.06646) measured on GENERATED text, as the paper does: the attention knockout and the
end-of-image steering are applied while the model generates (prefill and every decode step, through
`hooked_vlm.generation`), and the generated answers / captions are scored.

Scores (both stated in every table that uses them):
* **exact match** (short answers): the generated text is stripped and its first whitespace-separated word is
  compared with the expected answer word. (The Shapes organism answers with one word; what follows is untrained.)
* **unigram F1** (captions): bag-of-words overlap of two texts, F1 = 2PR / (P + R) with P = |common| / |candidate|,
  R = |common| / |reference| counted with multiplicity (words split on whitespace, lower-cased); 1 = same words.
  The reference is the unedited generation unless references are given.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from hooked_vlm.generation import knockout_attention, steer

from .narrow_gate import KNOCKOUT_CONDITIONS, key_positions, random_key_count


def new_texts(model: Any, tokens: Tensor, n_prompt: int) -> list[str]:
    """The generated part of each row of `generate`'s output, decoded (special tokens skipped)."""
    return model.tokenizer.batch_decode(tokens[:, n_prompt:], skip_special_tokens=True)


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0] if words else ""


def exact_match(texts: Sequence[str], answers: Sequence[str]) -> Tensor:
    """bool [n]: stripped text's first word == answer."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
    return torch.tensor([first_word(t) == a.strip() for t, a in zip(texts, answers)])


def unigram_f1(candidate: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (see the module docstring); 1.0 when both are empty."""
    c, r = Counter(candidate.lower().split()), Counter(reference.lower().split())
    if not c and not r:
        return 1.0
    common = sum((c & r).values())
    if common == 0:
        return 0.0
    p, rec = common / sum(c.values()), common / sum(r.values())
    return 2 * p * rec / (p + rec)


def _conditions(conditions: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    return dict(conditions) if isinstance(conditions, Mapping) else {str(c): c for c in conditions}


@torch.no_grad()
def generate_under_knockout(
    model: Any, inputs: dict[str, Any], conditions: Sequence[Any] | Mapping[str, Any] = KNOCKOUT_CONDITIONS, *,
    max_new_tokens: int = 3, queries: Any = "text", layers: Any = None, seed: int = 0, renormalize: bool = False,
) -> dict[str, list[str]]:
    """{"baseline": texts, label: texts, ...}: greedy generations with attention from `queries` (default the text
    after the image and every generated token) to each condition's keys (see `narrow_gate.key_positions`) knocked
    out in every layer (or `layers`), in the prefill and in every decode step."""
    n_prompt = inputs["input_ids"].shape[1]
    layout = model.layout(inputs)
    out = {"baseline": new_texts(model, model.generate(**inputs, max_new_tokens=max_new_tokens), n_prompt)}
    for label, spec in _conditions(conditions).items():
        hooks = knockout_attention(queries, key_positions(layout, spec, seed), layers=layers, renormalize=renormalize)
        out[label] = new_texts(model, model.generate(**inputs, max_new_tokens=max_new_tokens, fwd_hooks=hooks), n_prompt)
    return out


def answer_table(texts: Mapping[str, Sequence[str]], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match rate per condition of `generate_under_knockout`'s output."""
    return {label: float(exact_match(t, answers).float().mean()) for label, t in texts.items()}


def caption_table(texts: Mapping[str, Sequence[str]], references: Sequence[str] | None = None) -> dict[str, float]:
    """Mean unigram F1 per condition against `references` (default: the baseline generations)."""
    refs = list(texts["baseline"]) if references is None else list(references)
    return {label: sum(unigram_f1(c, r) for c, r in zip(t, refs)) / len(refs) for label, t in texts.items()}


@dataclass
class GeneratedSteering:
    """`steer_generation`'s outcome: texts with and without steering, and exact-match rates against the source
    image's answers (`to_source`) and the prompt's own answers (`kept`)."""

    texts: list[str]
    base_texts: list[str]
    to_source: float
    kept: float


@torch.no_grad()
def steer_generation(
    model: Any, inputs: dict[str, Any], source_inputs: dict[str, Any], source_answers: Sequence[str],
    answers: Sequence[str] | None = None, *, max_new_tokens: int = 3, layers: Sequence[int] | None = None,
) -> GeneratedSteering:
    """The paper's steering on generated answers: the residual stream (resid_pre) at the end-of-image token of
    every layer (or `layers`) is overwritten with its value from `source_inputs` (the same prompts with another
    image) during the prefill; the decode steps then read the steered keys/values from the cache."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    rows = torch.arange(inputs["input_ids"].shape[0])
    s_eoi = model.layout(source_inputs).end_of_image().int().argmax(1)
    _, cache = model.run_with_cache(**source_inputs, names_filter=names)
    vectors = {name: cache[name][rows, s_eoi] for name in names}
    target = model.layout(inputs).end_of_image()
    n_prompt = inputs["input_ids"].shape[1]
    base = new_texts(model, model.generate(**inputs, max_new_tokens=max_new_tokens), n_prompt)
    steered = new_texts(model, model.generate(**inputs, max_new_tokens=max_new_tokens,
                                              fwd_hooks=steer(names, target, vectors, mode="set")), n_prompt)
    kept = float(exact_match(steered, answers).float().mean()) if answers is not None else float("nan")
    return GeneratedSteering(steered, base, float(exact_match(steered, source_answers).float().mean()), kept)


def generated_section(model: Any, report: Any, n: int, seed: int, scene_layout: str = "fixed") -> dict[str, Any]:
    """The demo's "generated answers under knockout" section: exact match of generated shape -> item answers and
    unigram F1 of generated scene captions under each knockout, and a few steered generations."""
    from hooked_vlm.organism import ShapesGenerator

    from .tasks import encode

    n = min(n, 32)
    samples = ShapesGenerator(seed + 41, scene_layout).samples(n, "shape_item", split="heldout")
    batch = encode(model.processor, samples)
    k = random_key_count(model.layout(batch.inputs), 0.02)  # the paper's ~2% of the image tokens
    conditions = {"end-of-image token": "end_of_image", "last image token": "last_image_token",
                  f"{k} random image tokens": f"random_{k}", "all image tokens": "all_image"}
    answers = generate_under_knockout(model, batch.inputs, conditions, max_new_tokens=3, seed=seed)
    em = answer_table(answers, [s.answer for s in samples])
    scenes = ShapesGenerator(seed + 43, scene_layout).samples(n, "scene", split="heldout")
    captions = generate_under_knockout(model, encode(model.processor, scenes).inputs, conditions, max_new_tokens=6,
                                       seed=seed)
    f1 = caption_table(captions)
    scene_em = answer_table(captions, [s.answer for s in scenes])
    rows = [dict(condition=c, shape_item_exact_match=em[c], caption_first_word_exact_match=scene_em[c],
                 caption_unigram_f1_vs_unedited=f1[c]) for c in em]
    pairs = ShapesGenerator(seed + 47, scene_layout).pairs(min(n, 16), "swap_shapes", "shape_item", split="heldout")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    st = steer_generation(model, clean.inputs, cf.inputs, [p[1].answer for p in pairs], [p[0].answer for p in pairs])
    examples = [dict(prompt=p[0].prompt.replace("<image>", "").strip()[-60:], unedited=b, steered=s, source_answer=p[1].answer)
                for p, b, s in list(zip(pairs, st.base_texts, st.texts))[:4]]
    report.add("Narrow gate on generated text",
               f"Greedy generation ({n} held-out prompts, KV cache, hooks live in prefill and decode). Knockout as above "
               "(text after the image and every generated token -> the chosen image keys, all layers, no "
               "renormalisation). Shape -> item: exact match of the first generated word (3 tokens generated). "
               "Captions: 6 tokens after 'In this image there is a {colour} {shape} and a'; first-word exact match "
               "with the other object's colour, and unigram F1 (bag-of-words, with multiplicity) against the "
               "unedited generation. Only the first word is trained; later words are the organism's free "
               "continuation.", rows=rows)
    report.add("Narrow gate: steered generations",
               "The end-of-image residual stream (all layers) is overwritten during the prefill with its value on the "
               f"same prompt with the shapes swapped. Generated answers equal to the swapped image's answer: "
               f"<b>{st.to_source:.3f}</b>; still the prompt's own answer: {st.kept:.3f}. Examples:", rows=examples)
    return dict(exact_match=em, caption_first_word=scene_em, caption_f1=f1, steering_to_source=st.to_source,
                steering_kept=st.kept, examples=examples)
