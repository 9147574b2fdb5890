"""TransformerLens's model API on tiny LLaVA and Qwen2-VL models: weight views reproduce the hooks, return_type /
loss, stop_at_layer / start_at_layer, run_with_cache options, to_str_tokens, set_use_attn_result, the Unembed."""
import pytest
import torch
import torch.nn.functional as F
from tiny import QWEN_IMAGE, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen_vl, word_tokenizer
from transformer_lens.FactoredMatrix import FactoredMatrix

from hooked_vlm import HookedVLM

IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def _llava():
    hf = tiny_llava()
    return HookedVLM.from_hf(hf, word_tokenizer(64, hf.config.image_token_id)), llava_inputs(hf, batch=2, pad_left=2)


def _qwen():
    return HookedVLM.from_hf(tiny_qwen_vl("qwen2_vl"), word_tokenizer(64, QWEN_IMAGE)), qwen_inputs([[(16, 24)], [(8, 8)]])


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def run(request):
    model, inputs = {"llava": _llava, "qwen2_vl": _qwen}[request.param]()
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    return model, inputs, logits, cache


def test_weight_view_shapes_follow_transformer_lens(run):
    model, *_ = run
    c = model.cfg
    assert c.n_key_value_heads < c.n_heads  # grouped-query attention: the K/V views are expanded
    for name in ("W_Q", "W_K", "W_V"):
        assert getattr(model, name).shape == (c.n_layers, c.n_heads, c.d_model, c.d_head), name
    assert model.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    for name in ("b_Q", "b_K", "b_V"):
        assert getattr(model, name).shape == (c.n_layers, c.n_heads, c.d_head), name
    assert model.b_O.shape == (c.n_layers, c.d_model)
    assert model.W_in.shape == model.W_gate.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert model.W_out.shape == (c.n_layers, c.d_mlp, c.d_model)
    assert model.b_in.shape == (c.n_layers, c.d_mlp) and model.b_out.shape == (c.n_layers, c.d_model)
    assert model.W_E.shape == (c.d_vocab, c.d_model) and model.W_U.shape == (c.d_model, c.d_vocab)
    assert torch.equal(model.unembed.W_U, model.W_U) and torch.equal(model.unembed.b_U, model.b_U)
    assert isinstance(model.OV, FactoredMatrix) and model.OV.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    assert isinstance(model.QK, FactoredMatrix) and model.QK.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    # the per-block views are the same tensors
    assert torch.equal(model.blocks[1].attn.W_K, model.W_K[1]) and torch.equal(model.blocks[1].mlp.W_in, model.W_in[1])
    # the raw kv-head weights are kept under TL's private names
    assert model.blocks[0].attn._W_K.shape == (c.n_key_value_heads, c.d_model, c.d_head)


def test_weight_views_reproduce_the_hooks(run):
    """The decoder norms' weights are not folded into W_Q...: apply ln1 (with its weight) first, as documented."""
    model, _, _, cache = run
    rep = model.cfg.n_heads // model.cfg.n_key_value_heads
    if model.cfg.family == "qwen2_vl":
        assert model.b_Q.abs().max() > 0  # Qwen2 has q/k/v biases: the bias views are exercised
    for l, block in enumerate(model.blocks):
        x = block.ln1(cache[f"blocks.{l}.hook_resid_pre"])
        for name, view, bias in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
            got = torch.einsum("bpm,hmd->bphd", x, view[l]) + bias[l]
            want = cache[f"blocks.{l}.attn.hook_{name}"]
            want = want if name == "q" else want.repeat_interleave(rep, dim=2)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        attn_out = torch.einsum("bphd,hdm->bpm", cache[f"blocks.{l}.attn.hook_z"], model.W_O[l]) + model.b_O[l]
        torch.testing.assert_close(attn_out, cache[f"blocks.{l}.hook_attn_out"], rtol=0, atol=1e-5)
        x2 = block.ln2(cache[f"blocks.{l}.hook_resid_mid"])
        torch.testing.assert_close(x2 @ model.W_gate[l], cache[f"blocks.{l}.mlp.hook_pre"], rtol=0, atol=1e-5)
        torch.testing.assert_close(x2 @ model.W_in[l] + model.b_in[l], cache[f"blocks.{l}.mlp.hook_pre_linear"],
                                   rtol=0, atol=1e-5)
        mlp_out = cache[f"blocks.{l}.mlp.hook_post"] @ model.W_out[l] + model.b_out[l]
        torch.testing.assert_close(mlp_out, cache[f"blocks.{l}.hook_mlp_out"], rtol=0, atol=1e-5)
        # without ln1's weight the route is wrong: the views are NOT folded
        raw = torch.einsum("bpm,hmd->bphd", cache[f"blocks.{l}.ln1.hook_normalized"], model.W_Q[l]) + model.b_Q[l]
        assert (raw - cache[f"blocks.{l}.attn.hook_q"]).abs().max() > 1e-3
    # OV / QK are the products of the views, per layer and head
    torch.testing.assert_close(model.OV.AB[1, 2], model.W_V[1, 2] @ model.W_O[1, 2])
    torch.testing.assert_close(model.QK.AB[2, 3], model.W_Q[2, 3] @ model.W_K[2, 3].T)
    torch.testing.assert_close(model.blocks[1].attn.OV.AB, model.OV.AB[1])


def test_loss_is_over_text_positions_only(run):
    model, inputs, logits, _ = run
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    text = (ids != model.cfg.image_token_id) & mask
    scored = text[:, :-1] & text[:, 1:]
    manual = F.cross_entropy(logits[:, :-1][scored], ids[:, 1:][scored])
    with torch.no_grad():
        loss = model(**inputs, return_type="loss")
        per_token = model(**inputs, return_type="loss", loss_per_token=True)
        both = model(**inputs, return_type="both")
        assert model(**inputs, return_type=None) is None
    torch.testing.assert_close(loss, manual, rtol=0, atol=1e-5)
    assert per_token.shape == (ids.shape[0], ids.shape[1] - 1)
    assert (per_token[~scored] == 0).all() and (per_token[scored] > 0).all()
    # the position predicting an image token, image positions and the one after them are never scored
    img = ids == model.cfg.image_token_id
    assert not scored[img[:, 1:]].any() and not scored[img[:, :-1]].any()
    torch.testing.assert_close(both[0], logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1], loss)
    with pytest.raises(ValueError, match="return_type"):
        model(**inputs, return_type="logit")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**inputs, return_type="loss", logits_to_keep=1)


def test_stop_at_layer_returns_the_residual_before_that_block(run):
    model, inputs, _, cache = run
    n = model.cfg.n_layers
    fired = []
    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda name: name.startswith("blocks."), lambda x, hook: fired.append(hook.name))]):
        for stop, name in ((0, "blocks.0.hook_resid_pre"), (1, "blocks.1.hook_resid_pre"), (-1, f"blocks.{n - 1}.hook_resid_pre"),
                           (n, f"blocks.{n - 1}.hook_resid_post")):
            fired.clear()
            out = model(**inputs, stop_at_layer=stop)
            torch.testing.assert_close(out, cache[name], rtol=0, atol=1e-5)  # fused vs explicit attention
            assert not any(f.startswith(f"blocks.{stop % n if stop < 0 else stop}.") for f in fired) or stop == n
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(**inputs, stop_at_layer=n + 1)


def test_start_at_layer_resumes_from_a_residual(run):
    model, inputs, logits, cache = run
    image = {k: v for k, v in inputs.items() if k in IMAGE_KEYS and k != "pixel_values"}
    fired = []
    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda name: not name.startswith("blocks."), lambda x, hook: fired.append(hook.name))]):
        for l in (1, 2, -1):
            resid = cache[f"blocks.{l % model.cfg.n_layers}.hook_resid_pre"]
            out = model(resid, start_at_layer=l, tokens=inputs["input_ids"], attention_mask=inputs["attention_mask"], **image)
            torch.testing.assert_close(out, logits, rtol=0, atol=1e-5)
        both = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, stop_at_layer=2, tokens=inputs["input_ids"],
                     attention_mask=inputs["attention_mask"], **image)
        torch.testing.assert_close(both, cache["blocks.2.hook_resid_pre"], rtol=0, atol=1e-5)
        loss = model(cache["blocks.2.hook_resid_pre"], start_at_layer=2, tokens=inputs["input_ids"],
                     attention_mask=inputs["attention_mask"], return_type="loss", **image)
    torch.testing.assert_close(loss, model(**inputs, return_type="loss"), rtol=0, atol=1e-5)
    assert set(fired) == {"ln_final.hook_scale", "ln_final.hook_normalized"}  # no embedding, no vision tower
    with torch.no_grad():  # run_with_cache passes it through: only the blocks that ran are cached
        out, part = model.run_with_cache(cache["blocks.2.hook_resid_pre"], start_at_layer=2, tokens=inputs["input_ids"],
                                         attention_mask=inputs["attention_mask"], **image)
    torch.testing.assert_close(out, logits, rtol=0, atol=1e-5)
    assert {k.split(".")[1] for k in part.keys() if k.startswith("blocks.")} == {"2"}
    assert not any(k.startswith(("hook_", "vision.", "projector.")) for k in part.keys())
    if model.cfg.family == "qwen2_vl":
        with pytest.raises(ValueError, match="M-RoPE"):
            model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="residual stream"):
        model(inputs["input_ids"], start_at_layer=1)


def test_pos_slice_slices_decoder_hooks_and_leaves_vision_whole(run):
    model, inputs, _, cache = run
    with torch.no_grad():
        for pos_slice, index in ((-1, [-1]), (5, [5]), ((2, 6), slice(2, 6))):
            _, sliced = model.run_with_cache(**inputs, pos_slice=pos_slice)
            assert set(sliced.keys()) == set(cache.keys())
            for name, full in cache.items():
                if name.startswith(("vision.", "projector.")):
                    assert torch.equal(sliced[name], full), name
                    continue
                dim = -3 if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q",
                                           "hook_rot_k")) else -2
                want = full[(slice(None),) * (full.ndim + dim) + (index,)]
                assert torch.equal(sliced[name], want), name


def test_names_filter_refuses_unknown_names_and_returns_dicts(run):
    model, inputs, _, cache = run
    with pytest.raises(ValueError, match=r"'blocks.0.hook_resid_pots'.*blocks.0.hook_resid_post"):
        model.run_with_cache(**inputs, names_filter=["blocks.0.hook_resid_pots"])
    with pytest.raises(ValueError, match="hook_embedd"):
        model.run_with_cache(**inputs, names_filter="hook_embedd")
    with torch.no_grad():
        out, plain = model.run_with_cache(**inputs, names_filter="blocks.1.hook_resid_post", return_cache_object=False)
    assert type(plain) is dict and list(plain) == ["blocks.1.hook_resid_post"]
    torch.testing.assert_close(plain["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"], rtol=0, atol=1e-5)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_to_str_tokens_shows_each_image_as_one_marker(run):
    model, inputs, *_ = run
    ids = inputs["input_ids"]
    n_img = [int(n) for n in (ids == model.cfg.image_token_id).sum(1)]
    rows = model.to_str_tokens(inputs)
    for b, row in enumerate(rows):
        assert row.count(f"<image 0: {n_img[b]} tokens>") == 1
        assert len(row) == ids.shape[1] - n_img[b] + 1
    expanded = model.to_str_tokens(ids[1], expand_images=True)
    assert len(expanded) == ids.shape[1] and expanded.count("<image 0>") == n_img[1]
    text_pos = int((ids[1] != model.cfg.image_token_id).nonzero()[-1])
    assert expanded[text_pos] == f"w{int(ids[1, text_pos])}"
    assert model.to_str_tokens("w5 w7") == ["w5", "w7"]


def test_to_str_tokens_splits_adjacent_images_by_the_layout():
    hf = tiny_llava()
    img = hf.config.image_token_id
    model = HookedVLM.from_hf(hf, word_tokenizer(64, img))
    one = llava_inputs(hf, batch=1)
    n = int((one["input_ids"] == img).sum())
    inputs = dict(input_ids=torch.tensor([[5] + [img] * (2 * n) + [7]]),
                  pixel_values=torch.cat([one["pixel_values"], one["pixel_values"]]))
    assert model.to_str_tokens(inputs)[0] == ["w5", f"<image 0: {n} tokens>", f"<image 1: {n} tokens>", "w7"]
    assert model.to_str_tokens(inputs["input_ids"][0]) == ["w5", f"<image 0: {2 * n} tokens>", "w7"]  # ids alone: runs


def test_set_use_attn_result_builds_hook_result_unhooked():
    model, inputs = _llava()
    fired = []
    handle = model.blocks[0].attn.hook_result.register_forward_hook(lambda m, i, o: fired.append(o.shape))
    try:
        with torch.no_grad():
            base = model(**inputs)
            assert not fired  # lazily built: only when hooked
            model.set_use_attn_result(True)
            assert model.cfg.use_attn_result
            torch.testing.assert_close(model(**inputs), base, rtol=0, atol=1e-5)
            assert fired == [(2, inputs["input_ids"].shape[1], model.cfg.n_heads, model.cfg.d_model)]
            model.set_use_attn_result(False)
            model(**inputs)
            assert len(fired) == 1
    finally:
        handle.remove()


def test_unembed_keeps_its_state_dict_key():
    model, _ = _llava()
    sd = model.state_dict()
    assert "unembed.weight" in sd and not any(k.startswith("unembed.") and k != "unembed.weight" for k in sd)
    assert torch.equal(model.unembed.b_U, torch.zeros(model.cfg.d_vocab))
