"""Property-based parity: random valid tiny configs per family (layers, widths, heads / GQA kv heads, image sizes,
images per prompt where the family allows, left padding, batch 1-3) -> hooked logits equal HF's within 1e-4 on
real positions. Seeded (derandomize); a few examples per family by default, more under `-m slow`."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import OV_PINPOINTS, llava_inputs, onevision_processor, qwen_inputs, random_image, redraw

from hooked_vlm import HookedVLM

TOL = 1e-4
FAST = settings(max_examples=4, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=30, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


@st.composite
def decoder(draw, d_heads=(8, 16)):
    n_heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0]))  # GQA: kv heads divide heads
    d_head = draw(st.sampled_from(d_heads))
    return dict(n_layers=draw(st.integers(1, 3)), n_heads=n_heads, kv=kv, d_head=d_head,
                d_mlp=draw(st.sampled_from([16, 40, 64])), seed=draw(st.integers(0, 2**16)))


@st.composite
def vit(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(width=heads * draw(st.sampled_from([4, 8])), heads=heads, layers=draw(st.integers(1, 2)),
                d_mlp=draw(st.sampled_from([16, 24])))


def _logits_match(hf, model, inputs):
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = model(**inputs)
    real = inputs["attention_mask"].bool()
    diff = (ref - ours)[real].abs().max().item()
    assert ref[real].std() > 0.05  # the redrawn weights give logits with spread
    assert diff <= TOL, diff


def _text_config(cls, d, vocab=64, **extra):
    return cls(vocab_size=vocab, hidden_size=d["n_heads"] * d["d_head"], intermediate_size=d["d_mlp"],
               num_hidden_layers=d["n_layers"], num_attention_heads=d["n_heads"], num_key_value_heads=d["kv"],
               head_dim=d["d_head"], max_position_embeddings=512, **extra)


# ------------------------------------------------------------------------------------------------- LLaVA
@st.composite
def llava_case(draw):
    return dict(dec=draw(decoder()), vit=draw(vit()), tower=draw(st.sampled_from(["clip", "siglip"])),
                text_model=draw(st.sampled_from(["llama", "qwen2"])), image_size=draw(st.sampled_from([16, 24, 32])),
                layer=draw(st.sampled_from([-1, -2])), batch=draw(st.integers(1, 3)), pad=draw(st.integers(0, 2)))


def check_llava(case):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    v, d = case["vit"], case["dec"]
    common = dict(hidden_size=v["width"], intermediate_size=v["d_mlp"], num_hidden_layers=v["layers"],
                  num_attention_heads=v["heads"], image_size=case["image_size"], patch_size=8)
    if case["tower"] == "clip":
        vc, strategy = CLIPVisionConfig(projection_dim=v["width"], **common), "default"
    else:
        vc, strategy = SiglipVisionConfig(vision_use_head=False, **common), "full"
    tc = _text_config(LlamaConfig if case["text_model"] == "llama" else Qwen2Config, d)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=63, vision_feature_layer=case["layer"],
                      vision_feature_select_strategy=strategy)
    cfg._attn_implementation = "eager"
    torch.manual_seed(d["seed"])
    hf = redraw(LlavaForConditionalGeneration(cfg), seed=d["seed"])
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=case["batch"], pad_left=case["pad"], text_len=3, seed=d["seed"])
    _logits_match(hf, model, inputs)


@FAST
@given(llava_case())
def test_llava_parity_property(case):
    check_llava(case)


@pytest.mark.slow
@SLOW
@given(llava_case())
def test_llava_parity_property_exhaustive(case):
    check_llava(case)


# ------------------------------------------------------------------------------------------ LLaVA-OneVision
IMAGE_SIZES = st.tuples(st.integers(8, 70), st.integers(8, 70))


@st.composite
def onevision_case(draw):
    n_images = draw(st.lists(st.integers(1, 2), min_size=1, max_size=3))  # images per prompt (batch 1-3)
    sizes = [[draw(IMAGE_SIZES) for _ in range(n)] for n in n_images]
    return dict(dec=draw(decoder()), vit=draw(vit()), aspect=draw(st.sampled_from(["anyres_max_9", "anyres_max_1"])),
                sizes=sizes, text=[draw(st.integers(0, 3)) for _ in n_images])


def check_onevision(case):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    v, d = case["vit"], case["dec"]
    vc = SiglipVisionConfig(hidden_size=v["width"], intermediate_size=v["d_mlp"], num_hidden_layers=v["layers"],
                            num_attention_heads=v["heads"], image_size=32, patch_size=8, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=_text_config(Qwen2Config, d), image_token_index=63,
                               video_token_index=62, image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio=case["aspect"],
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    cfg._attn_implementation = "eager"
    torch.manual_seed(d["seed"])
    hf = redraw(LlavaOnevisionForConditionalGeneration(cfg), seed=d["seed"])
    proc = onevision_processor(hf)
    model = HookedVLM.from_hf(hf, proc)
    texts = [" ".join(["w2"] * (1 + extra) + ["<image> w3"] * len(s)) + " w4" for s, extra in zip(case["sizes"], case["text"])]
    images = [[random_image(h, w, seed=i * 7 + j) for j, (h, w) in enumerate(s)] for i, s in enumerate(case["sizes"])]
    inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    _logits_match(hf, model, inputs)


@FAST
@given(onevision_case())
def test_onevision_parity_property(case):
    check_onevision(case)


@pytest.mark.slow
@SLOW
@given(onevision_case())
def test_onevision_parity_property_exhaustive(case):
    check_onevision(case)


# --------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL / Qwen3-VL
MROPE = {8: [1, 1, 2], 16: [2, 3, 3]}
QWEN_SIZES = st.tuples(st.sampled_from([8, 16, 24, 32]), st.sampled_from([8, 16, 24, 32]))


@st.composite
def qwen_case(draw, kind):
    n_images = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))
    if sum(n_images) == 0:
        n_images[0] = 1
    heads = draw(st.sampled_from([2, 4]))
    return dict(kind=kind, dec=draw(decoder()), vheads=heads, vwidth=heads * draw(st.sampled_from([4, 8])),
                depth=draw(st.integers(1, 3)), prompts=[[draw(QWEN_SIZES) for _ in range(n)] for n in n_images],
                fullatt=draw(st.sets(st.integers(0, 2))))


def check_qwen(case):
    d = case["dec"]
    hidden = d["n_heads"] * d["d_head"]
    text = dict(vocab_size=64, hidden_size=hidden, intermediate_size=d["d_mlp"], num_hidden_layers=d["n_layers"],
                num_attention_heads=d["n_heads"], num_key_value_heads=d["kv"], max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=MROPE[d["d_head"]]))
    ids = dict(image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    patches = dict(patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_heads=case["vheads"])
    if case["kind"] == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=case["depth"], embed_dim=case["vwidth"], hidden_size=hidden, mlp_ratio=2, **patches)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    elif case["kind"] == "qwen3_vl":  # `fullatt` serves as the DeepStack block indexes; position table 3x3 or 4x4
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text.update(head_dim=d["d_head"], attention_bias=bool(d["seed"] % 2))
        levels = sorted(i for i in case["fullatt"] if i < case["depth"])[: d["n_layers"]]
        vision = dict(depth=case["depth"], hidden_size=case["vwidth"], intermediate_size=24, out_hidden_size=hidden,
                      num_position_embeddings=9 if case["depth"] % 2 else 16, deepstack_visual_indexes=levels, **patches)
        cfg, cls = Qwen3VLConfig(text_config=text, vision_config=vision, **ids), Qwen3VLForConditionalGeneration
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=case["depth"], hidden_size=case["vwidth"], intermediate_size=24, out_hidden_size=hidden,
                      window_size=16, fullatt_block_indexes=sorted(i for i in case["fullatt"] if i < case["depth"]),
                      **patches)
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = "eager"
    torch.manual_seed(d["seed"])
    hf = redraw(cls(cfg), seed=d["seed"])
    model = HookedVLM.from_hf(hf)
    inputs = qwen_inputs(case["prompts"], seed=d["seed"])
    _logits_match(hf, model, inputs)


@FAST
@given(qwen_case("qwen2_vl"))
def test_qwen2_vl_parity_property(case):
    check_qwen(case)


@FAST
@given(qwen_case("qwen2_5_vl"))
def test_qwen2_5_vl_parity_property(case):
    check_qwen(case)


@FAST
@given(qwen_case("qwen3_vl"))
def test_qwen3_vl_parity_property(case):
    check_qwen(case)


@pytest.mark.slow
@SLOW
@given(st.sampled_from(["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]).flatmap(qwen_case))
def test_qwen_parity_property_exhaustive(case):
    check_qwen(case)
