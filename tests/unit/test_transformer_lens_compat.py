"""TransformerLens's own utilities on a multimodal HookedVLM: protocol, cache methods, patching helpers."""
import pytest
import torch
import transformer_lens.patching as tl_patching
from tiny import llava_inputs, tiny_llava
from transformer_lens.model_protocol import TransformerLensModel

from hooked_vlm import HookedVLM


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=1, text_len=3)
    return hf, model, inputs


def test_protocol_and_cfg(setup):
    hf, model, _ = setup
    assert isinstance(model, TransformerLensModel)
    tc = hf.config.text_config
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_vocab) == (
        tc.num_hidden_layers, tc.num_attention_heads, tc.hidden_size, tc.vocab_size)
    assert model.cfg.d_head * model.cfg.n_heads == model.blocks[0].attn.q_proj.weight.shape[0]
    assert model.blocks[0].mlp.W_out.shape == (model.cfg.d_mlp, model.cfg.d_model)
    assert model.blocks[0].attn.W_O.shape == (model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)
    assert model.cfg.normalization_type == "RMS" and not model.cfg.attn_only


def test_logit_attrs_sum_to_logits_at_every_position(setup):
    _, model, inputs = setup
    logits, cache = model.run_with_cache(**inputs)
    stack = cache.decompose_resid(layer=None, mode="all", apply_ln=False, return_labels=False)
    tok = torch.tensor([5])
    attrs = cache.logit_attrs(stack, tokens=tok)  # [component, batch, pos]
    assert torch.allclose(attrs.sum(0), logits[..., 5], atol=1e-4)
    # folded W_U: ln_final.hook_normalized @ W_U are the logits
    assert torch.allclose(cache["ln_final.hook_normalized"] @ model.W_U, logits, atol=1e-4)


def test_stack_head_results_and_accumulated_resid(setup):
    _, model, inputs = setup
    _, cache = model.run_with_cache(**inputs)
    heads = cache.stack_head_results(layer=1, return_labels=False)  # layer 0's heads
    assert torch.allclose(heads.sum(0) + model.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"], atol=1e-5)
    acc = cache.accumulated_resid(layer=None)
    assert torch.allclose(acc[-1], cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    assert torch.equal(model.accumulated_bias(2), torch.zeros(model.cfg.d_model))  # Llama: no biases


def test_tl_patching_helper_runs_with_the_image(setup):
    """TL's token-only helper, with the images bound: equals our own hook loop at a few (layer, pos)."""
    _, model, inputs = setup
    corrupt = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    _, clean_cache = model.run_with_cache(**inputs)
    metric = lambda lg: lg[0, -1, 5] - lg[0, -1, 6]  # noqa: E731
    with model.bind_inputs(**corrupt):
        tl = tl_patching.get_act_patch_resid_pre(model, inputs["input_ids"], clean_cache, metric)
    assert model._bound == {}
    for layer, pos in [(0, 5), (1, 10), (2, 20)]:
        def put(x, hook, pos=pos, layer=layer):
            x = x.clone()
            x[:, pos] = clean_cache[f"blocks.{layer}.hook_resid_pre"][:, pos]
            return x
        with torch.no_grad():
            ours = metric(model.run_with_hooks(**corrupt, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", put)]))
        assert torch.allclose(tl[layer, pos], ours, atol=1e-5)
    # without binding, image patching would silently drop the image: our model refuses instead
    with pytest.raises(ValueError, match="no pixel_values"):
        model(inputs["input_ids"])


def test_tl_logit_lens_at_last_layer_equals_logits(setup):
    """accumulated_resid(apply_ln=True) calls model.ln_final; with the final norm's weight folded into W_U the lens
    is not scaled twice."""
    _, model, inputs = setup
    logits, cache = model.run_with_cache(**inputs)
    lens = cache.accumulated_resid(layer=None, apply_ln=True) @ model.W_U
    assert torch.allclose(lens[-1], logits, atol=1e-4)
    assert torch.equal(model.ln_final.w, torch.ones_like(model.ln_final.w))
