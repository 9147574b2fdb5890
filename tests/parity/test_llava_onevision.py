"""LLaVA-OneVision parity against a tiny random HF model, with inputs from the real LlavaOnevisionProcessor (so the
image-token counts are the processor's): logits, residual stream, eager attention patterns, packed image
features; anyres unpadding and anyres_max downsampling; the single-crop path of multi-image prompts; TokenLayout."""
import pytest
import torch
from tiny import bf16_errors, onevision_processor, random_image, tiny_llava_onevision

from hooked_vlm import HookedVLM

IMG = 63  # image token id of the tiny model (vocab 64)


def compare(hf, model, inputs, tol=1e-4):
    """Max abs differences (logits, resid_pre, pattern, packed features); asserts each is within tolerance."""
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True, output_attentions=True)
        ours, cache = model.run_with_cache(**inputs)
    real = inputs["attention_mask"].bool()
    d = dict(logits=(ref.logits - ours)[real].abs().max().item())
    d["resid"] = max((ref.hidden_states[l] - cache[f"blocks.{l}.hook_resid_pre"])[real].abs().max().item()
                     for l in range(model.cfg.n_layers))
    # padded query rows are uniform in both; compare real query rows
    d["pattern"] = max((ref.attentions[l] - cache[f"blocks.{l}.attn.hook_pattern"]).permute(0, 2, 1, 3)[real].abs().max().item()
                       for l in range(model.cfg.n_layers))
    # the packed image features are the merged embeddings at image positions (HF 5.25 dropped image_hidden_states)
    hf_features = ref.hidden_states[0][inputs["input_ids"] == IMG]
    d["features"] = (hf_features - cache["projector.hook_out"].reshape(hf_features.shape)).abs().max().item()
    assert ref.logits[real].std() > 0.5  # the redrawn weights give logits with spread
    assert d["logits"] <= tol and d["resid"] <= tol and d["features"] <= tol and d["pattern"] <= 1e-5, d
    return d, cache


@pytest.fixture(scope="module", params=[("anyres_max_9", -1), ("anyres_max_1", [-2, -1])], ids=["max9", "max1-2layers"])
def setup(request):
    aspect, layer = request.param
    hf = tiny_llava_onevision(aspect, layer=layer)
    proc = onevision_processor(hf)
    return hf, proc, HookedVLM.from_hf(hf, proc)


def one_image(proc, h=40, w=24, seed=0):
    return dict(proc(text=["w2 w3 <image> w4 w5"], images=[random_image(h, w, seed)], return_tensors="pt"))


def test_anyres_non_square_unpadding(setup):
    """40x24 (tall, hi-res rows cut) and 18x64 (wide, rows cut) images; 4-D pixel_values and no batch_num_images too."""
    hf, proc, model = setup
    for h, w in [(40, 24), (18, 64)]:
        inputs = one_image(proc, h, w)
        compare(hf, model, inputs)
        lay = model.layout(inputs)
        rows, cols = lay.grids[0][0][1]
        full = (64 // 32 * 4, 32 // 32 * 4) if h > w else (32 // 32 * 4, 64 // 32 * 4)  # (8, 4) / (4, 8) before unpadding
        assert rows * cols < full[0] * full[1]  # unpadding (and, for max1, downsampling) removed features
    inputs = one_image(proc)
    del inputs["batch_num_images"]
    compare(hf, model, inputs)
    compare(hf, model, dict(inputs, pixel_values=inputs["pixel_values"][0]))  # crops already concatenated: [3, C, H, W]


def test_batch_left_padding_different_sizes(setup):
    hf, proc, model = setup
    inputs = dict(proc(text=["w2 <image> w4", "w5 w6 w7 <image> w8 w9"], images=[random_image(18, 64, 1), random_image(64, 64, 2)],
                       return_tensors="pt", padding=True))
    assert (inputs["attention_mask"] == 0).any() and inputs["pixel_values"].shape[1] == 5  # padded, crops padded
    n = (inputs["input_ids"] == IMG).sum(1)
    assert n[0] != n[1]
    compare(hf, model, inputs)


def test_several_images_per_prompt_single_crop(setup):
    """batch_num_images [2, 1]: prompt 0's two images take the single-crop path (base grid + one newline)."""
    hf, proc, model = setup
    inputs = dict(proc(text=["w2 <image> w3 <image> w4", "w5 <image> w6"],
                       images=[[random_image(40, 24, 3), random_image(20, 50, 4)], [random_image(64, 32, 5)]],
                       return_tensors="pt", padding=True))
    assert inputs["batch_num_images"].tolist() == [2, 1]
    compare(hf, model, inputs)
    lay = model.layout(inputs)
    assert (lay.image_index[0] == 0).sum() == (lay.image_index[0] == 1).sum() == 16 + 1
    assert [sorted(g) for g in lay.grids[0]] == [[0], [0]] and sorted(lay.grids[1][0]) == [0, 1]
    newline = lay.is_image[0] & (lay.col[0] == -1)
    assert newline.sum() == 2 and (lay.row[0][newline] == 3).all() and (lay.crop[0][newline] == 0).all()


def test_default_strategy_single_crop():
    """'default' drops the first SigLIP patch; fine for single crops (HF packs 15 + newline), an error for anyres."""
    hf = tiny_llava_onevision(strategy="default")
    proc = onevision_processor(hf)
    model = HookedVLM.from_hf(hf, proc)
    inputs = dict(proc(text=["w2 <image> w3 <image> w4"], images=[[random_image(40, 24), random_image(24, 40)]], return_tensors="pt"))
    compare(hf, model, inputs)
    lay = model.layout(inputs)
    assert lay.is_image.sum() == 2 * 16 and (lay.row[lay.is_image][:2] == 0).all() and lay.col[lay.is_image][0] == 1
    with pytest.raises(ValueError, match="16 features per crop"):
        model(**one_image(proc))


def test_layout_order_matches_features(setup):
    """Every image token's (crop, row, col) points at the feature the model placed there."""
    hf, proc, model = setup
    inputs = one_image(proc)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    lay = model.layout(inputs)
    n_proc = int((inputs["input_ids"] == IMG).sum())
    assert lay.is_image.sum() == n_proc == cache["projector.hook_out"].shape[0]
    grids = lay.grids[0][0]
    rows, cols = grids[1]
    assert grids[0] == (4, 4) and lay.is_image.sum() == 16 + rows * (cols + 1)
    crop, row, col = (x[0][lay.is_image[0]] for x in (lay.crop, lay.row, lay.col))
    assert (crop[:16] == 0).all() and torch.equal(row[:16], torch.arange(4).repeat_interleave(4))
    assert torch.equal(col[:16], torch.arange(4).repeat(4))
    feats, crops = cache["projector.hook_out"], cache["projector.mlp.hook_out"]  # [46, d], [3 crops, 16, d]
    newline = col == -1
    assert newline.sum() == rows and (crop[newline] == 1).all() and torch.equal(row[newline], torch.arange(rows))
    assert torch.equal(feats[newline], model.projector.image_newline.expand(rows, -1))
    assert torch.equal(feats[:16], crops[0])  # base grid, row-major
    if model.cfg.family_options["vision_aspect_ratio"] == "anyres_max_9":  # not downsampled: exact lookup
        # 40x24 -> 64x32 canvas: 2x1 crops stitched into 8x4, unpadded to rows 1..6
        for i in (~newline & (crop == 1)).nonzero().flatten().tolist():
            r, c = int(row[i]) + 1, int(col[i])
            assert torch.equal(feats[i], crops[1 + r // 4, (r % 4) * 4 + c % 4])
    # upper-left quarter of the base grid: rows 0-1, cols 0-1
    start = int(lay.is_image[0].nonzero()[0])
    box = lay.in_box(0, 0, 0.5, 0.5)
    assert box[0].nonzero().flatten().tolist() == [start + k for k in (0, 1, 4, 5)]
    assert lay.in_box(0, 0, 1, 1, crop=1).sum() == rows * cols


def test_errors():
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    model = HookedVLM.from_hf(hf, proc)
    inputs = one_image(proc)
    n = int((inputs["input_ids"] == IMG).sum())
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(IMG)] = 5
    with pytest.raises(ValueError, match=f"{n - 1} image tokens.*{n} feature vectors"):
        model(**dict(inputs, input_ids=ids))
    with pytest.raises(ValueError, match="image_sizes"):
        model(**{k: v for k, v in inputs.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match=r"adds up to 2 images.*describes 1 images"):
        model(**dict(inputs, batch_num_images=torch.tensor([2])))
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        model(**inputs, vision_aspect_ratio="anyres_max_1")
    with pytest.raises(TypeError, match="pixel_values_videos"):
        model(**inputs, pixel_values_videos=torch.zeros(1, 2, 3, 32, 32))
    model(**inputs, vision_aspect_ratio="anyres_max_9")  # the config's own value is fine


def test_conversion_uses_every_key():
    hf = tiny_llava_onevision()
    model = HookedVLM.from_hf(hf)
    assert torch.equal(model.projector.image_newline, hf.model.image_newline)
    assert model.cfg.family_options == {"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
                                        "vision_aspect_ratio": "anyres_max_9"}
    assert model.cfg.qkv_bias and not model.cfg.o_bias


def test_bf16_within_documented_tolerance():
    """Our bf16 logits are no further from the fp32 reference than 2x HF's own bf16 logits (see test_llava.py)."""
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    our_err, hf_err, _, _ = bf16_errors(hf, one_image(proc), proc)
    assert 0 < our_err <= 2 * hf_err, (our_err, hf_err)


def test_save_pretrained_round_trip(tmp_path):
    hf = tiny_llava_onevision()
    proc = onevision_processor(hf)
    hf.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path), processor=proc)
    compare(hf, model, one_image(proc))
