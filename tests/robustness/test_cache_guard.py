"""run_with_cache's guards (hooked_vlm/cache_guard.py): the size estimate is an upper bound for every hook of every
family (vision `hook_result` included) and not far above in total; cache entries are not rewritten by a later hook's
in-place edit; empty prompts are refused."""
import pytest
import torch
from tiny import (llava_inputs, onevision_processor, qwen_inputs, random_image, tiny_llava, tiny_llava_onevision,
                  tiny_qwen_vl)

from hooked_vlm import HookedVLM
from hooked_vlm.cache_guard import estimate_hook_bytes

FAMILIES = ["llava_clip", "llava_siglip", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]


def _build(kind):
    if kind.startswith("llava_") and kind != "llava_onevision":
        hf = tiny_llava(kind.split("_")[1], strategy="full", layer=[-2, -1] if kind == "llava_siglip" else -2)
        return HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)
    if kind == "llava_onevision":
        hf = tiny_llava_onevision()
        proc = onevision_processor(hf)
        inputs = dict(proc(text=["w2 <image> w3 <image> w4", "w5 <image> w6"],
                           images=[[random_image(40, 24, 3), random_image(20, 50, 4)], [random_image(64, 32, 5)]],
                           return_tensors="pt", padding=True))
        return HookedVLM.from_hf(hf, proc), inputs
    return HookedVLM.from_hf(tiny_qwen_vl(kind)), qwen_inputs([[(16, 24)], [(8, 8), (16, 16)]])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, *_build(request.param)


def _bytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("which", ["all", "hook_result"])
def test_estimate_bounds_every_hook(family, which):
    kind, model, inputs = family
    names_filter = None if which == "all" else (lambda n: n.endswith("hook_result"))
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names_filter)
    names = [n for n in model.hook_dict if names_filter is None or names_filter(n)]
    est = estimate_hook_bytes(model, inputs, names)
    under = {n: (est[n], _bytes(cache[n])) for n in cache.cache_dict if est[n] < _bytes(cache[n])}
    assert under == {}, under
    actual = sum(_bytes(t) for t in cache.cache_dict.values())
    total = model.estimate_cache_bytes(inputs, names_filter)
    assert total == sum(est.values())
    assert actual <= total <= 4 * actual, (kind, total / actual)
    assert any(n.startswith("vision.") for n in cache.cache_dict)  # the tower's hooks are part of the check
    # the guard refuses a limit just under what the cache really takes (it used to let vision hook_result through)
    with pytest.raises(ValueError, match="over max_cache_bytes"):
        model.run_with_cache(**inputs, names_filter=names_filter, max_cache_bytes=actual - 1)


# ------------------------------------------------------------------------------------------------ aliasing
@pytest.fixture(scope="module")
def llava():
    hf = tiny_llava()
    return HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)


def _zero_pos3(x, hook):
    x[:, 3] = 0  # in place, returns None


def test_in_place_edit_does_not_rewrite_earlier_cache_entries(llava):
    model, inputs = llava
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(**inputs)
        edited_ref = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.hook_resid_pre", _zero_pos3)])
        model.add_hook("blocks.1.hook_resid_pre", _zero_pos3)
        model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x.mul_(1.0))  # in place on hook_embed's tensor
        try:
            logits, cache = model.run_with_cache(**inputs)
        finally:
            model.reset_hooks()
    assert torch.equal(cache["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"])
    assert cache["blocks.0.hook_resid_post"][:, 3].abs().sum() > 0
    assert torch.equal(cache["hook_embed"], clean["hook_embed"])
    assert (cache["blocks.1.hook_resid_pre"][:, 3] == 0).all()  # the edited point caches what flows on
    # the edit took effect (caching hook_pattern takes the explicit attention path: equal to round-off)
    assert torch.allclose(logits, edited_ref, atol=1e-5) and (logits - clean_logits).abs().max() > 1e-2
    assert not any(hp.has_hooks() or hp._forward_pre_hooks for hp in model.hook_dict.values())


def test_plain_cache_copies_nothing(llava):
    """Without hooks of the user's, aliased entries keep sharing storage (no extra memory)."""
    model, inputs = llava
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    a, b = cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_alias_guard_removed_after_an_exception(llava):
    model, inputs = llava

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
    model.add_hook("blocks.1.hook_resid_pre", boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model.run_with_cache(**inputs)
    finally:
        model.reset_hooks()
    assert not any(hp.has_hooks() or hp._forward_pre_hooks for hp in model.hook_dict.values())


# ------------------------------------------------------------------------------------------- empty prompts
@pytest.mark.parametrize("shape", [(1, 0), (0, 5), (0, 0)])
def test_empty_prompt_refused(llava, shape):
    model, _ = llava
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"input_ids: expected at least one prompt of at least one token, got shape "
                                         rf"\({shape[0]}, {shape[1]}\)"):
        model(ids)
    with pytest.raises(ValueError, match="at least one token"):
        model.run_with_cache(ids)
