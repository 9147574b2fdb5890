"""LLaVA-1.5 parity against tiny random HF models: logits, residual stream, eager attention patterns."""
import pytest
import torch
from tiny import bf16_errors, hf_final_norm_weight, llava_inputs, tiny_llava

from hooked_vlm import HookedVLM

CASES = [("clip", "llama", "default", -2), ("siglip", "qwen2", "full", -1), ("clip", "llama", "full", [-2, -1])]


def compare(hf, model, inputs, tol=1e-4):
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True, output_attentions=True)
        ours, cache = model.run_with_cache(**inputs)
    real = inputs["attention_mask"].bool()
    assert (ref.logits - ours)[real].abs().max() <= tol
    for l in range(model.cfg.n_layers):
        assert (ref.hidden_states[l] - cache[f"blocks.{l}.hook_resid_pre"])[real].abs().max() <= tol
        # padded query rows are uniform in both; compare real query rows
        pat_ref, pat = ref.attentions[l], cache[f"blocks.{l}.attn.hook_pattern"]
        assert (pat_ref - pat).permute(0, 2, 1, 3)[real].abs().max() <= 1e-5
    assert torch.allclose(ref.hidden_states[-1][real], cache["ln_final.hook_normalized"][real] * hf_final_norm_weight(hf), atol=tol)


@pytest.mark.parametrize("tower,decoder,strategy,layer", CASES)
def test_llava_parity(tower, decoder, strategy, layer):
    hf = tiny_llava(tower, decoder, strategy, layer)
    model = HookedVLM.from_hf(hf)
    compare(hf, model, llava_inputs(hf, batch=2, pad_left=3))


@pytest.mark.parametrize("decoder,text_kwargs", [
    ("mistral", dict(sliding_window=8)),  # every layer slides
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # layers 1, 2 slide; 0 is full
])
def test_llava_sliding_window_backbones(decoder, text_kwargs):
    """Prompts (27 and 24 real tokens) several times longer than the window: sliding layers must not see past it."""
    hf = tiny_llava("clip", decoder, **text_kwargs)
    model = HookedVLM.from_hf(hf)
    expected = [None if t == "full_attention" else 8 for t in getattr(hf.config.text_config, "layer_types", None) or ["sliding_attention"] * 3]
    assert [b.attn.window for b in model.blocks] == expected
    compare(hf, model, llava_inputs(hf, batch=2, pad_left=3))
    # the window changes the answer here (a full-attention model would be far off), so the test can fail
    full = HookedVLM.from_hf(hf)
    for block in full.blocks:
        block.attn.window = None
    inputs = llava_inputs(hf, batch=2, pad_left=3)
    with torch.no_grad():
        assert (full(**inputs) - model(**inputs)).abs().max() > 1e-2


def test_llava_several_images_in_one_prompt():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    one = llava_inputs(hf, batch=1)
    ids = one["input_ids"][0]
    two_images = torch.cat([ids, ids])[None]
    inputs = dict(input_ids=two_images, attention_mask=torch.ones_like(two_images),
                  pixel_values=torch.cat([one["pixel_values"], one["pixel_values"].flip(-1)]))
    compare(hf, model, inputs)


def test_llava_text_only():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    ids = torch.randint(1, 60, (2, 9))
    compare(hf, model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)))


def test_llava_bf16_within_documented_tolerance():
    """bf16 end to end. Documented tolerance: our bf16 logits are no further from the fp32 reference than
    2x HF's own bf16 logits are (bf16 has 8 mantissa bits; different but equally valid op orders drift)."""
    hf = tiny_llava()
    our_err, hf_err, model, ours = bf16_errors(hf, llava_inputs(hf, batch=2))
    assert model.cfg.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
    assert 0 < our_err <= 2 * hf_err, (our_err, hf_err)


def test_save_pretrained_round_trip(tmp_path):
    hf = tiny_llava()
    hf.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path), processor=None)
    compare(hf, model, llava_inputs(hf, batch=1))


def test_from_hf_leaves_hf_model_unchanged():
    hf = tiny_llava()
    inputs = llava_inputs(hf, batch=1)
    with torch.no_grad():
        before = hf(**inputs).logits.clone()
    types = [type(m) for m in hf.modules()]
    model = HookedVLM.from_hf(hf)
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight.mul_(2)  # copies by default: editing ours must not touch HF's
        after = hf(**inputs).logits
    assert torch.equal(before, after) and types == [type(m) for m in hf.modules()]


def test_from_pretrained_with_device_map(tmp_path):
    """`device_map` goes through accelerate; on this CPU-only machine "auto" puts everything on the CPU."""
    hf = tiny_llava()
    hf.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path), processor=None, device_map="auto")
    compare(hf, model, llava_inputs(hf, batch=2, pad_left=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split the model across devices")
def test_model_split_across_devices_matches_one_device():
    """Blocks on different devices (what device_map does to a large model): activations follow the weights."""
    from hooked_vlm.resume import capture, resume

    hf = tiny_llava()
    inputs = llava_inputs(hf, batch=2, pad_left=1)
    one = HookedVLM.from_hf(hf)
    split = HookedVLM.from_hf(hf)
    for block in split.blocks[1:]:
        block.to("cuda")
    split.ln_final.to("cuda")
    split.unembed.to("cuda")
    with torch.no_grad():
        ref = one(**inputs)
        out = split(**inputs)
        resumed = resume(split, capture(split, inputs), 1, 3)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(resumed.cpu(), ref, rtol=0, atol=1e-4)
