"""TransformerLens cache methods are exact on every family, image positions included."""
import pytest
import torch
from tiny import (gemma3_inputs, gemma3_processor, llava_inputs, onevision_processor, qwen_inputs, random_image, tiny_gemma3,
                  tiny_llava, tiny_llava_onevision, tiny_qwen3_vl, tiny_qwen_vl)
from transformer_lens.model_protocol import TransformerLensModel

from hooked_vlm import HookedVLM


def _llava():
    hf = tiny_llava()
    return HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)


def _onevision():
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    inputs = dict(proc(text=["w2 w3 <image> w4 w5"], images=[random_image(40, 24)], return_tensors="pt"))
    return HookedVLM.from_hf(hf, proc), inputs


def tiny_qwen(kind):
    return tiny_qwen3_vl() if kind == "qwen3_vl" else tiny_qwen_vl(kind)


def _qwen(kind):
    def build():
        return HookedVLM.from_hf(tiny_qwen(kind)), qwen_inputs([[(16, 24)], [(8, 8)]])
    return build


QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _gemma3():
    hf = tiny_gemma3()
    proc = gemma3_processor(hf)
    return HookedVLM.from_hf(hf, proc), gemma3_inputs(proc, (2, 1))


@pytest.fixture(scope="module", params=["llava", "llava_onevision", *QWEN, "gemma3"])
def family(request):
    build = {"llava": _llava, "llava_onevision": _onevision, **{kind: _qwen(kind) for kind in QWEN}, "gemma3": _gemma3}
    model, inputs = build[request.param]()
    assert model.cfg.family == request.param
    logits, cache = model.run_with_cache(**inputs)
    return model, inputs, logits, cache


def test_protocol(family):
    model, *_ = family
    assert isinstance(model, TransformerLensModel)
    assert model.blocks[0].attn.W_O.shape == (model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)


def test_decompose_resid_and_logit_attrs_exact(family):
    model, inputs, logits, cache = family
    stack = cache.decompose_resid(layer=None, mode="all", apply_ln=False, return_labels=False)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.allclose(stack.sum(0), final, atol=1e-5)  # image positions included
    attrs = cache.logit_attrs(stack, tokens=torch.tensor([5]))
    real = inputs["attention_mask"].bool()
    assert torch.allclose(attrs.sum(0)[real], logits[..., 5][real], atol=1e-4)
    lens = cache.accumulated_resid(layer=None, apply_ln=True) @ model.W_U
    assert torch.allclose(lens[-1][real], logits[real], atol=1e-4)


def _attention_output(model, cache, l):
    """What the heads sum to: hook_attn_out, or, with a post-norm (Gemma 3), the post-norm's input (scale *
    normalized); hook_attn_out is then the post-norm's output (docs/hook_names.md)."""
    if model.blocks[l].ln1_post is None:
        return cache[f"blocks.{l}.hook_attn_out"]
    return cache[f"blocks.{l}.ln1_post.hook_normalized"] * cache[f"blocks.{l}.ln1_post.hook_scale"]


def test_head_results_sum_to_attn_out(family):
    model, inputs, _, cache = family
    for l in range(model.cfg.n_layers):
        heads = cache.stack_head_results(layer=l + 1, return_labels=False)[-model.cfg.n_heads:]
        assert torch.allclose(heads.sum(0) + model.blocks[l].attn.b_O, _attention_output(model, cache, l), atol=1e-5)
    _, cache2 = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("attn.hook_result", "hook_attn_out"))
                                     or ".ln1_post." in n)
    for l in range(model.cfg.n_layers):
        total = cache2[f"blocks.{l}.attn.hook_result"].sum(-2) + model.blocks[l].attn.b_O
        assert torch.allclose(total, _attention_output(model, cache2, l), atol=1e-5)


def test_tl_patching_helper_equals_our_sweep(family):
    """transformer_lens.patching with the images bound equals analyses.patching on every family (image counterfactual:
    same tokens, other pixels)."""
    from transformer_lens import patching as tl_patching

    from hooked_vlm.analyses.patching import patch_resid_by_layer_and_position

    model, inputs, _, cache = family
    corrupt = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"], generator=torch.Generator().manual_seed(3)))
    metric = lambda lg: lg[:, -1, 5] - lg[:, -1, 6]  # noqa: E731  (left padding: -1 is every prompt's last token)
    with model.bind_inputs(**corrupt):
        tl = tl_patching.get_act_patch_resid_pre(model, corrupt["input_ids"], cache, lambda lg: metric(lg).mean())
    ours = patch_resid_by_layer_and_position(model, inputs, corrupt, metric, progress=False)
    assert (ours.scores - ours.corrupt).abs().max() > 1e-3  # the image matters, so the comparison says something
    torch.testing.assert_close(tl.float(), ours.scores, rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=["llava", "llava_onevision", *QWEN])
def one_prompt(request):
    """Batch-1 inputs (head_detector runs one unpadded prompt) and a model with a tokenizer."""
    from tiny import QWEN_IMAGE, word_tokenizer

    if request.param == "llava":
        hf = tiny_llava()
        model = HookedVLM.from_hf(hf, word_tokenizer(64, hf.config.image_token_id))
        return model, llava_inputs(hf, batch=1)
    if request.param == "llava_onevision":
        model, inputs = _onevision()
        return model, inputs
    model = HookedVLM.from_hf(tiny_qwen(request.param), word_tokenizer(64, QWEN_IMAGE))
    return model, qwen_inputs([[(16, 24)]])


def test_to_tokens_expands_images_and_head_detector_runs_with_them(one_prompt):
    from transformer_lens.head_detector import compute_head_attention_similarity_score, detect_head

    from tiny import prompt_text

    model, inputs = one_prompt
    img = model.cfg.image_token_id
    text = prompt_text(model.tokenizer, inputs["input_ids"][0], img)
    with pytest.raises(ValueError, match="no inputs are bound"):
        model.to_tokens(text)
    with model.bind_inputs(**inputs):
        assert torch.equal(model.to_tokens(text), inputs["input_ids"])
        with pytest.raises(ValueError, match="image placeholders"):
            model.to_tokens(text + " <image>")
        scores = detect_head(model, text, "previous_token_head")
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    s = inputs["input_ids"].shape[1]
    prev = torch.zeros(s, s).diagonal_scatter(torch.ones(s - 1), -1)
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            want = compute_head_attention_similarity_score(cache[f"blocks.{l}.attn.hook_pattern"][0, h], prev,
                                                           exclude_bos=False, exclude_current_token=False,
                                                           error_measure="mul")
            assert abs(scores[l, h].item() - want) < 1e-5


def test_to_tokens_splits_adjacent_images():
    """Two images with no token between them: the counts come from the bound inputs' layout, not from runs."""
    from tiny import word_tokenizer

    hf = tiny_llava()
    img = hf.config.image_token_id
    one = llava_inputs(hf, batch=1)
    n = int((one["input_ids"] == img).sum())
    ids = torch.tensor([[5] + [img] * (2 * n) + [7]])
    pixels = torch.cat([one["pixel_values"], llava_inputs(hf, batch=1, seed=1)["pixel_values"]])
    model = HookedVLM.from_hf(hf, word_tokenizer(64, img))
    with model.bind_inputs(input_ids=ids, pixel_values=pixels):
        assert torch.equal(model.to_tokens("w5 <image> <image> w7"), ids)
        with pytest.raises(ValueError, match="1 image placeholders, the bound inputs 2 images"):
            model.to_tokens("w5 <image> w7")
