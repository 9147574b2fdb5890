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


def tiny_llava(tower: str = "clip", decoder: str = "llama", strategy: str = "default", layer=-2, seed: int = 0, vocab: int = 64):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
    vc = CLIPVisionConfig(projection_dim=32, **common) if tower == "clip" else SiglipVisionConfig(vision_use_head=False, **common)
    tcls = LlamaConfig if decoder == "llama" else Qwen2Config
    tc = tcls(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
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
