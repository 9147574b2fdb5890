"""Word-level tokenizers and processors for the Shapes organisms, built in code.

No hub is needed: the vocabulary is ``shapes.VOCAB`` (plus ``<|vision_start|>`` / ``<|vision_end|>``
for Qwen2-VL) and the image processors are the PIL ones (no torchvision). Both processors expand one
``<image>`` in the prompt into 16 image tokens, so the same ``Sample.prompt`` works for both families:

* LLaVA: SigLIP, 64x64 image, 16 px patches, feature strategy "full", no CLS -> 16 tokens.
* Qwen2-VL: 8 px patches merged 2x2 -> a 4x4 grid of 16 px cells -> 16 tokens, wrapped as
  ``<|vision_start|> <image>x16 <|vision_end|>`` (the chat template's job in the real model).
* Gemma 3: SigLIP with 8 px patches (8x8), average-pooled 2x2 by the projector -> the same 4x4 grid of 16 px
  cells -> 16 tokens, wrapped by Gemma3Processor as ``<start_of_image> <image>x16 <end_of_image>`` (its "\n\n"
  around them are whitespace to the word-level tokenizer).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from transformers import Gemma3Processor, LlavaProcessor, PreTrainedTokenizerFast, Qwen2VLProcessor, SiglipImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .shapes import GRID, IMAGE_SIZE, PATCH_SIZE, VOCAB

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN_VOCAB: tuple[str, ...] = VOCAB + (VISION_START, VISION_END)  # appended: shared ids stay equal
TOKEN_TO_ID: dict[str, int] = {w: i for i, w in enumerate(QWEN_VOCAB)}
BOS, PAD, IMAGE, UNK = (TOKEN_TO_ID[t] for t in ("<bos>", "<pad>", "<image>", "<unk>"))
VSTART_ID, VEND_ID = TOKEN_TO_ID[VISION_START], TOKEN_TO_ID[VISION_END]
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def build_tokenizer(vocab: tuple[str, ...] = VOCAB, extra_special: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer; prepends ``<bos>``; pads on the left (for batched
    generation/last-position readout). `extra_special`: more named special tokens (Gemma 3's boi / eoi)."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
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
        extra_special_tokens={"image_token": "<image>", **(extra_special or {})},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    assert fast.convert_tokens_to_ids("<image>") == IMAGE
    assert len(fast) == len(vocab), "special tokens must not grow the vocabulary"
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


class ShapesQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (which needs torchvision) that wraps each
    ``<image>`` of the prompt in ``<|vision_start|> ... <|vision_end|>`` before expanding it."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None:
            wrap = lambda t: t.replace("<image>", f"{VISION_START} <image> {VISION_END}")  # noqa: E731
            text = wrap(text) if isinstance(text, str) else [wrap(t) for t in text]
        return super().__call__(images=images, text=text, **kwargs)


QWEN_PATCH = 8  # 8 px patches merged 2x2: one token per 16 px cell, as in the LLaVA organism


def build_qwen_image_processor() -> Qwen2VLImageProcessorPil:
    side = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, temporal_patch_size=2, merge_size=2, size={"shortest_edge": side, "longest_edge": side},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), resample=Image.Resampling.BILINEAR,
    )


def build_qwen_processor() -> ShapesQwen2VLProcessor:
    return ShapesQwen2VLProcessor(image_processor=build_qwen_image_processor(), tokenizer=build_tokenizer(QWEN_VOCAB))


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """Fast path used in training: same numbers as the processor for 64x64 RGB inputs
    (resize is the identity at that size), without per-call processor overhead."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encode_words(text: str) -> list[int]:
    """Token ids of space-separated words (no ``<bos>``, ``<image>`` not expanded)."""
    return [TOKEN_TO_ID.get(w, UNK) for w in text.split()]


def qwen_pixel_values(images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Fast path for training: the Qwen2-VL processor's ``pixel_values`` / ``image_grid_thw`` for
    64x64 RGB inputs (tested equal). Each image is repeated over the 2 temporal slots and cut into
    8x8 patches ordered by 2x2 merge window, windows in row-major order."""
    x = pixel_values(images)  # [n, 3, 64, 64], normalised
    n, m, g = len(images), 2, IMAGE_SIZE // QWEN_PATCH
    x = x[:, None].expand(n, 2, 3, IMAGE_SIZE, IMAGE_SIZE)  # temporal_patch_size 2
    x = x.reshape(n, 2, 3, g // m, m, QWEN_PATCH, g // m, m, QWEN_PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # n, gh, gw, mh, mw, c, t, ph, pw
    flat = x.reshape(n * g * g, 3 * 2 * QWEN_PATCH * QWEN_PATCH)
    return {"pixel_values": flat.contiguous(), "image_grid_thw": torch.tensor([[1, g, g]] * n)}


BOI, EOI = "<start_of_image>", "<end_of_image>"
GEMMA_VOCAB: tuple[str, ...] = VOCAB + (BOI, EOI)  # appended: shared ids stay equal
BOI_ID, EOI_ID = len(VOCAB), len(VOCAB) + 1
GEMMA_PATCH = 8  # 8x8 patches of 8 px, pooled 2x2 by the projector: one token per 16 px cell


class ShapesGemma3Processor(Gemma3Processor):
    """Gemma3Processor whose prompts write the image as ``<image>`` (as the other organisms' do): it becomes
    Gemma's ``<start_of_image>`` placeholder, which the processor expands into the image block."""

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None:
            text = text.replace("<image>", BOI) if isinstance(text, str) else [t.replace("<image>", BOI) for t in text]
        if (isinstance(text, list) and isinstance(images, (list, tuple)) and len(images) == len(text)
                and all(isinstance(im, Image.Image) for im in images) and all(t.count(BOI) == 1 for t in text)):
            images = [[im] for im in images]  # one image per prompt (Gemma3Processor reads a flat list as one prompt's)
        return super().__call__(images=images, text=text, **kwargs)


def build_gemma3_processor() -> ShapesGemma3Processor:
    ip = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=Image.Resampling.BILINEAR, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
        do_convert_rgb=True, do_pan_and_scan=False,
    )
    tok = build_tokenizer(GEMMA_VOCAB, {"boi_token": BOI, "eoi_token": EOI})
    return ShapesGemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=GRID * GRID)
