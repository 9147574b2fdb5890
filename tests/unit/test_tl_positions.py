"""TokenLayout position sets that vary per prompt: in_box with one box per prompt, on a 2-prompt organism batch."""
import pytest
import torch

from hooked_vlm.organism import ORGANISM_DIR, ShapesGenerator, load_organism

pytestmark = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no shipped organism")


def test_in_box_takes_one_box_per_prompt():
    model = load_organism("shapes_llava_random")  # objects anywhere: the two prompts' boxes differ
    samples = ShapesGenerator(3, layout="random").samples(2, "shape_item")
    inputs = model.processor(images=[s.image for s in samples], text=[s.prompt for s in samples], return_tensors="pt",
                             padding=True)
    layout = model.layout(inputs)
    w, h = samples[0].image.size
    boxes = [[x0 / w, y0 / h, x1 / w, y1 / h] for x0, y0, x1, y1 in (s.scene.boxes[s.target] for s in samples)]
    assert boxes[0] != boxes[1]
    per_prompt = layout.in_box(boxes)
    assert per_prompt.shape == layout.shape
    for b in range(2):  # row b is prompt b's own box, as the one-box form gives it
        assert torch.equal(per_prompt[b], layout.in_box(*boxes[b])[b])
        assert per_prompt[b].any() and per_prompt[b][~layout.is_image[b]].sum() == 0
    assert not torch.equal(per_prompt[0], layout.in_box(*boxes[1])[0])
    assert torch.equal(layout.in_box(torch.tensor(boxes)), per_prompt)
    # the whole image holds every image token of the base grid
    assert torch.equal(layout.in_box([[0, 0, 1, 1]] * 2), layout.is_image)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        layout.in_box([boxes[0]])
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        layout.in_box(0, 0, 1)
