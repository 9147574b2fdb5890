"""Each family parses its image inputs ONCE per call into one frozen plan (`Family.plan` -> `ImageInputs`) that the
tower, the projector, the positions, the attention groups and TokenLayout all read. The tests count the calls of
the plan builder and of the checks / geometry builders inside it, per forward, per `layout` and per
`run_with_cache`, for every family; and that the plan cannot be changed after it is built."""
import dataclasses

import pytest
import torch
from tiny import (gemma3_inputs, gemma3_processor, llava_inputs, onevision_processor, qwen_inputs, random_image,
                  tiny_gemma3, tiny_llava, tiny_llava_onevision, tiny_qwen3_vl, tiny_qwen_vl)

import hooked_vlm.families.gemma3 as gemma3_mod
import hooked_vlm.families.llava_onevision as ov_mod
import hooked_vlm.families.qwen2_vl as qwen_mod
import hooked_vlm.vision.qwen_vit as qwen_vit
from hooked_vlm import HookedVLM

FAMILIES = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"]


def build(kind):
    if kind == "llava":
        hf = tiny_llava()
        return HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=1)
    if kind == "llava_onevision":
        hf = tiny_llava_onevision()
        proc = onevision_processor(hf)
        inputs = proc(text=["w2 <image> w3 <image> w4", "w5 <image> w6"], padding=True, return_tensors="pt",
                      images=[[random_image(40, 24, 3), random_image(20, 50, 4)], [random_image(64, 32, 5)]])
        return HookedVLM.from_hf(hf, proc), dict(inputs)
    if kind == "gemma3":
        hf = tiny_gemma3()
        proc = gemma3_processor(hf)
        return HookedVLM.from_hf(hf, proc), gemma3_inputs(proc, images_per_prompt=(2, 1))
    hf = tiny_qwen3_vl() if kind == "qwen3_vl" else tiny_qwen_vl(kind)
    return HookedVLM.from_hf(hf), qwen_inputs([[(16, 24), (16, 16)], [(24, 16)]])


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    model, inputs = build(request.param)
    return request.param, model, inputs


class Counter:
    """Wraps `owner.name` (a function or method) and counts its calls."""

    def __init__(self, monkeypatch, owner, name):
        self.n, inner = 0, getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.n += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


def n_images(kind, inputs):
    if kind.startswith("qwen"):
        return len(inputs["image_grid_thw"])
    return len(inputs["image_sizes"]) if kind == "llava_onevision" else len(inputs["pixel_values"])


@pytest.mark.parametrize("call", ["forward", "layout", "run_with_cache"])
def test_one_plan_per_call(setup, monkeypatch, call):
    kind, model, inputs = setup
    plans = Counter(monkeypatch, type(model.family), "plan")
    # the checks / geometry builders that used to run once per family method (up to three times per forward)
    inner = {}
    if kind == "llava_onevision":
        inner["plan_image"] = Counter(monkeypatch, ov_mod, "plan_image")  # once per image
        inner["_check_batch_num_images"] = Counter(monkeypatch, ov_mod.LlavaOnevision, "_check_batch_num_images")
    if kind.startswith("qwen"):
        inner["_check"] = Counter(monkeypatch, qwen_mod.Qwen2VL, "_check")
        inner["_check_grid"] = Counter(monkeypatch, qwen_vit, "_check_grid")
        inner["window_partition"] = Counter(monkeypatch, qwen_vit, "window_partition")
        inner["mrope_position_ids"] = Counter(monkeypatch, qwen_mod, "mrope_position_ids")
    if kind == "gemma3":
        inner["image_groups"] = Counter(monkeypatch, gemma3_mod, "image_groups")
    if kind in ("llava", "llava_onevision"):
        inner["_strategy"] = Counter(monkeypatch, type(model.family), "_strategy")
    with torch.no_grad():
        if call == "forward":
            model(**inputs)
        elif call == "layout":
            model.layout(inputs)
        else:
            model.run_with_cache(**inputs, names_filter="hook_embed")
    assert plans.n == 1, (kind, call, plans.n)
    want = {"plan_image": n_images(kind, inputs), "window_partition": int(kind == "qwen2_5_vl")}
    got = {name: c.n for name, c in inner.items()}
    assert got == {name: want.get(name, 1) for name in inner}, (kind, call, got)


def test_plan_is_frozen_and_read_only(setup):
    kind, model, inputs = setup
    image = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    plan = model.family.plan(model, inputs["input_ids"], **image)
    assert plan.pixel_values is inputs["pixel_values"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.geometry = None
    with pytest.raises(TypeError):
        plan.options["extra"] = 1
    if plan.geometry is not None and dataclasses.is_dataclass(plan.geometry):
        field = dataclasses.fields(plan.geometry)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(plan.geometry, field, None)


def test_start_at_layer_builds_one_plan(setup, monkeypatch):
    """forward(resid, start_at_layer=l, tokens=...) reads positions and attention groups from one plan too."""
    kind, model, inputs = setup
    image = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    start = max(model.cfg.deepstack_layers, default=0) + 1  # after Qwen3-VL's DeepStack additions
    name = f"blocks.{start}.hook_resid_pre"
    with torch.no_grad():
        full, cache = model.run_with_cache(**inputs, names_filter=name)
        plans = Counter(monkeypatch, type(model.family), "plan")
        resumed = model(cache[name], start_at_layer=start, tokens=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"], **image)
    assert plans.n == 1
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(resumed[real], full[real], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- projector.hook_out contract
def image_counterfactual(inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pv = inputs["pixel_values"]
    return dict(inputs, pixel_values=pv + 0.5 * torch.randn(pv.shape, generator=gen))


def test_projector_hook_out_is_flat_in_reading_order(setup):
    """projector.hook_out: [n_image_tokens, d_model] in every family, row i = the feature at the i-th image position
    (= hook_embed there); a hook that rewrites a row rewrites that position's input and nothing else."""
    kind, model, inputs = setup
    lay = model.layout(inputs)
    n = int(lay.is_image.sum())
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=["projector.hook_out", "hook_embed"])
    out = cache["projector.hook_out"]
    assert tuple(out.shape) == (n, model.cfg.d_model), (kind, tuple(out.shape))
    torch.testing.assert_close(out, cache["hook_embed"][lay.is_image], rtol=0, atol=0)
    # patch one row: exactly that (prompt, position) changes in hook_embed
    row = n // 2 + 1
    b, p = lay.is_image.nonzero()[row].tolist()
    v = torch.full((model.cfg.d_model,), 0.25)

    def put(act, hook):
        act = act.clone()
        act[row] = v
        return act

    seen = {}
    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[("projector.hook_out", put),
                                                  ("hook_embed", lambda x, hook: seen.update(x=x.clone()))])
    changed = (seen["x"] != cache["hook_embed"]).any(-1)
    assert changed.nonzero().tolist() == [[b, p]] and torch.equal(seen["x"][b, p], v)


def test_patching_projector_hook_out_restores_the_image(setup):
    """Patching projector.hook_out from the clean run into an image counterfactual gives the clean image features
    at every image position (Qwen3-VL's DeepStack additions come from their own mergers, so there the logits are
    not fully restored); everywhere else it restores the clean logits (patch_sweep, normalized 1)."""
    from hooked_vlm.analyses.patching import patch_sweep
    from hooked_vlm.analyses.metrics import LogitDiff

    kind, model, clean = setup
    corrupt = image_counterfactual(clean)
    lay = model.layout(clean)
    with torch.no_grad():
        _, cc = model.run_with_cache(**clean, names_filter=["projector.hook_out", "hook_embed"])
        seen = {}
        out = model.run_with_hooks(**corrupt, fwd_hooks=[
            ("projector.hook_out", lambda x, hook: cc["projector.hook_out"]),
            ("hook_embed", lambda x, hook: seen.update(x=x.clone()))])
        torch.testing.assert_close(seen["x"], cc["hook_embed"], rtol=0, atol=0)
        if kind != "qwen3_vl":
            torch.testing.assert_close(out, model(**clean), rtol=0, atol=1e-5)
    if kind == "qwen3_vl":
        return
    b = clean["input_ids"].shape[0]
    metric = LogitDiff(torch.tensor([3] * b), torch.tensor([5] * b), clean["attention_mask"])
    # whole hook, and a row subset (the image tokens of prompt 0) given as a bool mask over the rows
    rows0 = lay.image_index[lay.is_image] >= 0
    rows0 &= (torch.arange(lay.shape[0])[:, None].expand(lay.shape)[lay.is_image] == 0)
    res = patch_sweep(model, clean, corrupt, metric, sites=[("projector.hook_out", None), ("projector.hook_out", rows0)],
                      per_prompt=True, progress=False)
    assert (res.clean - res.corrupt).abs().min() > 1e-4
    torch.testing.assert_close(res.scores[0], res.clean, rtol=0, atol=1e-5)
    # prompt 0 restored; prompt 1's images left corrupt (its own image tokens were not patched)
    torch.testing.assert_close(res.scores[1, 0], res.clean[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(res.scores[1, 1], res.corrupt[1], rtol=0, atol=1e-5)
