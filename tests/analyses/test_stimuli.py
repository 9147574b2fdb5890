"""analyses.stimuli: the papers' stimulus sets at any resolution, through a real processor, with object boxes that
TokenLayout maps to the object's own image tokens."""
import numpy as np
import pytest
import torch
from tiny import onevision_processor, tiny_llava_onevision

from hooked_vlm.analyses.stimuli import (BINDING_GRID, COLOURS, binding_id_scenes, colour_reversed, scene_descriptions,
                              short_answers, spatial_scenes, to_inputs)
from hooked_vlm import HookedVLM


def colour_at(image, box):
    w, h = image.size
    x, y = int((box[0] + box[2]) / 2 * w), int((box[1] + box[3]) / 2 * h)
    return image.getpixel((x, y))


def test_binding_scenes_follow_the_papers_blocks_and_ask_both_objects():
    stims = binding_id_scenes(3, image_size=384, seed=0)
    assert len(stims) == 6 and [s.target for s in stims] == [0, 1] * 3
    s0, s1 = stims[:2]
    assert s0.objects[0].box == pytest.approx((6 / BINDING_GRID, 3 / BINDING_GRID, 11 / BINDING_GRID, 8 / BINDING_GRID))
    assert s0.objects[1].box == pytest.approx((20 / BINDING_GRID, 6 / BINDING_GRID, 25 / BINDING_GRID, 11 / BINDING_GRID))
    for s in (s0, s1):
        o = s.objects[s.target]
        assert s.answer == s.meta["items"][s.target] and s.wrong == [s.meta["items"][1 - s.target]]
        assert f"Which item does the {o.shape} contain?" in s.text and s.answer_prefix.endswith(f"The {o.shape} contains item")
        assert colour_at(s.image, o.box) == COLOURS[o.colour]
    again = binding_id_scenes(3, image_size=384, seed=0)
    assert [s.text for s in again] == [s.text for s in stims]
    assert np.array_equal(np.asarray(again[0].image), np.asarray(s0.image))


def test_spatial_scenes_and_their_colour_reversed_counterfactual():
    for s in spatial_scenes(8, n_objects=3, image_size=96, seed=1):
        xs = [o.box[0] for o in s.objects]
        assert xs == sorted(xs) and [o.order for o in s.objects] == ["left", "middle", "right"]
        assert s.answer == s.objects[s.target].colour and s.answer not in s.wrong
        cf = colour_reversed(s)
        assert [o.box for o in cf.objects] == [o.box for o in s.objects]  # positions kept
        assert [o.colour for o in cf.objects] == [o.colour for o in s.objects][::-1]  # colours reversed
        for o in cf.objects:
            assert colour_at(cf.image, o.box) == COLOURS[o.colour]
        assert cf.answer == s.objects[2 - s.target].colour
    assert len(spatial_scenes(2, n_objects=2)[0].objects) == 2


def test_scene_descriptions_and_short_answers():
    for s in scene_descriptions(6, image_size=64, seed=2):
        named = s.objects[1 - s.target]
        assert s.answer_prefix == f"In this image there is a {named.colour} {named.shape} and a"
        assert s.answer == s.objects[s.target].colour
        a, b = (o.box for o in s.objects)
        assert a[2] <= b[0] or b[2] <= a[0]  # side by side, no overlap
    q = short_answers(4, image_size=64)[0]
    assert q.text.startswith("What colour is the ") and q.answer == q.objects[q.target].colour


def test_to_inputs_through_a_real_processor_and_boxes_to_positions():
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    model = HookedVLM.from_hf(hf, proc)
    stims = binding_id_scenes(2, image_size=32, seed=0)
    inputs = to_inputs(proc, stims, batch_num_images=torch.ones(len(stims), dtype=torch.long))
    assert inputs["input_ids"].shape[0] == 4
    lay = model.layout(inputs)
    for b, s in enumerate(stims):
        own = lay.in_box(*s.target_box())[b]
        other = lay.in_box(*s.objects[1 - s.target].box)[b]
        assert own.any() and other.any() and not (own & other).any()
    with pytest.raises(ValueError, match="at least one stimulus"):
        to_inputs(proc, [])
    with pytest.raises(ValueError, match="positive number"):
        binding_id_scenes(0)
