"""Qwen2.5-VL parity: every Qwen2-VL check (QwenVLSuite) on the windowed RMSNorm / gated-SiLU tower, plus window
attention itself: our window partition equals HF's, the test images really span several windows, and a tower
without windows (full attention in every block) would be far off HF."""
import sys
from pathlib import Path

import pytest
import torch
from tiny import qwen_compare, qwen_inputs
from transformers.vision_utils import get_vision_window_index

sys.path.insert(0, str(Path(__file__).parent))
from test_qwen2_vl import MIXED, QwenVLSuite, pair  # noqa: E402,F401  (pair: the class-scoped fixture)

from hooked_vlm.vision.qwen_vit import window_partition  # noqa: E402


class TestQwen2_5_VL(QwenVLSuite):
    kind = "qwen2_5_vl"

    def test_window_partition_matches_hf(self, pair):
        _, model = pair
        v = model.cfg.vision
        for grid in ([[1, 4, 6]], [[1, 8, 6], [1, 2, 4]], [[1, 8, 8]], [[2, 12, 10], [1, 4, 4]]):
            grid = torch.tensor(grid)
            index, lengths = window_partition(grid, v.spatial_merge_size, v.window_size, v.patch_size)
            ref_index, ref_cu = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
            assert torch.equal(index, ref_index)
            assert torch.equal(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), ref_cu.long())

    def test_windows_matter(self, pair):
        hf, model = pair
        inputs = qwen_inputs(MIXED)
        v = model.cfg.vision
        _, lengths = window_partition(inputs["image_grid_thw"], v.spatial_merge_size, v.window_size, v.patch_size)
        assert len(lengths) == 7 and v.fullatt_block_indexes == (1, 3)  # 2 + 4 + 1 windows over the 3 images
        index = model.vision.window_index(inputs["image_grid_thw"])
        assert not torch.equal(index, torch.arange(len(index)))  # the blocks really see a reordered sequence
        qwen_compare(hf, model, inputs)
        saved = v.fullatt_block_indexes
        try:
            v.fullatt_block_indexes = tuple(range(v.n_layers))  # negative control: no windows anywhere
            with torch.no_grad():
                no_windows = model(**inputs)
                ref = hf(**inputs).logits
        finally:
            v.fullatt_block_indexes = saved
        real = inputs["attention_mask"].bool()
        assert (no_windows - ref)[real].abs().max() > 1e-2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
