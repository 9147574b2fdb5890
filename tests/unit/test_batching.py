"""hooked_vlm.batching.slice_prompts: a slice of the prompts runs exactly as those rows of the whole batch, for every
family's image inputs (per-image tensors, Qwen's packed patches, LLaVA-OV's batch_num_images)."""
import pytest
import torch
from tiny import (gemma3_inputs, gemma3_processor, llava_inputs, onevision_processor, qwen_inputs, random_image, tiny_gemma3,
                  tiny_llava, tiny_llava_onevision, tiny_qwen_vl)

from hooked_vlm import HookedVLM
from hooked_vlm.batching import slice_prompts


def _llava():
    """Prompt 1 holds two adjacent images (no token between them), prompt 2 none."""
    hf = tiny_llava()
    one = llava_inputs(hf, batch=1)
    img = hf.config.image_token_id
    n = int((one["input_ids"] == img).sum())
    rows = [[3, 4] + [img] * n + [5, 6], [3] + [img] * (2 * n) + [7], [8, 9, 10, 11]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    pixels = torch.cat([llava_inputs(hf, batch=1, seed=s)["pixel_values"] for s in range(3)])
    return HookedVLM.from_hf(hf), dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels)


def _onevision():
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    texts = ["w2 <image> w4", "w3 <image> w5 <image> w6", "w7 <image> w8"]
    images = [[random_image(40, 24)], [random_image(24, 24, 1), random_image(32, 48, 2)], [random_image(16, 40, 3)]]
    inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    return HookedVLM.from_hf(hf, proc), inputs


def _qwen():
    return HookedVLM.from_hf(tiny_qwen_vl()), qwen_inputs([[(16, 24)], [(8, 8), (16, 16)], [(24, 8)]])


def _gemma3():
    """token_type_ids (bidirectional image blocks) sliced with the prompts; prompt 2 is text only."""
    hf = tiny_gemma3()
    proc = gemma3_processor(hf)
    return HookedVLM.from_hf(hf, proc), gemma3_inputs(proc, (1, 2, 0))


@pytest.mark.parametrize("build", [_llava, _onevision, _qwen, _gemma3], ids=["llava", "llava_onevision", "qwen2_vl", "gemma3"])
def test_slices_run_like_the_whole_batch(build):
    model, inputs = build()
    images = (model.layout(inputs).image_index.amax(1) + 1).tolist()
    with torch.no_grad():
        full = model(**inputs)
        for start, stop in [(0, 1), (1, 3), (2, 3), (0, 3)]:
            part = slice_prompts(inputs, start, stop, images)
            torch.testing.assert_close(model(**part), full[start:stop], rtol=0, atol=1e-5)
