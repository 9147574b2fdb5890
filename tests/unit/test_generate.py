"""`HookedVLM.generate`: greedy output equal to HF's greedy `generate` token for token on every family (left-padded
batches, two images in a prompt, Qwen M-RoPE, a sliding-window decoder), rows stopping independently at EOS, the
KV cache equal to recomputing everything, hooks live while generating (and gone after), position-set edits that
act the same in prefill and decode, seeded sampling, stop strings, return_cache."""
import pytest
import torch
from tiny import (gemma3_inputs, gemma3_processor, llava_inputs, onevision_processor, qwen_inputs, random_image,
                  tiny_gemma3, tiny_llava, tiny_llava_onevision, tiny_qwen3_vl, tiny_qwen_vl, word_tokenizer)

from hooked_vlm import HookedVLM
from hooked_vlm.generation import current_step, knockout_attention, steer

N_NEW = 10


def two_image_llava_inputs(hf, seed=0):
    """Prompt 0: text, image, text, image, text (left-padded by 1); prompt 1: text, image, image (adjacent), text."""
    v = hf.config.vision_config
    n, img = (v.image_size // v.patch_size) ** 2, hf.config.image_token_id
    gen = torch.Generator().manual_seed(seed)
    words = lambda k: torch.randint(1, img - 1, (k,), generator=gen).tolist()  # noqa: E731
    rows = [words(2) + [img] * n + words(2) + [img] * n + words(3), words(5) + [img] * (2 * n) + words(3)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(4, 3, v.image_size, v.image_size, generator=gen))


def ov_inputs(hf):
    proc = onevision_processor(hf)
    return dict(proc(text=["w2 <image> w3 <image> w4", "w5 w6 w7 w8 w9 <image> w10 w11"],
                     images=[[random_image(40, 24, 3), random_image(20, 50, 4)], [random_image(64, 32, 5)]],
                     return_tensors="pt", padding=True))


def qwen_text_only(hf):
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, mm_token_type_ids=torch.zeros_like(ids))


CASES = {
    "llava": (lambda: tiny_llava(), lambda hf: llava_inputs(hf, batch=2, pad_left=3)),
    "llava_two_images": (lambda: tiny_llava(), two_image_llava_inputs),
    "llava_mistral_window6": (lambda: tiny_llava(decoder="mistral", sliding_window=6),
                              lambda hf: llava_inputs(hf, batch=2, pad_left=2)),
    "llava_onevision": (lambda: tiny_llava_onevision(), ov_inputs),
    "qwen2_vl": (lambda: tiny_qwen_vl("qwen2_vl"), lambda hf: qwen_inputs([[(16, 24)], [(32, 24), (8, 16)]])),
    "qwen2_5_vl": (lambda: tiny_qwen_vl("qwen2_5_vl"), lambda hf: qwen_inputs([[(16, 24)], [(32, 24), (8, 16)]])),
    "qwen2_vl_text_only": (lambda: tiny_qwen_vl("qwen2_vl"), qwen_text_only),
    # DeepStack additions at the prompt's image positions; decode steps are text
    "qwen3_vl": (lambda: tiny_qwen3_vl(), lambda hf: qwen_inputs([[(16, 24)], [(32, 24), (8, 16)]])),
    # embedding scale, local / global rotaries and windows, bidirectional image blocks in the prefill
    "gemma3": (lambda: _varied_gemma3(), lambda hf: gemma3_inputs(gemma3_processor(hf), (2, 1))),
}


def _varied_gemma3():
    """tiny_gemma3 with its token embeddings scaled down: Gemma multiplies them by sqrt(d_model), which on the tiny
    random model makes greedy decoding repeat the last token (a test that could not tell a wrong cache apart)."""
    hf = tiny_gemma3()
    with torch.no_grad():
        hf.model.language_model.embed_tokens.weight.mul_(0.15)
    return hf


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, make = CASES[request.param]
    hf = build()
    inputs = make(hf)
    assert (inputs["attention_mask"] == 0).any()  # every case has a left-padded row
    return request.param, hf, HookedVLM.from_hf(hf), inputs


def hf_generate(hf, inputs, **kw):
    with torch.no_grad():
        return hf.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0, **kw)


def test_greedy_equals_hf(case):
    name, hf, model, inputs = case
    ref = hf_generate(hf, inputs, eos_token_id=None)
    ours = model.generate(**inputs, max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=None)
    assert ref.shape == ours.shape == (2, inputs["input_ids"].shape[1] + N_NEW)
    assert torch.equal(ours, ref), (name, ours[:, -N_NEW:], ref[:, -N_NEW:])
    assert len(set(ours[:, -N_NEW:].flatten().tolist())) > 3  # not a degenerate repeat
    if name == "llava_mistral_window6":  # the window is exercised: the prompt is longer than it
        assert inputs["input_ids"].shape[1] > 6 and model.cfg.layer_windows == [6, 6, 6]


def test_eos_stops_rows_independently_as_hf(case):
    name, hf, model, inputs = case
    free = model.generate(**inputs, max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=None)[:, -N_NEW:]
    # an EOS that row r first produces at a step s >= 1 (the other row produces it at another step or never)
    r, s = next((r, s) for r in (0, 1) for s in range(1, N_NEW - 1) if int(free[r, s]) not in free[r, :s].tolist())
    eos = int(free[r, s])
    ref = hf_generate(hf, inputs, eos_token_id=eos)
    ours = model.generate(**inputs, max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(ours, ref), (name, ours[:, -N_NEW:], ref[:, -N_NEW:])
    new = ours[:, inputs["input_ids"].shape[1]:]
    assert new[r, s] == eos and (new[r, s + 1 :] == 0).all()  # padded after EOS
    if eos not in free[1 - r].tolist():
        assert torch.equal(new[1 - r], free[1 - r, : new.shape[1]])  # the other row kept going


def test_cache_equals_recompute_with_position_edits(case):
    """With a knockout (text -> image, every layer) and a steering vector at the end-of-image token and at every
    generated token, the KV-cache loop equals recomputing the whole sequence at every step."""
    name, hf, model, inputs = case
    if inputs.get("pixel_values") is None:
        pytest.skip("the image position sets need an image")
    vec = 0.5 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    hooks = knockout_attention("text", "all_image") + steer("blocks.1.hook_resid_pre", "end_of_image", vec) \
        + steer("blocks.2.hook_resid_pre", "none", vec, generated=True)
    cached = model.generate(**inputs, max_new_tokens=N_NEW, pad_token_id=0, fwd_hooks=hooks)
    full = model.generate(**inputs, max_new_tokens=N_NEW, pad_token_id=0, fwd_hooks=hooks, use_cache=False)
    plain = model.generate(**inputs, max_new_tokens=N_NEW, pad_token_id=0)
    assert torch.equal(cached, full)
    assert not torch.equal(cached, plain)  # the edits matter


@pytest.fixture(scope="module")
def llava():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf, word_tokenizer(64, hf.config.image_token_id))
    return model, llava_inputs(hf, batch=2, pad_left=3)


def test_hooks_context_changes_tokens_and_they_come_back(llava):
    model, inputs = llava
    base = model.generate(**inputs, max_new_tokens=N_NEW)
    kill = [(f"blocks.{l}.hook_attn_out", lambda a, hook: a * 0) for l in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=kill):
        hooked = model.generate(**inputs, max_new_tokens=N_NEW)
    assert not torch.equal(hooked, base)
    assert torch.equal(model.generate(**inputs, max_new_tokens=N_NEW, fwd_hooks=kill), hooked)  # same through fwd_hooks=
    assert torch.equal(model.generate(**inputs, max_new_tokens=N_NEW), base)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_decode_hooks_see_one_position(llava):
    model, inputs = llava
    seen = []

    def record(pattern, hook):
        ctx = current_step()
        seen.append((ctx.phase, tuple(pattern.shape), ctx.positions.tolist()))

    model.generate(**inputs, max_new_tokens=3, fwd_hooks=[("blocks.0.attn.hook_pattern", record)])
    p = inputs["input_ids"].shape[1]
    assert seen == [("prefill", (2, 4, p, p), list(range(p))), ("decode", (2, 4, 1, p + 1), [p]),
                    ("decode", (2, 4, 1, p + 2), [p + 1])]


def test_first_token_under_knockout_equals_forward_knockout(llava):
    """Prefill with `knockout_attention` = a plain forward with the narrow-gate analysis' knockout hooks."""
    from hooked_vlm.analyses.narrow_gate import run_with_knockout

    model, inputs = llava
    one = {k: v[1:] for k, v in inputs.items()}  # the unpadded prompt (a forward counts pads, generate does not)
    logits = run_with_knockout(model, one, "all_image")
    out = model.generate(**one, max_new_tokens=1, fwd_hooks=knockout_attention("text", "all_image"))
    assert out[0, -1] == logits[0, -1].argmax()
    assert out[0, -1] != model(**one)[0, -1].argmax()  # the knockout changed it


def test_sampling_seeded(llava):
    model, inputs = llava
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    a, b = model.generate(**inputs, seed=1, **kw), model.generate(**inputs, seed=1, **kw)
    c = model.generate(**inputs, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=True, top_k=1, seed=3)
    assert torch.equal(top1, model.generate(**inputs, max_new_tokens=N_NEW))  # top_k=1 sampling is greedy


def test_stop_strings_stop_rows_independently(llava):
    model, inputs = llava
    free = model.generate(**inputs, max_new_tokens=N_NEW)
    p = inputs["input_ids"].shape[1]
    word = model.tokenizer.convert_ids_to_tokens(int(free[0, p + 2]))
    assert word not in model.tokenizer.convert_ids_to_tokens(free[0, p : p + 2].tolist())
    out = model.generate(**inputs, max_new_tokens=N_NEW, stop_strings=[word])
    assert torch.equal(out[0, : p + 3], free[0, : p + 3]) and (out[0, p + 3 :] == model.tokenizer.pad_token_id).all()
    row1 = model.tokenizer.convert_ids_to_tokens(free[1, p:].tolist())
    if word not in row1:
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_return_cache_is_a_forward_over_the_generated_sequence(llava):
    model, inputs = llava
    out, cache = model.generate(**inputs, max_new_tokens=5, return_cache=True)
    p = inputs["input_ids"].shape[1]
    assert cache["blocks.0.hook_resid_pre"].shape[:2] == out.shape
    assert cache["blocks.0.attn.hook_pattern"].shape[-1] == out.shape[1]
    logits = model.unembed(cache["ln_final.hook_normalized"])
    assert torch.equal(logits[:, p - 1 : -1].argmax(-1), out[:, p:])  # the forward predicts what was generated


def test_errors(llava):
    model, inputs = llava
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**inputs, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(**inputs, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="only inside `model.generate`"):
        model.run_with_hooks(**inputs, fwd_hooks=knockout_attention("text", "all_image"))
    with pytest.raises(ValueError, match="unknown position set"):
        model.generate(**inputs, max_new_tokens=1, fwd_hooks=knockout_attention("txet", "all_image"))
    right = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(**right, max_new_tokens=1)

    def fail_in_decode(x, hook):
        if current_step().phase == "decode":
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.generate(**inputs, max_new_tokens=3, fwd_hooks=[("blocks.0.hook_resid_pre", fail_in_decode)])
    # neither the user's hooks nor the cache's capture hooks outlive an exception, nor a step context
    assert not any(hp.fwd_hooks or hp._forward_hooks for hp in model.hook_dict.values())
    assert current_step() is None


def test_progress_switch(llava, capsys):
    from hooked_vlm.progress import set_progress

    model, inputs = llava
    previous = set_progress(False)
    try:
        model.generate(**inputs, max_new_tokens=3, progress=True)
    finally:
        set_progress(previous)
    assert "generate" not in capsys.readouterr().err
