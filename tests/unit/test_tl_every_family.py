"""TransformerLens cache methods are exact on every family, image positions included."""
import pytest
import torch
from tiny import llava_inputs, onevision_processor, qwen_inputs, random_image, tiny_llava, tiny_llava_onevision, tiny_qwen_vl
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


def _qwen(kind):
    def build():
        return HookedVLM.from_hf(tiny_qwen_vl(kind)), qwen_inputs([[(16, 24)], [(8, 8)]])
    return build


@pytest.fixture(scope="module", params=["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def family(request):
    build = {"llava": _llava, "llava_onevision": _onevision, "qwen2_vl": _qwen("qwen2_vl"), "qwen2_5_vl": _qwen("qwen2_5_vl")}
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


def test_head_results_sum_to_attn_out(family):
    model, inputs, _, cache = family
    for l in range(model.cfg.n_layers):
        heads = cache.stack_head_results(layer=l + 1, return_labels=False)[-model.cfg.n_heads:]
        assert torch.allclose(heads.sum(0) + model.blocks[l].attn.b_O, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5)
    _, cache2 = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("attn.hook_result", "hook_attn_out")))
    for l in range(model.cfg.n_layers):
        total = cache2[f"blocks.{l}.attn.hook_result"].sum(-2) + model.blocks[l].attn.b_O
        assert torch.allclose(total, cache2[f"blocks.{l}.hook_attn_out"], atol=1e-5)
