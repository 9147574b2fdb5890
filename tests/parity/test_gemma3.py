"""Gemma 3 parity against tiny random HF models (real Gemma3Processor with a word-level tokenizer): logits, every
layer's input, eager attention patterns (bidirectional within an image), image features, the final norm; sliding
and global layers with their own rotaries; left-padded batches with several images in a prompt; bf16; round trip."""
import pytest
import torch
from tiny import GEMMA_BOI, GEMMA_EOI, GEMMA_IMAGE, bf16_errors, gemma3_inputs, gemma3_processor, tiny_gemma3

from hooked_vlm import HookedVLM

MEASURED: dict[str, dict[str, float]] = {}  # printed with -s: the numbers the report quotes


def compare(hf, model, inputs, tol=1e-4, pattern_tol=1e-5, case=""):
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True, output_attentions=True)
        ours, cache = model.run_with_cache(**inputs)
    real = inputs["attention_mask"].bool()
    d = {"logits": (ref.logits - ours)[real].abs().max().item()}
    d["resid_pre"] = max((ref.hidden_states[l] - cache[f"blocks.{l}.hook_resid_pre"])[real].abs().max().item()
                         for l in range(model.cfg.n_layers))
    d["pattern"] = max((ref.attentions[l] - cache[f"blocks.{l}.attn.hook_pattern"]).permute(0, 2, 1, 3)[real].abs().max().item()
                       for l in range(model.cfg.n_layers))
    final = cache["ln_final.hook_normalized"] * (1 + hf.model.language_model.norm.weight)  # folded into W_U in ours
    d["ln_final"] = (ref.hidden_states[-1] - final)[real].abs().max().item()
    if inputs.get("pixel_values") is not None:
        with torch.no_grad():
            feats = hf.model.get_image_features(inputs["pixel_values"]).pooler_output
        d["image_features"] = (feats.flatten(0, 1) - cache["projector.hook_out"]).abs().max().item()  # flat contract
    MEASURED[case] = d
    print(case, {k: f"{v:.1e}" for k, v in d.items()})
    assert max(v for k, v in d.items() if k != "pattern") <= tol, d
    assert d["pattern"] <= pattern_tol, d
    assert ref.logits[real].std() > 0.3  # logits with spread: a wrong mask or rotary cannot hide under tol
    return cache


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_gemma3()
    proc = gemma3_processor(hf)
    return hf, proc, HookedVLM.from_hf(hf, proc)


def test_config_resolved(tiny):
    hf, _, model = tiny
    c = model.cfg
    assert [b.attn.window for b in model.blocks] == [6, None, 6, None]
    assert [b.attn.rotary_key for b in model.blocks] == ["rotary_local", "rotary", "rotary_local", "rotary"]
    assert model.layer_rotary(0) is model.rotary_local and model.layer_rotary(1) is model.rotary
    assert c.attn_scale == 12**-0.5 and c.embed_scale == 48**0.5 and c.norm_offset == 1.0
    rot = hf.model.language_model.rotary_emb
    assert torch.equal(model.rotary.inv_freq, rot.full_attention_inv_freq)  # linear scaling x2 included
    assert torch.equal(model.rotary_local.inv_freq, rot.sliding_attention_inv_freq)
    assert not torch.allclose(model.rotary.inv_freq, model.rotary_local.inv_freq)


def test_parity_left_padded_batch_several_images(tiny):
    """Prompt 0: two images, 18 tokens (three times the window of 6); prompt 1: one image, left-padded."""
    hf, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    assert (inputs["attention_mask"] == 0).any() and int((inputs["input_ids"][0] == GEMMA_BOI).sum()) == 2
    compare(hf, model, inputs, case="padded batch, 2+1 images")


def test_parity_three_prompts_mixed(tiny):
    hf, proc, model = tiny
    compare(hf, model, gemma3_inputs(proc, (1, 3, 2), seed=1, words=3), case="3 prompts, 1/3/2 images")


def test_parity_text_only(tiny):
    hf, proc, model = tiny
    inputs = gemma3_inputs(proc, (0, 0), words=9)
    assert "pixel_values" not in inputs and (inputs["attention_mask"] == 0).any()
    compare(hf, model, inputs, case="text only, padded")


def test_bidirectional_image_attention_shows_in_pattern(tiny):
    """With token_type_ids the tokens of one image see each other's later tokens (pattern > 0 above the diagonal,
    inside the image block only); without them attention is causal, as in HF. Both at parity."""
    hf, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    cache = compare(hf, model, inputs, case="bidirectional (token_type_ids)")
    ids = inputs["input_ids"][0]
    img = (ids == GEMMA_IMAGE).nonzero().flatten()
    first, second = img[:4], img[4:]
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # global layer [head, query, key]
    assert (pattern[:, first[0], first[1:]] > 1e-3).all()  # the first image token sees the rest of its image
    assert (pattern[:, first[0], second] == 0).all()  # ... but not the next image
    assert (pattern[:, first[-1] + 1, first[-1] + 2:] == 0).all()  # <end_of_image> stays causal
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    cache = compare(hf, model, causal, case="causal (no token_type_ids)")
    assert (cache["blocks.1.attn.hook_pattern"][0, :, first[0], first[1:]] == 0).all()
    with torch.no_grad():
        assert (model(**inputs) - model(**causal)).abs().max() > 1e-2  # the mask changes the answer


def test_sliding_window_and_local_rotary_matter(tiny):
    """The comparisons above can fail: dropping the window or rotating local layers with the global rotary moves the
    logits far beyond the tolerance."""
    hf, proc, _ = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    with torch.no_grad():
        ref = HookedVLM.from_hf(hf)(**inputs)
        no_window = HookedVLM.from_hf(hf)
        for block in no_window.blocks:
            block.attn.window = None
        one_rotary = HookedVLM.from_hf(hf)
        for block in one_rotary.blocks:
            block.attn.rotary_key = "rotary"
        real = inputs["attention_mask"].bool()
        assert (no_window(**inputs) - ref)[real].abs().max() > 1e-2
        assert (one_rotary(**inputs) - ref)[real].abs().max() > 1e-2


def test_bf16_within_documented_tolerance():
    hf = tiny_gemma3()
    proc = gemma3_processor(hf)
    inputs = gemma3_inputs(proc, (2, 1))
    our_err, hf_err, model, ours = bf16_errors(hf, inputs, real=inputs["attention_mask"].bool())
    MEASURED["bf16"] = {"ours": float(our_err), "hf": float(hf_err)}
    print("bf16 error vs fp32: ours", float(our_err), "HF", float(hf_err))
    assert model.cfg.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
    assert 0 < our_err <= 2 * hf_err, (our_err, hf_err)


def test_save_pretrained_round_trip(tmp_path, tiny):
    hf, proc, _ = tiny
    hf.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path), processor=None)
    assert model.cfg.family == "gemma3"
    compare(hf, model, gemma3_inputs(proc, (1, 2)), case="from_pretrained")


def test_token_layout(tiny):
    hf, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    layout = model.layout(inputs)
    ids = inputs["input_ids"]
    for b, n_img in enumerate((2, 1)):
        img = (ids[b] == GEMMA_IMAGE).nonzero().flatten()
        assert layout.image_index[b, img].tolist() == [k for k in range(n_img) for _ in range(4)]
        assert layout.row[b, img].tolist() == [0, 0, 1, 1] * n_img and layout.col[b, img].tolist() == [0, 1, 0, 1] * n_img
        assert layout.grids[b] == [{0: (2, 2)}] * n_img
        for k in (0, -1):  # an image's <end_of_image> follows its last image token
            eoi = layout.end_of_image(k)[b].nonzero().flatten()
            last = int(layout.last_image_token(k)[b].nonzero())
            assert ids[b, eoi].tolist() == [GEMMA_EOI] and int(eoi) == last + 1 == int(img[4 * (k % n_img) + 3]) + 1
    assert layout.in_box(0, 0, 0.5, 0.5, image=0).sum(1).tolist() == [1, 1]  # the top-left token of each grid
    assert torch.equal(layout.position_ids, torch.arange(ids.shape[1]).expand_as(ids))  # HF: 0..S-1, pads counted


def test_refused_by_name():
    from hooked_vlm.families import get_family

    fam = get_family("gemma3")
    for field, value in (("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                         ("use_bidirectional_attention", True)):
        cfg = tiny_gemma3().config
        setattr(cfg.text_config, field, value)
        with pytest.raises(ValueError, match=field):
            fam.config_from_hf(cfg)
    cfg = tiny_gemma3().config
    cfg.text_config.rope_parameters["full_attention"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match="dynamic"):
        fam.config_from_hf(cfg)
    hf = tiny_gemma3()
    proc = gemma3_processor(hf)
    proc.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        HookedVLM.from_hf(hf, proc)


def test_resume_inside_an_image_restarts_at_the_image(tiny):
    """`resume` assumes earlier positions never see later ones; inside a bidirectional image block they do, so it
    refuses such a start and `safe_start` moves it to the image's first token; patch sweeps use that."""
    from hooked_vlm.resume import capture, resume, safe_start

    hf, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    saved = capture(model, inputs)
    img = (inputs["input_ids"][0] == GEMMA_IMAGE).nonzero().flatten()
    inside = int(img[2])
    assert safe_start(saved, inside) == int(img[0])
    assert safe_start(saved, int(img[0])) == int(img[0]) and safe_start(saved, int(img[3]) + 1) == int(img[3]) + 1
    with pytest.raises(ValueError, match="safe_start"):
        resume(model, saved, 1, inside)
    with torch.no_grad():
        full = model(**inputs)
    torch.testing.assert_close(resume(model, saved, 1, safe_start(saved, inside)), full, rtol=0, atol=1e-5)


def test_bad_token_type_ids_named(tiny):
    _, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    with pytest.raises(ValueError, match="token_type_ids: expected shape"):
        model(**dict(inputs, token_type_ids=inputs["token_type_ids"][:, :-1]))


def test_hook_shapes_of_gemma_specific_hooks(tiny):
    _, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    shapes = model.hook_shapes(inputs)
    b, p = inputs["input_ids"].shape
    assert shapes["blocks.0.ln1_post.hook_normalized"] == (b, p, 48) and shapes["blocks.0.ln2_post.hook_scale"] == (b, p, 1)
    assert shapes["blocks.0.attn.q_norm.hook_normalized"] == (b, p, 4, 16)
    assert shapes["blocks.0.attn.k_norm.hook_scale"] == (b, p, 2, 1)
    assert shapes["vision.ln_post.hook_normalized"] == (3, 16, 32)
    assert shapes["projector.hook_pooled"] == (3, 4, 32) and shapes["projector.hook_out"] == (12, 48)


def test_post_norm_hooks_are_what_is_added(tiny):
    """resid_post = resid_pre + hook_attn_out + hook_mlp_out with the post-norms inside (exact: same tensors)."""
    _, proc, model = tiny
    _, cache = model.run_with_cache(**gemma3_inputs(proc, (2, 1)))
    for l in range(model.cfg.n_layers):
        mid = cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"]
        torch.testing.assert_close(mid, cache[f"blocks.{l}.hook_resid_mid"], rtol=0, atol=0)
        post = cache[f"blocks.{l}.hook_resid_mid"] + cache[f"blocks.{l}.hook_mlp_out"]
        torch.testing.assert_close(post, cache[f"blocks.{l}.hook_resid_post"], rtol=0, atol=0)
    stack = cache.decompose_resid(layer=None, mode="all", apply_ln=False, return_labels=False)
    torch.testing.assert_close(stack.sum(0), cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], rtol=0, atol=1e-5)


def test_cache_estimate_bounds_the_gemma_hooks(tiny):
    """The run_with_cache guard's estimate is an upper bound for the Gemma-only hooks too (per-head qk-norm)."""
    _, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    for names in (lambda n: ".q_norm." in n or ".k_norm." in n, lambda n: "ln1_post" in n or n.startswith("projector.")):
        _, cache = model.run_with_cache(**inputs, names_filter=names)
        actual = sum(t.numel() * t.element_size() for t in cache.cache_dict.values())
        assert actual <= model.estimate_cache_bytes(inputs, names) <= 2 * actual


def test_edge_attribution_refuses_post_norm_heads(tiny):
    """Per-head edges assume hook_result is an additive term of the residual stream, which post-norms break."""
    from hooked_vlm.analyses.edge_graph import node_activations, valid_edges
    from hooked_vlm.analyses.edge_patching import faithfulness
    from hooked_vlm.analyses.edges import eap
    from hooked_vlm.analyses.metrics import LogitDiff

    _, proc, model = tiny
    inputs = gemma3_inputs(proc, (2, 1))
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), inputs["attention_mask"])
    for call in (lambda: eap(model, inputs, inputs, metric), lambda: faithfulness(model, inputs, inputs, metric, []),
                 lambda: node_activations(model, inputs), lambda: valid_edges(model)):
        with pytest.raises(ValueError, match="post-norms"):
            call()
