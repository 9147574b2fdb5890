"""How each model family is built for the Shapes organism: config, processor, image inputs.

One ``Recipe`` per family; the trainer, the evaluation and the loaders only talk to recipes, so
adding a family is one more entry here. Both recipes give 16 image tokens on the same 4x4 grid of
16 px cells (row-major), so ``Scene.object_patches`` and the planted-circuit targets are shared:

=========  =====================================  ============================================
family     image block in the token sequence      vision tower
=========  =====================================  ============================================
llava      ``<image>`` x 16                       SigLIP d64, 2 layers, 16 px patches
qwen2_vl   ``<|vision_start|> <image> x 16        Qwen2-VL ViT d64, 2 layers, 8 px patches
           <|vision_end|>``                       merged 2x2 (M-RoPE positions in the decoder)
qwen3_vl   as qwen2_vl                            Qwen3-VL ViT d64, 2 layers, 8 px patches, a 4x4
                                                  learned position table resampled to the 8x8
                                                  grid, merged 2x2; DeepStack from block 0 into
                                                  decoder layer 0; qk-norm, interleaved M-RoPE
gemma3     ``<start_of_image> <image> x 16        SigLIP d64, 2 layers, 8 px patches, average-
           <end_of_image>``                       pooled 2x2 (Gemma 3 decoder, image tokens
                                                  attend bidirectionally within the image)
=========  =====================================  ============================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from . import shapes as S
from .processing import (
    BOI_ID, BOS, EOI_ID, GEMMA_PATCH, GEMMA_VOCAB, IMAGE, PAD, QWEN_PATCH, QWEN_VOCAB, VEND_ID, VSTART_ID,
    build_gemma3_processor, build_processor, build_qwen_processor, pixel_values, qwen_pixel_values,
)

# The text model is the same in both families: Qwen2-style d64, 4 layers, 4 heads (2 kv), untied.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None)


@dataclass(frozen=True)
class Recipe:
    family: str
    hf_class: str  # transformers class name
    description: dict[str, str]
    image_block: tuple[int, ...]  # token ids that stand for one image in a training sequence
    build_config: Callable[[float], Any]
    build_processor: Callable[[], Any]
    image_inputs: Callable[[list[Image.Image]], dict[str, torch.Tensor]]  # fast path, equal to the processor's
    mm_token_type_ids: bool = False  # Qwen2-VL marks image tokens per position (what its processor returns)
    token_type_ids: bool = False  # Gemma 3 likewise, under this name (its bidirectional image attention reads it)

    @property
    def first_image_pos(self) -> int:
        """Position of the first image token in a sequence (after ``<bos>`` and any start marker)."""
        return 1 + self.image_block.index(IMAGE)

    def text_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs the family needs besides input_ids / attention_mask."""
        out = {"mm_token_type_ids": (ids == IMAGE).int()} if self.mm_token_type_ids else {}
        if self.token_type_ids:
            out["token_type_ids"] = (ids == IMAGE).long()
        return out

    def model_class(self):
        import transformers

        return getattr(transformers, self.hf_class)


def _llava_config(init_range: float):
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=S.IMAGE_SIZE, patch_size=S.PATCH_SIZE, num_channels=3, vision_use_head=False,
        initializer_range=init_range,
    )
    text = Qwen2Config(vocab_size=len(S.VOCAB), initializer_range=init_range, **TEXT)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE,
        image_seq_length=S.NUM_IMAGE_TOKENS, vision_feature_select_strategy="full",
        vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def _qwen2_vl_config(init_range: float):
    from transformers import Qwen2VLConfig

    # d_head 16 -> 8 rotary frequencies split (t, h, w) = (2, 3, 3), as Qwen2-VL splits its 64.
    text = dict(TEXT, vocab_size=len(QWEN_VOCAB), initializer_range=init_range,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    vision = dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4, in_channels=3,
                  patch_size=QWEN_PATCH, temporal_patch_size=2, spatial_merge_size=2, initializer_range=init_range)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=PAD,
                        vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID, tie_word_embeddings=False)
    cfg.initializer_range = init_range
    return cfg


def _qwen3_vl_config(init_range: float):
    from transformers import Qwen3VLConfig

    # Qwen2-VL's organism sizes; Qwen3-VL's text config has no bos / eos / tie fields (the top config ties)
    text = {k: v for k, v in TEXT.items() if k not in ("tie_word_embeddings", "bos_token_id", "eos_token_id")}
    text.update(vocab_size=len(QWEN_VOCAB), head_dim=16, initializer_range=init_range,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], mrope_interleaved=True))
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=QWEN_PATCH,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0], initializer_range=init_range)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=PAD,
                        vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID, tie_word_embeddings=False)
    cfg.initializer_range = init_range
    return cfg


def _gemma3_config(init_range: float):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=S.IMAGE_SIZE, patch_size=GEMMA_PATCH, num_channels=3, vision_use_head=False,
        initializer_range=init_range,
    )
    # the TEXT sizes; layers 0 and 3 local (window 16), 1 and 2 global: the planted image-lookup (L1) and item
    # retrieval (L2) heads reach further back than a window
    text = Gemma3TextConfig(
        vocab_size=len(GEMMA_VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"], tie_word_embeddings=False, bos_token_id=BOS,
        pad_token_id=PAD, eos_token_id=None, initializer_range=init_range,
    )
    return Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=S.NUM_IMAGE_TOKENS,
                        image_token_index=IMAGE, boi_token_index=BOI_ID, eoi_token_index=EOI_ID,
                        tie_word_embeddings=False, initializer_range=init_range)


RECIPES: dict[str, Recipe] = {
    "llava": Recipe(
        family="llava", hf_class="LlavaForConditionalGeneration",
        description={"vision": "SigLIP d64, 2 layers, 4 heads, patch 16",
                     "text": "Qwen2 d64, 4 layers, 4 heads (2 kv), untied, 1-D RoPE"},
        image_block=(IMAGE,) * S.NUM_IMAGE_TOKENS, build_config=_llava_config, build_processor=build_processor,
        image_inputs=lambda images: {"pixel_values": pixel_values(images)},
    ),
    "qwen2_vl": Recipe(
        family="qwen2_vl", hf_class="Qwen2VLForConditionalGeneration",
        description={"vision": "Qwen2-VL ViT d64, 2 layers, 4 heads, patch 8, 2x2 merge",
                     "text": "Qwen2-VL d64, 4 layers, 4 heads (2 kv), untied, M-RoPE sections (2, 3, 3)"},
        image_block=(VSTART_ID,) + (IMAGE,) * S.NUM_IMAGE_TOKENS + (VEND_ID,), build_config=_qwen2_vl_config,
        build_processor=build_qwen_processor, image_inputs=qwen_pixel_values, mm_token_type_ids=True,
    ),
    "qwen3_vl": Recipe(
        family="qwen3_vl", hf_class="Qwen3VLForConditionalGeneration",
        description={"vision": "Qwen3-VL ViT d64, 2 layers, 4 heads, patch 8, 4x4 position table, 2x2 merge, "
                               "DeepStack from block 0",
                     "text": "Qwen3-VL d64, 4 layers, 4 heads (2 kv), qk-norm, untied, interleaved M-RoPE (2, 3, 3), "
                             "DeepStack into layer 0"},
        image_block=(VSTART_ID,) + (IMAGE,) * S.NUM_IMAGE_TOKENS + (VEND_ID,), build_config=_qwen3_vl_config,
        build_processor=build_qwen_processor, image_inputs=qwen_pixel_values, mm_token_type_ids=True,
    ),
    "gemma3": Recipe(
        family="gemma3", hf_class="Gemma3ForConditionalGeneration",
        description={"vision": "SigLIP d64, 2 layers, 4 heads, patch 8, average-pooled 2x2 to 16 tokens",
                     "text": "Gemma 3 d64, 4 layers (local window 16, global, global, local), 4 heads (2 kv), "
                             "untied, qk-norm, pre+post norms"},
        image_block=(BOI_ID,) + (IMAGE,) * S.NUM_IMAGE_TOKENS + (EOI_ID,), build_config=_gemma3_config,
        build_processor=build_gemma3_processor, image_inputs=lambda images: {"pixel_values": pixel_values(images)},
        token_type_ids=True,
    ),
}


def get_recipe(family: str) -> Recipe:
    if family not in RECIPES:
        raise ValueError(f"no Shapes organism recipe for family {family!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[family]
