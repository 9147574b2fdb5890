"""hooked_vlm.resume: a forward resumed at (layer, position) from a saved run equals the full forward."""
from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.resume import capture, resume, safe_start
from tiny import gemma3_inputs, gemma3_processor, llava_inputs, qwen_inputs, tiny_gemma3, tiny_llava, tiny_qwen_vl


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "gemma3"])
def model_and_inputs(request):
    if request.param == "llava":
        hf = tiny_llava()
        return HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)
    if request.param == "gemma3":  # bidirectional image blocks: resume restarts at an image's first token
        hf = tiny_gemma3()
        return HookedVLM.from_hf(hf), gemma3_inputs(gemma3_processor(hf), (2, 1))
    return HookedVLM.from_hf(tiny_qwen_vl()), qwen_inputs([[(16, 16)], [(8, 16)]])


@torch.no_grad()
def test_resume_equals_forward_everywhere(model_and_inputs):
    model, inputs = model_and_inputs
    ref = model(**inputs)
    saved = capture(model, inputs)
    assert torch.equal(saved.logits, ref)
    s = inputs["input_ids"].shape[1]
    for layer in range(model.cfg.n_layers):
        for pos in (0, 1, s // 2, s - 1):
            out = resume(model, saved, layer, safe_start(saved, pos), n=2)
            torch.testing.assert_close(out, torch.cat([ref, ref]), rtol=0, atol=1e-5)


@torch.no_grad()
def test_resume_runs_only_the_suffix_and_hooks_see_it(model_and_inputs):
    model, inputs = model_and_inputs
    saved = capture(model, inputs)
    s, seen = inputs["input_ids"].shape[1], {}
    fwd = [(f"blocks.{l}.hook_resid_pre", lambda t, hook: seen.__setitem__(hook.name, tuple(t.shape)))
           for l in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=fwd + [("vision.hook_patch_embed", lambda t, hook: seen.__setitem__("vision", 1))]):
        resume(model, saved, 1, s - 3, n=3)
    assert seen == {f"blocks.{l}.hook_resid_pre": (6, 3, model.cfg.d_model) for l in range(1, model.cfg.n_layers)}


def test_resume_checks_its_arguments(model_and_inputs):
    model, inputs = model_and_inputs
    saved = capture(model, inputs)
    with pytest.raises(ValueError, match="layer 99 is outside"):
        resume(model, saved, 99, 0)
    with pytest.raises(ValueError, match="position 1000 is outside"):
        resume(model, saved, 0, 1000)


@torch.no_grad()
def test_logits_to_keep(model_and_inputs):
    """HF's `logits_to_keep`: the last k positions, or chosen positions, equal the full logits there."""
    model, inputs = model_and_inputs
    full = model(**inputs)
    torch.testing.assert_close(model(**inputs, logits_to_keep=1), full[:, -1:], rtol=0, atol=1e-6)
    idx = torch.tensor([0, 3, full.shape[1] - 2])
    torch.testing.assert_close(model(**inputs, logits_to_keep=idx), full[:, idx], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**inputs, logits_to_keep=full.shape[1] + 1)
