"""Word-level tokenizer and LLaVA processor for the Shapes organism, built in code.

No hub is needed: the vocabulary is ``shapes.VOCAB`` and the image processor is the PIL SigLIP
one (no torchvision). The processor expands one ``<image>`` into 16 image tokens (64x64 image,
16 px patches, feature strategy "full", no CLS), which is what the model config expects.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from transformers import LlavaProcessor, PreTrainedTokenizerFast, SiglipImageProcessorPil

from .shapes import IMAGE_SIZE, PATCH_SIZE, VOCAB

TOKEN_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
BOS, PAD, IMAGE, UNK = (TOKEN_TO_ID[t] for t in ("<bos>", "<pad>", "<image>", "<unk>"))
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer; prepends ``<bos>``; pads on the left (for batched
    generation/last-position readout)."""
    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_TO_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    assert fast.convert_tokens_to_ids("<image>") == IMAGE
    assert len(fast) == len(VOCAB), "special tokens must not grow the vocabulary"
    return fast


def build_image_processor() -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_processor() -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        image_token="<image>",
        num_additional_image_tokens=0,
    )


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """Fast path used in training: same numbers as the processor for 64x64 RGB inputs
    (resize is the identity at that size), without per-call processor overhead."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encode_words(text: str) -> list[int]:
    """Token ids of space-separated words (no ``<bos>``, ``<image>`` not expanded)."""
    return [TOKEN_TO_ID.get(w, UNK) for w in text.split()]
