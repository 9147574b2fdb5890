"""Tiny random HF models for parity tests (built in code, no downloads). Weights are re-drawn with a larger std so
that logits have spread: HF's default init gives logits so flat that a wrong mask or position hides under 1e-4."""
from __future__ import annotations

import torch


def redraw(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight", "ln_q.weight", "norm1.weight", "norm2.weight")) or "layrnorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_llava(tower: str = "clip", decoder: str = "llama", strategy: str = "default", layer=-2, seed: int = 0, vocab: int = 64,
               **text_kwargs):
    """`decoder`: "llama", "qwen2" or "mistral"; `text_kwargs` go to the text config (e.g. sliding_window=8)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig,
                              Qwen2Config, SiglipVisionConfig)

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
    vc = CLIPVisionConfig(projection_dim=32, **common) if tower == "clip" else SiglipVisionConfig(vision_use_head=False, **common)
    tcls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[decoder]
    tc = tcls(**{**dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512), **text_kwargs})
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=vocab - 1, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    return redraw(model, seed=seed)


def llava_inputs(model, batch: int = 2, text_len: int = 7, pad_left: int = 0, seed: int = 0):
    """input_ids with one image per prompt (<image> x n after a couple of text tokens), optional left padding."""
    cfg = model.config
    v = cfg.vision_config
    n_img = (v.image_size // v.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" and v.model_type == "clip_vision_model" else 0)
    gen = torch.Generator().manual_seed(seed)
    img_id = cfg.image_token_id
    ids, masks = [], []
    for b in range(batch):
        n_pad = pad_left if b == 0 else 0  # prompt 0 is shorter by pad_left tokens and left-padded
        pre = torch.randint(1, img_id - 1, (2 + pad_left - n_pad,), generator=gen)
        post = torch.randint(1, img_id - 1, (text_len,), generator=gen)
        ids.append(torch.cat([torch.zeros(n_pad, dtype=torch.long), pre, torch.full((n_img,), img_id), post]))
        masks.append(torch.cat([torch.zeros(n_pad, dtype=torch.long), torch.ones(len(ids[-1]) - n_pad, dtype=torch.long)]))
    input_ids, attention_mask = torch.stack(ids), torch.stack(masks)
    pixel_values = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


# ---------------------------------------------------------------------------------------- LLaVA-OneVision
OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiny_llava_onevision(aspect: str = "anyres_max_9", strategy: str = "full", layer=-1, seed: int = 0, vocab: int = 64):
    """SigLIP (32 px, patch 8 -> 4x4 grid, 2 layers) + Qwen2 (48 wide, 3 layers, GQA 4/2); image token vocab-1,
    video token vocab-2; pinpoints up to 64x64 (2x2 crops)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, vision_use_head=False)
    tc = Qwen2Config(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=vocab - 1, video_token_index=vocab - 2,
                               image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio=aspect, vision_feature_layer=layer,
                               vision_feature_select_strategy=strategy)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    return redraw(model, seed=seed)


def onevision_processor(hf_model):
    """The real LlavaOnevisionProcessor (PIL image processor: no torchvision) with a word-level tokenizer whose words
    are "w2".."w{vocab-3}"; pads on the left. The video processor needs torchvision, so it is left out."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaOnevisionProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    class ImageOnlyProcessor(LlavaOnevisionProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    cfg = hf_model.config
    v, n = cfg.vision_config, cfg.text_config.vocab_size
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n - 2)}, "<video>": n - 2, "<image>": n - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    ip = LlavaOnevisionImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                         image_grid_pinpoints=cfg.image_grid_pinpoints)
    return ImageOnlyProcessor(image_processor=ip, tokenizer=fast, num_image_tokens=(v.image_size // v.patch_size) ** 2,
                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                              vision_aspect_ratio=cfg.vision_aspect_ratio)


def word_tokenizer(vocab: int, image_id: int):
    """A word-level tokenizer for a tiny model: token i is the word "w{i}", except pad "<pad>" (0, left padding), unk
    "<unk>" (1) and the image token "<image>". Lets `model.to_tokens` run on tiny models of any family."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {0: "<pad>", 1: "<unk>", image_id: "<image>"}
    words = {special.get(i, f"w{i}"): i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})


def prompt_text(tokenizer, ids, image_id: int) -> str:
    """The text whose tokens are `ids` (1-D, no padding) with each run of image tokens written as one "<image>"."""
    words, prev = [], None
    for t in ids.tolist():
        if not (t == image_id and prev == image_id):
            words.append(tokenizer.convert_ids_to_tokens(t))
        prev = t
    return " ".join(words)


def random_image(height: int, width: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ Qwen2-VL / Qwen2.5-VL
QWEN_IMAGE, QWEN_VIDEO, QWEN_VSTART, QWEN_VEND = 60, 61, 62, 63  # with vocab 64; text tokens are 1..59, pad 0


def tiny_qwen_vl(kind: str = "qwen2_vl", seed: int = 0, vocab: int = 64):
    """Qwen2-VL (LayerNorm + quick_gelu tower, width 32, depth 2) or Qwen2.5-VL (RMSNorm + gated SiLU tower, width
    32, depth 4: windows of 2x2 merged tokens (window_size 16 px, patch 4, merge 2) in blocks 0 and 2, full
    attention in blocks 1 and 3). Decoder: hidden 64, 4 heads (d_head 16), 2 kv heads, 3 layers, mrope [2, 3, 3]."""
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VSTART,
               vision_end_token_id=QWEN_VEND)
    patches = dict(patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_heads=4)
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, **patches)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=16,
                      fullatt_block_indexes=[1, 3], **patches)
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return redraw(cls(cfg), seed=seed)


def qwen_image_processor():
    """The real (PIL) Qwen2-VL image processor, sized for tiny_qwen_vl: 4 px patches, 2x2 merge, grids of 8 px."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                    size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})


def qwen_inputs(prompts, seed: int = 0, text_before: int = 2, text_after: int = 3):
    """Processor-style inputs. `prompts`: per prompt, a list of image (height, width) in pixels (multiples of 8
    keep the size). Each prompt is `text_before` text tokens, then per image <|vision_start|> <|image_pad|> x n
    <|vision_end|> and one text token, then `text_after` text tokens; prompts are left-padded to the longest.
    pixel_values / image_grid_thw come from the real image processor on random RGB images."""
    import numpy as np
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for sizes in prompts for h, w in sizes]
    seqs, pix = [], {}
    if images:
        pix = dict(qwen_image_processor()(images=images, return_tensors="pt"))
    grids = iter(pix["image_grid_thw"].tolist()) if images else iter(())

    def text(n):
        return torch.randint(1, QWEN_IMAGE, (n,), generator=gen).tolist()

    for sizes in prompts:
        ids = text(text_before)
        for _ in sizes:
            t, h, w = next(grids)
            ids += [QWEN_VSTART] + [QWEN_IMAGE] * (t * h * w // 4) + [QWEN_VEND] + text(1)
        seqs.append(ids + text(text_after))
    s = max(len(x) for x in seqs)
    input_ids = torch.tensor([[0] * (s - len(x)) + x for x in seqs])
    attention_mask = torch.tensor([[0] * (s - len(x)) + [1] * len(x) for x in seqs])
    out = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=(input_ids == QWEN_IMAGE).int())
    if images:
        out.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
    return out


def qwen_compare(hf, model, inputs, tol: float = 1e-4, pattern_tol: float = 1e-5) -> dict[str, float]:
    """Qwen2-VL / Qwen2.5-VL parity on real tokens: logits, resid_pre vs HF hidden_states[l], eager attention
    patterns on real query rows, the final norm, and the image features (`projector.hook_out`) vs HF's merger
    output. Returns the measured max abs diffs."""
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True, output_attentions=True)
        ours, cache = model.run_with_cache(**inputs)
    real = inputs["attention_mask"].bool()
    diffs = {"logits": (ref.logits - ours)[real].abs().max().item()}
    diffs["resid_pre"] = max((ref.hidden_states[l] - cache[f"blocks.{l}.hook_resid_pre"])[real].abs().max().item()
                             for l in range(model.cfg.n_layers))
    diffs["pattern"] = max(  # padded query rows are uniform in both: compare real query rows
        (ref.attentions[l] - cache[f"blocks.{l}.attn.hook_pattern"]).permute(0, 2, 1, 3)[real].abs().max().item()
        for l in range(model.cfg.n_layers)
    )
    final = cache["ln_final.hook_normalized"] * hf_final_norm_weight(hf)  # ours has it folded into W_U
    diffs["ln_final"] = (ref.hidden_states[-1] - final)[real].abs().max().item()
    if inputs.get("pixel_values") is not None:
        with torch.no_grad():
            feats = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        diffs["image_features"] = (torch.cat(feats) - cache["projector.hook_out"]).abs().max().item()
        assert diffs["image_features"] <= tol, diffs
    assert diffs["logits"] <= tol and diffs["resid_pre"] <= tol and diffs["ln_final"] <= tol, diffs
    assert diffs["pattern"] <= pattern_tol, diffs
    assert ref.logits[real].std() > 0.3  # logits with spread: a wrong position or mask cannot hide under tol
    return diffs


def hf_final_norm_weight(hf) -> torch.Tensor:
    """The HF decoder's final norm weight (HookedVLM folds it into the unembedding)."""
    for name, module in hf.named_modules():
        if name.endswith("language_model.norm"):
            return module.weight
    raise ValueError("no language_model.norm in this HF model")


def bf16_errors(hf, inputs, processor=None, real=None):
    """(our bf16 error, HF's bf16 error, converted model, our bf16 logits), each error the max abs difference from
    HF's fp32 logits (on `real` positions if given). The documented rule is our_err <= 2 * hf_err. Casts `hf`."""
    from hooked_vlm import HookedVLM

    with torch.no_grad():
        ref32 = hf(**inputs).logits
        hf = hf.to(torch.bfloat16)
        model = HookedVLM.from_hf(hf, processor)
        bf = dict(inputs, pixel_values=inputs["pixel_values"].to(torch.bfloat16))
        hf16 = hf(**bf).logits.float()
        ours = model(**bf)
    sel = (lambda t: t[real]) if real is not None else (lambda t: t)
    return sel(ours.float() - ref32).abs().max(), sel(hf16 - ref32).abs().max(), model, ours


# --------------------------------------------------------------------------------------------------- Qwen3-VL
def tiny_qwen3_vl(seed: int = 0, vocab: int = 64, deepstack=(0, 2), tie: bool = False):
    """Qwen3-VL sized like tiny_qwen_vl (same token ids, 4 px patches, 2x2 merge, so `qwen_inputs` feeds it): vision
    width 32, depth 3, 4 heads, GELU(tanh) MLP 48, a 4x4 learned position table (resampled to every grid),
    DeepStack from vision blocks `deepstack` into decoder layers 0.. ; decoder hidden 64, 4 heads of head_dim 16 (2 kv
    heads), 3 layers, qk-norm, interleaved M-RoPE with mrope_section [2, 3, 3] (d_head / 2 = 8 frequencies: t h w t h
    w t h), attention biases on."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, attention_bias=True,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], mrope_interleaved=True))
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack), hidden_act="gelu_pytorch_tanh")
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                        vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND, tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return redraw(Qwen3VLForConditionalGeneration(cfg), seed=seed)


def qwen3_processor():
    """The real Qwen3VLProcessor (image part: the PIL Qwen2-VL image processor of `qwen_image_processor`; the video
    processor needs torchvision, so it is left out) with a word-level tokenizer for vocab 64: pad "<pad>" (0), unk
    (1), words "w2".."w59", and Qwen's <|image_pad|> / <|video_pad|> / <|vision_start|> / <|vision_end|> at
    QWEN_IMAGE / QWEN_VIDEO / QWEN_VSTART / QWEN_VEND. Pads on the left; returns mm_token_type_ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    special = {0: "<pad>", 1: "<unk>", QWEN_IMAGE: "<|image_pad|>", QWEN_VIDEO: "<|video_pad|>",
               QWEN_VSTART: "<|vision_start|>", QWEN_VEND: "<|vision_end|>"}
    tok = Tokenizer(models.WordLevel(vocab={special.get(i, f"w{i}"): i for i in range(64)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    return ImageOnlyQwen3VLProcessor(image_processor=qwen_image_processor(), tokenizer=fast)


# -------------------------------------------------------------------------------------------------- Gemma 3
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 60, 61, 62  # with vocab 64; text words are 2..59 (and 63), pad 0, unk 1


def tiny_gemma3(seed: int = 0, vocab: int = 64, sliding_window: int = 6, mm_tokens: int = 4, **text_kwargs):
    """SigLIP (32 px, patch 8 -> 4x4 patches, 2 layers, with post_layernorm) -> pooled projector (2x2 = 4 tokens per
    image) -> Gemma 3 decoder (hidden 48, 4 heads of 16 (query_pre_attn_scalar 12, not 16), 2 kv heads, 4 layers:
    sliding (window 6), global, sliding, global; local rope base 1e4, global 1e6 with linear scaling x2).
    Gemma's (1 + w) norms get w ~ 0.1 N(0, 1); SigLIP's LayerNorms 1 + 0.1 N(0, 1)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, vision_use_head=False)
    tc = Gemma3TextConfig(**{**dict(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, query_pre_attn_scalar=12,
        sliding_window=sliding_window, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    ), **text_kwargs})
    cfg = Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=mm_tokens, image_token_index=GEMMA_IMAGE,
                       boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = redraw(Gemma3ForConditionalGeneration(cfg), seed=seed)
    with torch.no_grad():  # Gemma's norms multiply by (1 + w): centre their weights on 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and ("language_model" in name or "multi_modal_projector" in name):
                p.sub_(1.0)
    return model


def gemma3_processor(hf_model):
    """The real Gemma3Processor (PIL image processor) with a word-level tokenizer: "w{i}" words, <pad> 0 (left),
    <unk> 1, <image_soft_token> / <start_of_image> / <end_of_image> at GEMMA_IMAGE / GEMMA_BOI / GEMMA_EOI. The
    processor's "\\n\\n" around each image is whitespace to this tokenizer, so an image is <boi> <img> x n <eoi>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    cfg = hf_model.config
    n, v = cfg.text_config.vocab_size, cfg.vision_config
    special = {0: "<pad>", 1: "<unk>", GEMMA_IMAGE: "<image_soft_token>", GEMMA_BOI: "<start_of_image>",
               GEMMA_EOI: "<end_of_image>"}
    tok = Tokenizer(models.WordLevel(vocab={special.get(i, f"w{i}"): i for i in range(n)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    ip = Gemma3ImageProcessorPil(size={"height": v.image_size, "width": v.image_size})
    return Gemma3Processor(image_processor=ip, tokenizer=fast, image_seq_length=cfg.mm_tokens_per_image)


def gemma3_inputs(processor, images_per_prompt=(2, 1), seed: int = 0, words: int = 4):
    """Processor inputs for a left-padded batch: prompt i is `words` + 2 * i words with images_per_prompt[i] images
    (<start_of_image> placeholders) between words; random RGB images (sizes vary, resized by the processor)."""
    gen = torch.Generator().manual_seed(seed)
    texts, images = [], []
    for i, k in enumerate(images_per_prompt):
        ws = [f"w{int(t)}" for t in torch.randint(2, GEMMA_IMAGE, (words + 2 * i,), generator=gen)]
        parts = [ws[0]] + [p for j in range(k) for p in ("<start_of_image>", ws[min(j + 1, len(ws) - 1)])] + ws[1:]
        texts.append(" ".join(parts))
        images.append([random_image(24 + 8 * j, 40, seed=seed + 10 * i + j) for j in range(k)])
    if not any(images_per_prompt):
        return dict(processor(text=texts, return_tensors="pt", padding=True))
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def gemma3_image_counterfactual():
    """(hf, processor, clean, corrupt, metric): tiny Gemma 3, two prompts with 1 and 2 images and 2 words each (so
    position n - 6 lies inside the second image), corrupt = the same prompts with other pixels; metric a LogitDiff
    on fixed ids. For sweeps whose resume points fall inside a bidirectional image."""
    from hooked_vlm.analyses.metrics import LogitDiff

    hf = tiny_gemma3()
    proc = gemma3_processor(hf)
    clean = gemma3_inputs(proc, (1, 2), words=2)
    corrupt = dict(clean, pixel_values=gemma3_inputs(proc, (1, 2), seed=1, words=2)["pixel_values"])
    return hf, proc, clean, corrupt, LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
