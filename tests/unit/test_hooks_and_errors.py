"""Core behaviour beyond parity: writes take effect, the fused path, per-head results, hook hygiene, errors."""
import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm import HookedVLM
from hooked_vlm.components.attention import Attention


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    return hf, HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)


def test_cache_run_equals_plain_forward(setup):
    _, model, inputs = setup
    with torch.no_grad():
        plain = model(**inputs)
        cached, cache = model.run_with_cache(**inputs)
    assert torch.allclose(plain, cached, atol=1e-5)
    assert "hook_pos_embed" not in cache  # rotary model: TL's decompose_resid must not add a positional part
    assert cache["hook_embed"].shape == cache["hook_token_embed"].shape


def test_pattern_edits_take_effect(setup):
    _, model, inputs = setup
    with torch.no_grad():
        base = model(**inputs)
        same = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: p.clone())])
        uniform = model.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: torch.ones_like(p) / p.shape[-1])]
        )
    assert torch.allclose(base, same, atol=1e-5)
    assert (base - uniform).abs().max() > 1e-2


def test_fused_path_builds_no_pattern_unless_asked(setup, monkeypatch):
    _, model, inputs = setup
    calls = []
    original = Attention._explicit
    monkeypatch.setattr(Attention, "_explicit", lambda self, *a: calls.append(self) or original(self, *a))
    with torch.no_grad():
        model(**inputs)
        assert calls == []
        model.run_with_cache(**inputs, names_filter="blocks.2.attn.hook_pattern")
    assert calls == [model.blocks[2].attn]  # only the asked-for layer switched to the explicit path


def test_head_results_sum_to_attn_out(setup):
    _, model, inputs = setup
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out")))
    for l in range(model.cfg.n_layers):
        total = cache[f"blocks.{l}.attn.hook_result"].sum(-2) + model.blocks[l].attn.b_O
        assert torch.allclose(total, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5)


def test_decompose_resid_sums_to_final_residual_at_image_positions(setup):
    _, model, inputs = setup
    _, cache = model.run_with_cache(**inputs)
    stack = cache.decompose_resid(layer=None, mode="all", apply_ln=False, return_labels=False)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.allclose(stack.sum(0), final, atol=1e-5)


def test_hooks_removed_when_forward_raises(setup):
    _, model, inputs = setup

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_post", boom)])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    with pytest.raises(RuntimeError):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", boom)]):
            model(**inputs)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_reset_hooks_keeps_permanent_hooks(setup):
    _, model, inputs = setup
    seen = []
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1))
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: None)
    model.reset_hooks()
    assert model.hook_dict["blocks.0.hook_resid_pre"].has_hooks() and not model.hook_dict["blocks.0.hook_resid_post"].has_hooks()
    model(**inputs)
    assert seen == [1]
    model.reset_hooks(including_permanent=True)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_vision_and_projector_hooks_named_and_editable(setup):
    _, model, inputs = setup
    names = model.hook_names()
    for name in ("vision.hook_patch_embed", "vision.blocks.0.attn.hook_pattern", "vision.blocks.0.hook_resid_post",
                 "projector.hook_out", "hook_token_embed", "hook_embed", "blocks.0.ln1.hook_normalized",
                 "blocks.0.attn.hook_rot_q", "blocks.0.mlp.hook_post", "ln_final.hook_normalized"):
        assert name in names, name
    with torch.no_grad():
        base = model(**inputs)
        zeroed = model.run_with_hooks(**inputs, fwd_hooks=[("projector.hook_out", lambda x, hook: torch.zeros_like(x))])
    assert (base - zeroed).abs().max() > 1e-2


def test_unknown_keyword_is_named(setup):
    _, model, inputs = setup
    with pytest.raises(TypeError, match="image_grid_thw"):
        model(**inputs, image_grid_thw=torch.ones(1, 3))


def test_image_token_count_mismatch_names_both_counts(setup):
    _, model, inputs = setup
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 4] = 1  # one image token less
    with pytest.raises(ValueError, match=r"31 image tokens.*32 feature vectors"):
        model(**bad)


def test_bad_pixel_values(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match="pixel_values"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"].long()))
    with pytest.raises(ValueError, match=r"pixel_values: expected \[n_images, 3, 32, 32\]"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:, :, :16]))


def test_unsupported_family_lists_supported():
    from hooked_vlm import get_family

    with pytest.raises(ValueError, match="supported: .*llava"):
        get_family("gpt2")


def test_pickle_checkpoints_are_refused(tmp_path):
    hf = tiny_llava()
    hf.config.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_layout_of_llava_prompt(setup):
    _, model, inputs = setup
    lay = model.layout(inputs)
    assert lay.is_image.sum(1).tolist() == [16, 16]
    # prompt 0 is left-padded by 2: its image starts after 2 pads + 2 text tokens
    assert lay.image_positions()[0].nonzero().flatten().tolist() == list(range(4, 20))
    assert lay.last_image_token()[0].nonzero().item() == 19 and lay.end_of_image()[0].nonzero().item() == 20  # no marker: first text after
    assert lay.first_after_image()[0].nonzero().item() == 20
    box = lay.in_box(0, 0, 0.5, 0.5)
    assert box.sum(1).tolist() == [4, 4]  # 4x4 grid: the upper-left quarter is 2x2 tokens
    assert set(lay.row[box].tolist()) == {0, 1} and set(lay.col[box].tolist()) == {0, 1}
    assert lay.text_positions()[0, :2].tolist() == [False, False]  # pads are not text
    with pytest.raises(ValueError, match="other inputs"):
        lay.check_inputs(inputs["input_ids"].flip(1))


def test_unknown_hook_name_suggests_nearest(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match=r"did you mean \['blocks.1.attn.hook_pattern'"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(ValueError, match="no hook point named"):
        model.add_hook("blocks.9.hook_resid_pre", lambda x, hook: x)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_hook_returning_wrong_shape_or_dtype_is_named(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match=r"hook on 'blocks.0.hook_resid_post' returned Tensor \(2, 27\)"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x[..., 0])])
    with pytest.raises(ValueError, match="dtype torch.float32"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.double())])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    with torch.no_grad():  # and the model is unharmed afterwards
        assert torch.allclose(model(**inputs), model.run_with_hooks(**inputs, fwd_hooks=[]), atol=0)
