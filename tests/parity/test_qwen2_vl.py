"""Qwen2-VL parity against a tiny random HF model, with inputs from the real (PIL) image processor.

`QwenVLSuite` holds the checks shared with Qwen2.5-VL (test_qwen2_5_vl.py subclasses it): logits, residual
stream, eager attention patterns and image features; left padding with differently sized non-square images;
several images per prompt; text only; no state between calls; pattern edits; M-RoPE positions vs HF's
get_rope_index; TokenLayout coordinates; bf16; input errors.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from tiny import QWEN_IMAGE, bf16_errors, QWEN_VEND, QWEN_VSTART, qwen_compare, qwen_image_processor, qwen_inputs, tiny_qwen_vl

from hooked_vlm import HookedVLM

# prompt 0: one 16x24 px image (2x3 merged tokens) and left padding; prompt 1: 32x24 (4x3) then 8x16 (1x2)
MIXED = [[(16, 24)], [(32, 24), (8, 16)]]


@pytest.fixture(scope="class")
def pair(request):
    hf = tiny_qwen_vl(request.cls.kind)
    return hf, HookedVLM.from_hf(hf)


def rope_index(hf, inputs):
    kw = {k: inputs.get(k) for k in ("image_grid_thw", "attention_mask")}
    return hf.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], **kw)[0]


class QwenVLSuite:
    kind = ""

    def test_parity_left_padding_different_image_sizes(self, pair):
        inputs = qwen_inputs(MIXED)
        assert (inputs["attention_mask"] == 0).any() and inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 6], [1, 2, 4]]
        qwen_compare(*pair, inputs)

    def test_two_images_in_one_prompt(self, pair):
        qwen_compare(*pair, qwen_inputs([[(24, 16), (16, 32)]], seed=1))

    def test_text_only(self, pair):
        hf, model = pair
        ids = torch.randint(1, QWEN_IMAGE, (2, 9))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding: HF's text-only positions are 0..S-1, pads counted
        inputs = dict(input_ids=ids, attention_mask=mask)
        qwen_compare(hf, model, inputs)
        qwen_compare(hf, model, dict(inputs, mm_token_type_ids=torch.zeros_like(ids)))
        assert torch.equal(model.layout(inputs).position_ids, torch.arange(9).expand(3, 2, 9))

    def test_vision_tower_hidden_states(self, pair):
        hf, model = pair
        inputs = qwen_inputs(MIXED)
        with torch.no_grad():
            ref = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True)
            _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("vision.blocks"))
        ours = [cache[f"vision.blocks.{i}.hook_resid_pre"][0] for i in range(len(model.vision.blocks))]
        ours.append(cache[f"vision.blocks.{len(model.vision.blocks) - 1}.hook_resid_post"][0])
        assert len(ref.hidden_states) == len(ours)
        for r, o in zip(ref.hidden_states, ours):
            assert (r - o).abs().max() <= 1e-4

    def test_no_state_between_calls(self, pair):
        hf, model = pair
        a, b = qwen_inputs(MIXED, seed=2), qwen_inputs([[(24, 8), (8, 8)]], seed=3)
        refs = []
        with torch.no_grad():
            ours = [model(**x) for x in (a, b, a)]
            for x in (a, b, a):
                hf.model.rope_deltas = None  # a fresh HF call: nothing cached from the previous one
                refs.append(hf(**x).logits)
        assert torch.equal(ours[0], ours[2])
        for x, o, r in zip((a, b, a), ours, refs):
            real = x["attention_mask"].bool()
            assert (o - r)[real].abs().max() <= 1e-4

    def test_batch_with_a_text_only_prompt(self, pair):
        # with images in the batch HF numbers every prompt with get_rope_index: the text-only prompt's pads are
        # skipped (position 0), unlike a batch without images
        hf, model = pair
        inputs = qwen_inputs([[], [(16, 24)]], seed=4)
        n_pad = int((inputs["attention_mask"][0] == 0).sum())
        qwen_compare(hf, model, inputs)
        pos = model.layout(inputs).position_ids  # (logits cannot see a constant shift: RoPE is relative)
        assert n_pad > 0 and torch.equal(pos, rope_index(hf, inputs))
        assert pos[:, 0].tolist() == [[0] * n_pad + list(range(pos.shape[-1] - n_pad))] * 3

    def test_pattern_hook_edits(self, pair):
        hf, model = pair
        inputs = qwen_inputs(MIXED)
        keep_text = (inputs["input_ids"] != QWEN_IMAGE)[:, None, None, :]
        with torch.no_grad():
            base = model(**inputs)
            same = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: p.clone())])
            blind = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: p * keep_text)])
            ref = hf(**inputs).logits
        real = inputs["attention_mask"].bool()
        assert (same - base)[real].abs().max() <= 1e-5 and (same - ref)[real].abs().max() <= 1e-4
        assert (blind - base)[real].abs().max() > 1e-2

    def test_layout_positions_and_coords(self, pair):
        hf, model = pair
        inputs = qwen_inputs(MIXED)
        layout = model.layout(inputs)
        with torch.no_grad():
            assert torch.equal(layout.position_ids, rope_index(hf, inputs))
        assert layout.grids == [[{0: (2, 3)}], [{0: (4, 3)}, {0: (1, 2)}]]
        first = layout.image_positions(0)[0]
        assert layout.row[0, first].tolist() == [0, 0, 0, 1, 1, 1] and layout.col[0, first].tolist() == [0, 1, 2, 0, 1, 2]
        assert (layout.t[layout.is_image] == 0).all() and (layout.crop[layout.is_image] == 0).all()
        for image in (0, -1):
            assert (inputs["input_ids"][layout.end_of_image(image)] == QWEN_VEND).all()
            assert (inputs["input_ids"][layout.last_image_token(image)] == QWEN_IMAGE).all()
        # prompt 1, image 0 is 4x3: the top-left quarter (rows 0-1, col 0; centres at x 1/6 and y 1/8, 3/8)
        box = layout.in_box(0, 0, 1 / 3, 0.5, image=0)
        assert layout.row[1, box[1]].tolist() == [0, 1] and layout.col[1, box[1]].tolist() == [0, 0]

    def test_module_docstring_worked_example(self, pair):
        hf, model = pair
        # two pads, then A <vs> | six image tokens (2x3 merged grid) | <ve> B C
        ids = torch.tensor([[0, 0, 5, QWEN_VSTART] + [QWEN_IMAGE] * 6 + [QWEN_VEND, 6, 7]])
        inputs = dict(input_ids=ids, attention_mask=(torch.arange(13) >= 2).long()[None],
                      mm_token_type_ids=(ids == QWEN_IMAGE).int(), image_grid_thw=torch.tensor([[1, 4, 6]]))
        fam, image = model.family, {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw")}
        pos = fam.position_ids(model, ids, inputs["attention_mask"], fam.plan(model, ids, **image))
        assert torch.equal(pos, rope_index(hf, inputs))
        pos = pos[:, 0]
        expected = [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7], [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]]
        assert pos[:, 2:].tolist() == expected and pos[:, :2].tolist() == [[0, 0]] * 3  # pads: 0

    def test_image_coords_follow_the_processor_patch_order(self, pair):
        _, model = pair
        arr = np.zeros((16, 24, 3), dtype=np.uint8)
        for r in range(2):
            for c in range(3):
                arr[8 * r : 8 * r + 8, 8 * c : 8 * c + 8, 0] = 20 + 30 * r + 70 * c  # one colour per merged token
        px = qwen_image_processor()(images=[Image.fromarray(arr)], return_tensors="pt")
        ids = torch.zeros(1, 1, dtype=torch.long)  # not read
        (coords,) = model.family.image_coords(model, model.family.plan(model, ids, pixel_values=px["pixel_values"],
                                                                       image_grid_thw=px["image_grid_thw"]))
        red = px["pixel_values"].view(6, 4, 3, 2, 4, 4)[:, :, 0]  # [token, 4 patches, T, P, P], channel 0
        level = {float(red[k].mean()): (int(coords.row[k]), int(coords.col[k])) for k in range(6)}
        assert all(red[k].std() < 1e-6 for k in range(6))  # each merged token's 4 patches are one 8x8 block
        ordered = sorted(level)  # colour increases with row (+30) and more with col (+70)
        assert [level[v] for v in ordered] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]

    def test_bf16_within_documented_tolerance(self):
        """bf16 end to end: our bf16 logits are no further from the fp32 reference than 2x HF's own bf16 logits."""
        hf = tiny_qwen_vl(self.kind)
        inputs = qwen_inputs(MIXED)
        our_err, hf_err, model, ours = bf16_errors(hf, inputs, real=inputs["attention_mask"].bool())
        assert model.cfg.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
        assert 0 < our_err <= 2 * hf_err, (our_err, hf_err)

    def test_save_pretrained_round_trip(self, pair, tmp_path):
        hf, _ = pair
        hf.save_pretrained(tmp_path)
        model = HookedVLM.from_pretrained(str(tmp_path), processor=None)  # HF loads with sdpa; the reference is eager
        qwen_compare(hf, model, qwen_inputs(MIXED))

    def test_input_errors(self, pair):
        _, model = pair
        inputs = qwen_inputs([[(16, 24)]])
        no_grid = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
        with pytest.raises(ValueError, match="image_grid_thw"):
            model(**no_grid)
        ids = inputs["input_ids"].clone()
        ids[0, (ids[0] == QWEN_IMAGE).nonzero()[0]] = 5  # one image token too few
        with pytest.raises(ValueError, match="5 image tokens .* 6 feature vectors"):
            model(**dict(inputs, input_ids=ids, mm_token_type_ids=(ids == QWEN_IMAGE).int()))
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
        with pytest.raises(ValueError, match="mm_token_type_ids and input_ids disagree"):
            model(**dict(inputs, mm_token_type_ids=torch.zeros_like(ids)))
        with pytest.raises(ValueError, match="video"):
            model(**inputs, video_grid_thw=torch.tensor([[2, 4, 4]]))
        with pytest.raises(ValueError, match="image_grid_thw describes 24 patches but pixel_values has 20"):
            model(**dict(inputs, pixel_values=inputs["pixel_values"][:20]))
        fam, ids, mask = model.family, inputs["input_ids"], inputs["attention_mask"]

        def positions(grid):
            plan = fam.plan(model, ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid)
            return fam.position_ids(model, ids, mask, plan)

        with pytest.raises(ValueError, match="has 6 tokens but its image_grid_thw row 0 \\[1, 4, 2\\] gives 2"):
            positions(torch.tensor([[1, 4, 2], [1, 4, 4]]))
        with pytest.raises(ValueError, match="image_grid_thw has 2 rows but the prompts hold 1"):
            positions(torch.tensor([[1, 4, 6], [1, 2, 2]]))


class TestQwen2VL(QwenVLSuite):
    kind = "qwen2_vl"
