"""Every rope type a Llama-style decoder may declare (`rope_parameters["rope_type"]`) at parity with HF, in a tiny
LLaVA: the static ones through HF's copied inv_freq and attention_scaling, "dynamic" and "longrope" recomputed for
prompts longer than their original context (25 tokens against 16), as HF does."""
from __future__ import annotations

import pytest
import torch
from test_llava import compare
from tiny import llava_inputs, tiny_llava

from hooked_vlm import HookedVLM

HALF = 6  # d_head 12 in tiny_llava -> 6 frequencies
ROPES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
    "longrope": dict(rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                     long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0], original_max_position_embeddings=16),
}
# max_position_embeddings 16 for dynamic (the prompts are 25 tokens long); longrope extends 16 to 64
MAX_POS = {"dynamic": 16, "longrope": 64}


def build(kind: str):
    rope = dict(ROPES[kind], rope_theta=10000.0)
    return tiny_llava(rope_parameters=rope, max_position_embeddings=MAX_POS.get(kind, 512))


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_type_parity(kind):
    hf = build(kind)
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, pad_left=3)  # 25 real tokens (22 in the padded prompt)
    assert inputs["input_ids"].shape[1] > 16
    compare(hf, model, inputs)
    # the rope type matters here: the same weights with default rope give other logits, so the test can fail
    plain = tiny_llava(max_position_embeddings=MAX_POS.get(kind, 512))
    with torch.no_grad():
        assert (HookedVLM.from_hf(plain)(**inputs) - model(**inputs)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_input_length_dependent_rope_short_then_long(kind):
    """Below the original context the short-input frequencies apply, above it the long ones, per call."""
    hf = build(kind)
    model = HookedVLM.from_hf(hf)
    short = llava_inputs(hf, batch=1, text_len=0)  # 2 + 16 image tokens = 18 > 16: still long; cut the text
    short = {k: (v[:, :14] if k in ("input_ids", "attention_mask") else v) for k, v in short.items()}
    short["input_ids"] = short["input_ids"].clamp(max=hf.config.image_token_id - 1)  # text only: 14 tokens
    short.pop("pixel_values")
    compare(hf, model, short)
    compare(hf, model, llava_inputs(hf, batch=1))
    compare(hf, model, short)  # HF resets to the short frequencies; so do we (we keep no state)


def test_dynamic_rope_frequencies_depend_on_length():
    hf = build("dynamic")
    model = HookedVLM.from_hf(hf)
    rot = model.rotary
    assert rot.scaling == dict(rope_type="dynamic", factor=4.0, max_position_embeddings=16)
    short, long = torch.arange(16)[None], torch.arange(40)[None]
    assert torch.equal(rot.inv_freq_for(short), rot.inv_freq)
    assert (rot.inv_freq_for(long)[1:] < rot.inv_freq[1:]).all()  # a larger base: slower rotation


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_input_length_dependent_rope_bf16(kind):
    """bf16 end to end on a prompt past the original context: within 2x HF's own bf16 error."""
    from tiny import bf16_errors

    hf = build(kind)
    inputs = llava_inputs(hf, batch=2, pad_left=3)
    our_err, hf_err, _, _ = bf16_errors(hf, inputs, real=inputs["attention_mask"].bool())
    assert 0 < our_err <= 2 * hf_err, (our_err, hf_err)
