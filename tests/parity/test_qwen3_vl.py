"""Qwen3-VL parity against a tiny random HF model (tests/tiny.py `tiny_qwen3_vl`), with inputs from the real (PIL)
Qwen2-VL image processor that Qwen3-VL's processor wraps (`qwen_inputs`; same token ids as the Qwen2-VL tests).

Every layer's input is compared with what HF's decoder layer really receives (a forward pre-hook): HF's
`hidden_states[l]` is layer l-1's output BEFORE the DeepStack addition, so it is not layer l's input at image
positions for l <= number of DeepStack levels. Checks: logits, residual stream, eager patterns, final norm, image
and DeepStack features; left padding with images of different sizes; several images per prompt; text only;
the DeepStack hooks and decompose_resid at image positions; resampled position embeddings and interleaved M-RoPE
vs HF's own helpers; TokenLayout; resume; bf16; save_pretrained round trip; refused inputs.
"""
import pytest
import torch
from tiny import (QWEN_IMAGE, QWEN_VEND, bf16_errors, hf_final_norm_weight, qwen3_processor, qwen_inputs, random_image,
                  tiny_qwen3_vl)

from hooked_vlm import HookedVLM
from hooked_vlm.resume import capture, resume
from hooked_vlm.vision.qwen3_vit import position_interpolation

# prompt 0: one 16x24 px image (2x3 merged tokens) and left padding; prompt 1: 32x24 (4x3) then 8x16 (1x2)
MIXED = [[(16, 24)], [(32, 24), (8, 16)]]


@pytest.fixture(scope="module")
def pair():
    hf = tiny_qwen3_vl()
    return hf, HookedVLM.from_hf(hf)


def hf_run(hf, inputs):
    """HF forward (hidden states, eager attentions) plus the input every decoder layer really receives."""
    seen = []
    hook = lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"])  # noqa: E731
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in hf.model.language_model.layers]
    try:
        with torch.no_grad():
            out = hf(**inputs, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def compare(hf, model, inputs, tol: float = 1e-4, pattern_tol: float = 1e-5) -> dict[str, float]:
    ref, layer_inputs = hf_run(hf, inputs)
    with torch.no_grad():
        ours, cache = model.run_with_cache(**inputs)
    real = inputs["attention_mask"].bool()
    n = model.cfg.n_layers
    d = {"logits": (ref.logits - ours)[real].abs().max().item()}
    d["resid_pre"] = max((layer_inputs[l] - cache[f"blocks.{l}.hook_resid_pre"])[real].abs().max().item() for l in range(n))
    d["pattern"] = max((ref.attentions[l] - cache[f"blocks.{l}.attn.hook_pattern"]).permute(0, 2, 1, 3)[real].abs().max().item()
                       for l in range(n))
    final = cache["ln_final.hook_normalized"] * hf_final_norm_weight(hf)
    d["ln_final"] = (ref.hidden_states[-1] - final)[real].abs().max().item()
    if inputs.get("pixel_values") is not None:
        with torch.no_grad():
            feats = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        d["image_features"] = (torch.cat(feats.pooler_output) - cache["projector.hook_out"]).abs().max().item()
        image = inputs["input_ids"] == QWEN_IMAGE
        d["deepstack"] = 0.0
        for j, level in enumerate(feats.deepstack_features):
            added = cache[f"blocks.{j}.hook_deepstack"]
            assert torch.equal(added[~image], torch.zeros_like(added[~image]))  # nothing off the image tokens
            d["deepstack"] = max(d["deepstack"], (torch.cat(level) - added[image]).abs().max().item(),
                                 (torch.cat(level) - cache[f"projector.deepstack.{j}.hook_out"]).abs().max().item())
        assert d["image_features"] <= tol and d["deepstack"] <= tol, d
    assert d["logits"] <= tol and d["resid_pre"] <= tol and d["ln_final"] <= tol, d
    assert d["pattern"] <= pattern_tol, d
    assert ref.logits[real].std() > 0.3  # logits with spread: a wrong position or mask cannot hide under tol
    return d


def rope_index(hf, inputs):
    kw = {k: inputs.get(k) for k in ("image_grid_thw", "attention_mask")}
    return hf.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], **kw)[0]


def test_parity_left_padding_different_image_sizes(pair):
    inputs = qwen_inputs(MIXED)
    assert (inputs["attention_mask"] == 0).any() and inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 6], [1, 2, 4]]
    compare(*pair, inputs)


def test_real_processor_inputs_layout_and_to_tokens(pair):
    """The real Qwen3VLProcessor (image part, word-level tokenizer): left padding, three images of three sizes."""
    hf, _ = pair
    proc = qwen3_processor()
    model = HookedVLM.from_hf(hf, proc)
    img = "<|vision_start|> <|image_pad|> <|vision_end|>"
    texts = [f"w5 w6 {img} w7", f"w8 {img} w9 {img} w10 w11"]
    images = [random_image(16, 24), random_image(32, 24, 1), random_image(8, 16, 2)]
    inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 6], [1, 2, 4]] and (inputs["attention_mask"] == 0).any()
    compare(hf, model, inputs)
    layout = model.layout(inputs)
    assert layout.grids == [[{0: (2, 3)}], [{0: (4, 3)}, {0: (1, 2)}]]
    assert torch.equal(layout.position_ids, rope_index(hf, inputs))
    assert (inputs["input_ids"][layout.end_of_image(-1)] == QWEN_VEND).all()
    with model.bind_inputs(**inputs):
        assert torch.equal(model.to_tokens(texts), inputs["input_ids"])


def test_two_images_in_one_prompt(pair):
    compare(*pair, qwen_inputs([[(24, 16), (16, 32)]], seed=1))


def test_text_only_and_text_only_prompt_in_an_image_batch(pair):
    hf, model = pair
    ids = torch.randint(1, QWEN_IMAGE, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    compare(hf, model, inputs)
    compare(hf, model, dict(inputs, mm_token_type_ids=torch.zeros_like(ids)))
    assert torch.equal(model.layout(inputs).position_ids, torch.arange(9).expand(3, 2, 9))
    mixed = qwen_inputs([[], [(16, 24)]], seed=4)
    compare(hf, model, mixed)
    assert torch.equal(model.layout(mixed).position_ids, rope_index(hf, mixed))


def test_deepstack_matters_and_is_its_own_component(pair):
    hf, model = pair
    inputs = qwen_inputs(MIXED)
    real = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == QWEN_IMAGE
    assert model.cfg.deepstack_layers == [0, 1] and not hasattr(model.blocks[2], "hook_deepstack")
    zero = [(f"blocks.{j}.hook_deepstack", lambda a, hook: torch.zeros_like(a)) for j in (0, 1)]
    with torch.no_grad():
        base, cache = model.run_with_cache(**inputs)
        without = model.run_with_hooks(**inputs, fwd_hooks=zero)
    assert (without - base)[real].abs().max() > 1e-2  # negative control: DeepStack changes the output
    for l in range(model.cfg.n_layers + 1):  # decompose_resid sums to every layer's input, image positions included
        stack, labels = cache.decompose_resid(layer=l, return_labels=True)
        target = cache[f"blocks.{l}.hook_resid_pre"] if l < model.cfg.n_layers else cache["blocks.2.hook_resid_post"]
        assert (stack.sum(0) - target)[image].abs().max() <= 1e-5 and (stack.sum(0) - target).abs().max() <= 1e-5
        assert [x for x in labels if "deepstack" in x] == [f"{j}_deepstack" for j in (0, 1) if j < l]
    _, labels = cache.decompose_resid(layer=2, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "0_deepstack", "1_attn_out", "1_mlp_out", "1_deepstack"]
    assert "0_deepstack" not in cache.decompose_resid(layer=2, mode="mlp", return_labels=True)[1]
    for layer in (2, None):
        full, labels = cache.get_full_resid_decomposition(layer=layer, expand_neurons=True, return_labels=True)
        target = cache["blocks.1.hook_resid_post" if layer == 2 else "blocks.2.hook_resid_post"]
        assert "1_deepstack" in labels and (full.sum(0) - target).abs().max() <= 1e-4
    normalized = cache["ln_final.hook_normalized"]  # with the final norm and a projection onto a logit direction
    assert (cache.decompose_resid(layer=None, apply_ln=True).sum(0) - normalized).abs().max() <= 1e-5
    proj = cache.get_full_resid_decomposition(layer=None, apply_ln=True, project_output_onto=model.W_U[:, 5])
    assert (proj.sum(0) - base[..., 5]).abs().max() <= 1e-4
    one = cache.apply_slice_to_batch_dim(1)
    assert "1_deepstack" in one.decompose_resid(layer=2, return_labels=True)[1]


def test_resume_carries_the_deepstack_additions(pair):
    _, model = pair
    inputs = qwen_inputs(MIXED)
    saved = capture(model, inputs)
    with torch.no_grad():
        full = model(**inputs)
    p0 = int((inputs["input_ids"][1] == QWEN_IMAGE).nonzero()[0]) + 2  # inside the first image of prompt 1
    for layer in (0, 1, 2):
        assert (resume(model, saved, layer, p0) - full).abs().max() <= 1e-5
    saved.inject = None  # negative control: resuming without the additions is wrong from layer 0 on
    assert (resume(model, saved, 0, p0) - full).abs().max() > 1e-2


def test_vision_tower_hidden_states(pair):
    hf, model = pair
    inputs = qwen_inputs(MIXED)
    with torch.no_grad():
        ref = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True)
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("vision."))
    ours = [cache[f"vision.blocks.{i}.hook_resid_pre"][0] for i in range(3)] + [cache["vision.blocks.2.hook_resid_post"][0]]
    assert torch.equal(cache["vision.hook_embed"], cache["vision.blocks.0.hook_resid_pre"])
    assert len(ref.hidden_states) == len(ours)
    for r, o in zip(ref.hidden_states, ours):
        assert (r - o).abs().max() <= 1e-5


def test_position_resampling_and_interleaved_mrope_match_hf(pair):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    hf, model = pair
    for grid in ([[1, 4, 6]], [[1, 8, 6], [1, 2, 4]], [[1, 2, 2]], [[2, 12, 10], [1, 4, 16]]):
        grid = torch.tensor(grid)
        idx, w = position_interpolation(grid, 4, 2)
        ref_idx, ref_w = get_vision_interpolation_indices_and_weights(grid, 4, mode="bilinear", align_corners=True,
                                                                      spatial_merge_size=2)
        assert torch.equal(idx, ref_idx) and torch.allclose(w, ref_w, atol=1e-7)
    pos = torch.randint(0, 50, (3, 2, 11), generator=torch.Generator().manual_seed(0))
    cos, sin = model.rotary(pos, torch.float32)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(torch.zeros(1), pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert model.rotary.mrope_axes == [0, 1, 2, 0, 1, 2, 0, 1]  # mrope_section [2, 3, 3] over 8 frequencies
    sectioned = torch.cat([c[i % 3] for i, c in enumerate((pos[..., None].float() * model.rotary.inv_freq).split([2, 3, 3], -1))], -1)
    assert not torch.allclose(cos[..., :8], sectioned.cos())  # negative control: Qwen2-VL's sections differ


def test_layout_positions_and_end_of_image(pair):
    hf, model = pair
    inputs = qwen_inputs(MIXED)
    layout = model.layout(inputs)
    assert torch.equal(layout.position_ids, rope_index(hf, inputs))
    assert layout.grids == [[{0: (2, 3)}], [{0: (4, 3)}, {0: (1, 2)}]]
    first = layout.image_positions(0)[0]
    assert layout.row[0, first].tolist() == [0, 0, 0, 1, 1, 1] and layout.col[0, first].tolist() == [0, 1, 2, 0, 1, 2]
    assert (layout.crop[layout.is_image] == 0).all()
    for image in (0, -1):
        assert (inputs["input_ids"][layout.end_of_image(image)] == QWEN_VEND).all()
        assert (inputs["input_ids"][layout.last_image_token(image)] == QWEN_IMAGE).all()


def test_bf16_within_documented_tolerance():
    inputs = qwen_inputs(MIXED)
    our_err, hf_err, model, ours = bf16_errors(tiny_qwen3_vl(), inputs, real=inputs["attention_mask"].bool())
    assert model.cfg.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
    assert 0 < our_err <= 2 * hf_err, (our_err, hf_err)


def test_save_pretrained_round_trip_and_tied_embeddings(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path), processor=None)
    compare(hf, model, qwen_inputs(MIXED))
    tied = tiny_qwen3_vl(seed=1, tie=True, deepstack=(1,))
    model = HookedVLM.from_hf(tied)
    assert model.cfg.tie_word_embeddings and model.cfg.deepstack_layers == [0]
    compare(tied, model, qwen_inputs([[(8, 16), (16, 8)]], seed=2))


def test_refused_inputs(pair):
    _, model = pair
    inputs = qwen_inputs([[(16, 24)]])
    with pytest.raises(ValueError, match="video"):
        model(**inputs, video_grid_thw=torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="video"):
        model(**inputs, pixel_values_videos=torch.zeros(32, 96))
    with pytest.raises(TypeError, match="mm_encoder_outputs"):
        model(**inputs, mm_encoder_outputs={})
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    video = dict(inputs, mm_token_type_ids=inputs["mm_token_type_ids"] * 2)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**video)


def test_edge_attribution_has_deepstack_nodes():
    """analyses.edges: DS{l} nodes make the decoder graph complete (every edge kept = the clean run, none = the
    corrupt one, exactly), the DeepStack edges carry part of an image counterfactual, EAP-IG(1) == EAP, and the
    image-path graph refuses DeepStack models by name."""
    from hooked_vlm.analyses.edge_graph import node_names, valid_edges
    from hooked_vlm.analyses.edge_patching import edge_effects, faithfulness
    from hooked_vlm.analyses.edges import eap, eap_ig
    from hooked_vlm.analyses.metrics import LogitDiff

    model = HookedVLM.from_hf(tiny_qwen3_vl()).double()
    clean = qwen_inputs([[(16, 16)], [(16, 8)]], seed=0)
    clean["pixel_values"] = clean["pixel_values"].double()
    noise = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    corrupt = dict(clean, pixel_values=clean["pixel_values"] + noise)
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    assert node_names(model)[-2:] == ["DS0", "DS1"] and ("DS0", "L1H0.k") in valid_edges(model)
    assert ("DS1", "L1H0.k") not in valid_edges(model) and ("DS0", "MLP0") not in valid_edges(model)
    with torch.no_grad():
        m_clean, m_corrupt = metric(model(**clean)).mean(), metric(model(**corrupt)).mean()
    tol = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(faithfulness(model, clean, corrupt, metric, valid_edges(model)).value, m_clean, **tol)
    torch.testing.assert_close(faithfulness(model, clean, corrupt, metric, []).value, m_corrupt, **tol)
    without = [e for e in valid_edges(model) if not e[0].startswith("DS")]
    assert (faithfulness(model, clean, corrupt, metric, without).value - m_clean).abs() > 0.05
    graph = eap(model, clean, corrupt, metric)
    torch.testing.assert_close(eap_ig(model, clean, corrupt, metric, steps=1).scores, graph.scores, equal_nan=True, **tol)
    assert graph.score("DS0", "L1H0.v").abs() > 1e-3
    assert edge_effects(model, clean, corrupt, metric, [("DS0", "L1H0.k")], progress=False).abs().max() > 1e-3
    with pytest.raises(NotImplementedError, match="DeepStack"):
        valid_edges(model, image_path=True)


def test_path_patching_deepstack_senders(pair):
    """analyses.paths: "DS{l}" senders. DS1 is added after block 1, so it has no path into layer-1 receivers (exactly
    0); DS0 reaches L1H0's keys; a counterfactual equal to the clean inputs gives 0; unknown levels raise."""
    from hooked_vlm.analyses.metrics import LogitDiff
    from hooked_vlm.analyses.paths import path_patch

    _, model = pair
    clean = qwen_inputs([[(16, 16)], [(16, 8)]], seed=0)
    corrupt = dict(clean, pixel_values=qwen_inputs([[(16, 16)], [(16, 8)]], seed=1)["pixel_values"])
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    res = path_patch(model, clean, corrupt, metric, senders=["DS0", "DS1", ["DS0", "DS1", "projector"]],
                     receivers=[(1, "k", 0)], progress=False)
    effect = res.effect()
    assert effect[1] == 0 and effect[0].abs() > 1e-3 and res.labels["sender"][2] == ["projector", "DS0", "DS1"]
    same = path_patch(model, clean, clean, metric, senders=["DS0"], receivers="logits", progress=False)
    assert same.effect().abs().max() <= 1e-6
    with pytest.raises(ValueError, match="DeepStack features after blocks \\[0, 1\\] only"):
        path_patch(model, clean, corrupt, metric, senders=["DS2"], receivers="logits", progress=False)

