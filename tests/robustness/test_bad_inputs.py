"""Bad inputs not covered by tests/unit/test_hooks_and_errors.py: each fails with an error naming the argument
(and what was expected / given), or is handled deliberately (documented below)."""
import pytest
import torch
from tiny import (llava_inputs, onevision_processor, qwen_inputs, random_image, tiny_llava, tiny_llava_onevision,
                  tiny_qwen_vl)

from hooked_vlm import HookedVLM


@pytest.fixture(scope="module")
def llava():
    hf = tiny_llava()
    return HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)


@pytest.fixture(scope="module")
def qwen():
    return HookedVLM.from_hf(tiny_qwen_vl()), qwen_inputs([[(16, 24)], [(8, 8)]])


@pytest.fixture(scope="module")
def onevision():
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    inputs = dict(proc(text=["w2 <image> w3 <image> w4", "w5 <image> w6"],
                       images=[[random_image(40, 24, 3), random_image(20, 50, 4)], [random_image(64, 32, 5)]],
                       return_tensors="pt", padding=True))
    assert inputs["batch_num_images"].tolist() == [2, 1]
    return HookedVLM.from_hf(hf, proc), inputs


# ------------------------------------------------------------------------------- pixel_values dtype / device
# Decision: another floating dtype is CAST to the tower's weight dtype (as HF does: parity with HF, which accepts
# float64 pixels into a float32 model); non-float dtypes raise (covered in unit tests); a meta tensor (no data)
# raises naming pixel_values; pixels on another real device are moved to the model's device, as input_ids are.
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_float64_pixel_values_are_cast(family, llava, qwen):
    model, inputs = llava if family == "llava" else qwen
    with torch.no_grad():
        base = model(**inputs)
        f64 = model(**dict(inputs, pixel_values=inputs["pixel_values"].double()))
        f16 = model(**dict(inputs, pixel_values=inputs["pixel_values"].half()))
    assert f64.dtype == torch.float32 and torch.equal(base, f64)
    assert (base - f16).abs().max() < 0.05  # half-precision pixels: cast too, only rounding differs


def test_meta_pixel_values_named(llava):
    model, inputs = llava
    with pytest.raises(ValueError, match=r"pixel_values: expected a tensor with data \(the model is on cpu\), got a meta"):
        model(**dict(inputs, pixel_values=torch.empty_like(inputs["pixel_values"], device="meta")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_pixel_values_on_other_device_follow_the_model(llava):
    model, inputs = llava
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**dict(inputs, pixel_values=inputs["pixel_values"].cuda())))


# ------------------------------------------------------------------------------------------------ Qwen2-VL
def test_qwen_missing_image_grid_thw_named(qwen):
    model, inputs = qwen
    bad = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="pixel_values were given without image_grid_thw"):
        model(**bad)
    with pytest.raises(ValueError, match="without image_grid_thw"):
        model.layout(bad)


def test_qwen_float_image_grid_thw_named(qwen):
    model, inputs = qwen
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**dict(inputs, image_grid_thw=inputs["image_grid_thw"].float()))


def test_qwen_image_grid_thw_wrong_count_named(qwen):
    model, inputs = qwen
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**dict(inputs, image_grid_thw=inputs["image_grid_thw"][:1]))


# ------------------------------------------------------------------------------------------ LLaVA-OneVision
@pytest.mark.parametrize("counts", [[1, 2], [3], [1, 1, 1]])
def test_onevision_inconsistent_batch_num_images_named(onevision, counts):
    model, inputs = onevision
    with pytest.raises(ValueError, match="batch_num_images"):
        model(**dict(inputs, batch_num_images=torch.tensor(counts)))


def test_onevision_inconsistent_batch_num_images_raises(onevision):
    """Whatever the message, an inconsistent batch_num_images never runs silently."""
    model, inputs = onevision
    for counts in ([1, 2], [3], [1, 1, 1]):
        with pytest.raises(ValueError):
            model(**dict(inputs, batch_num_images=torch.tensor(counts)))
        with pytest.raises(ValueError):
            model.layout(dict(inputs, batch_num_images=torch.tensor(counts)))


# -------------------------------------------------------------------------------------- unknown kwargs
@pytest.mark.parametrize("family,bad", [("llava", "image_sizes"), ("llava", "inputs_embeds"), ("qwen", "image_sizes"),
                                        ("qwen", "vision_feature_layer"), ("onevision", "image_grid_thw"),
                                        ("onevision", "mm_token_type_ids")])
def test_unknown_kwargs_per_family(family, bad, llava, qwen, onevision):
    model, inputs = {"llava": llava, "qwen": qwen, "onevision": onevision}[family]
    with pytest.raises(TypeError, match=rf"unexpected keyword\(s\) \['{bad}'\]; it takes \["):
        model(**inputs, **{bad: torch.ones(1)})
    with pytest.raises(TypeError, match=bad):
        with model.bind_inputs(**{bad: torch.ones(1)}):
            pass
    with pytest.raises(TypeError, match=bad):
        model.run_with_cache(**inputs, **{bad: torch.ones(1)})
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


# -------------------------------------------------------------------------------- position sets / layouts
def test_position_sets_outside_sequence(qwen):
    model, inputs = qwen
    lay = model.layout(inputs)
    with pytest.raises(ValueError, match="image 3 is out of range"):
        lay.last_image_token(image=3)
    with pytest.raises(ValueError, match="image -2 is out of range"):
        lay.end_of_image(image=-2)
    with pytest.raises(ValueError, match=r"position \[0, 99\] is outside the sequence of length"):
        lay._one_per_row(torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="asked for 1000 random image tokens"):
        lay.random_image_tokens(1000)
    from hooked_vlm.analyses.toolkit import as_positions

    with pytest.raises(ValueError, match="outside a sequence of length 5"):
        as_positions([7], 5)


def _metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 4]


def test_patching_rejects_masks_of_other_inputs(llava):
    from hooked_vlm.analyses.patching import patch_by_layer

    model, inputs = llava
    short = {**inputs, "input_ids": inputs["input_ids"][:, :-2], "attention_mask": inputs["attention_mask"][:, :-2]}
    other_mask = model.layout(short).image_positions()  # [2, pos - 2]: from other inputs
    with pytest.raises(ValueError, match="mask of length 25 .* does not match the sequence length 27"):
        patch_by_layer(model, inputs, inputs, _metric, positions=other_mask, layers=[0], progress=False)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_knockout_rejects_masks_of_other_inputs(llava):
    from hooked_vlm.analyses.narrow_gate import run_with_knockout

    model, inputs = llava
    with pytest.raises(ValueError, match="mask of length 5 .* does not match the sequence length 27"):
        run_with_knockout(model, inputs, keys=torch.zeros(2, 5, dtype=torch.bool))
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_analyses_check_a_given_layout(llava):
    """Analyses that take `layout=` check it was built from these inputs (same shape, other tokens included)."""
    from hooked_vlm.analyses.spatial import activations_at
    from hooked_vlm.analyses.tasks import shapes_slots, shapes_token_labels

    model, inputs = llava
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][:, -1] = 5 if int(other["input_ids"][0, -1]) != 5 else 6
    wrong = model.layout(other)
    pos = wrong.image_positions()
    with pytest.raises(ValueError, match="built for other inputs"):
        activations_at(model, inputs, ["blocks.0.hook_resid_post"], pos, layout=wrong)
    with pytest.raises(ValueError, match="built for other inputs"):
        shapes_token_labels(model, inputs, [], layout=wrong)
    with pytest.raises(ValueError, match="built for other inputs"):
        shapes_slots(model, inputs, [], layout=wrong)
    out, _ = activations_at(model, inputs, ["blocks.0.hook_resid_post"], pos, layout=model.layout(inputs))
    assert out["blocks.0.hook_resid_post"].shape[0] == int(pos.sum())


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fname", ["model.ckpt", "weights.pt", "model.pth"])
def test_non_safetensors_checkpoints_refused(tmp_path, fname):
    hf = tiny_llava()
    hf.config.save_pretrained(tmp_path)
    torch.save({}, tmp_path / fname)
    with pytest.raises(ValueError, match=rf"no \.safetensors weights \(found pickle-based \['{fname}'\]\).*safetensors only"):
        HookedVLM.from_pretrained(str(tmp_path))
