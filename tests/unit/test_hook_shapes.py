"""model.hook_shapes(inputs) / model.hook_names(inputs): every hook with its shape for the inputs at hand."""
import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm import HookedVLM


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava(layer=-2)  # the last vision block is after the feature layer: it never runs
    model = HookedVLM.from_hf(hf)
    return model, llava_inputs(hf, batch=2, text_len=5)


def test_shapes_match_a_full_cache(setup):
    model, inputs = setup
    shapes = model.hook_shapes(inputs)
    assert list(shapes) == model.hook_names()  # every hook, in hook order
    _, cache = model.run_with_cache(**inputs)
    for name, shape in shapes.items():
        if name in cache.cache_dict:
            assert shape == tuple(cache[name].shape), name
        else:
            assert shape is None, name
    b, s = inputs["input_ids"].shape
    assert shapes["blocks.0.attn.hook_pattern"] == (b, model.cfg.n_heads, s, s)
    assert shapes["blocks.1.attn.hook_k"] == (b, s, model.cfg.n_key_value_heads, model.cfg.d_head)
    assert shapes["hook_embed"] == (b, s, model.cfg.d_model)
    last_vision = model.cfg.vision.n_layers - 1
    assert shapes[f"vision.blocks.{last_vision}.hook_resid_post"] is None  # skipped: after the feature layer
    assert "did not run" in repr(shapes) and "blocks.0.attn.hook_pattern" in repr(shapes)


def test_hook_names_keeps_returning_the_list(setup):
    model, inputs = setup
    names = model.hook_names()
    assert isinstance(names, list) and names == list(model.hook_dict)
    with_shapes = model.hook_names(inputs)
    assert list(with_shapes) == names and with_shapes["hook_embed"][0] == 2


def test_no_hooks_or_tensors_left_behind(setup):
    model, inputs = setup
    model.hook_shapes(inputs)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    shapes = model.hook_shapes(input_ids=inputs["input_ids"][:1], pixel_values=inputs["pixel_values"][:1])
    assert all(v is None or (isinstance(v, tuple) and all(isinstance(d, int) for d in v)) for v in shapes.values())
    assert shapes["hook_embed"][0] == 1
    with torch.no_grad():  # the model still runs its fast path afterwards
        assert model(**inputs).shape[:2] == inputs["input_ids"].shape


def test_repr_names_the_architecture(setup):
    model, _ = setup
    text = repr(model).splitlines()[1]
    assert "family='llava'" in text and f"n_layers={model.cfg.n_layers}" in text and "hooks" in text
