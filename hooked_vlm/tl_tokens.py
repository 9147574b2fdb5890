"""TransformerLens's token and string helpers on HookedVLM (`to_tokens`, `to_string`, `to_single_token`,
`to_str_tokens`) and `bind_inputs`, which lets token-only TL tools run with the image. Part of
`hooked_vlm.tl_api.TransformerLensAPI`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from jaxtyping import Int
from torch import Tensor


class TokenAPI:
    """Mixin: tokens <-> strings with image tokens accounted for."""

    # ------------------------------------------------------------------------------ tokens and strings
    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (follows `model.processor` if it is replaced)."""
        return getattr(self.processor, "tokenizer", self.processor)

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this HookedVLM has no tokenizer: pass processor= to from_hf / from_pretrained")
        return self.tokenizer

    def to_tokens(self, text: str | list[str], **kwargs: Any) -> Int[Tensor, "batch pos"]:
        """Token ids [batch, pos] (TransformerLens's `to_tokens`). Each image placeholder token in the text (e.g.
        ``<image>``, Qwen's ``<|image_pad|>``; write what the processor's chat template writes around it) is
        expanded into as many image tokens as the k-th image of the inputs bound with `bind_inputs` takes there,
        so TL tools that tokenize text themselves (``head_detector``) get the sequence the model expects:

            inputs = model.processor(images=[img], text=[prompt], return_tensors="pt")
            with model.bind_inputs(**inputs):
                scores = transformer_lens.head_detector.detect_head(model, prompt, "previous_token_head")
        """
        tokenizer = self._need_tokenizer()
        ids = tokenizer(text, return_tensors="pt", padding=True, **kwargs)["input_ids"]
        img = self.cfg.image_token_id
        if not (ids == img).any():
            return ids
        template = self._bound_ids
        if template is None:
            raise ValueError(
                f"the text has {int((ids == img).sum())} image placeholder(s) but no inputs are bound: to_tokens cannot "
                "know how many tokens each image takes. Bind the processor's output first: "
                "`with model.bind_inputs(**processor(images=..., text=...)): ...`, or use the processor directly"
            )
        # tokens per image from the bound inputs' layout (not from runs of image tokens: two images may be adjacent)
        layout = self.layout({**self._bound, "input_ids": template})
        rows = []
        for b in range(ids.shape[0]):
            index = layout.image_index[b if template.shape[0] == ids.shape[0] else 0]
            runs = torch.bincount(index[index >= 0]).tolist()
            row, k = [], 0
            for t in ids[b].tolist():
                if t != img:
                    row.append(t)
                    continue
                if k >= len(runs):
                    raise ValueError(f"to_tokens: text {b} has more image placeholders than the bound inputs have "
                                     f"images ({len(runs)})")
                row += [img] * runs[k]
                k += 1
            if k != len(runs):
                raise ValueError(f"to_tokens: text {b} has {k} image placeholders, the bound inputs {len(runs)} images")
            rows.append(row)
        pad = tokenizer.pad_token_id or 0
        width = max(len(r) for r in rows)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        return torch.tensor([[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in rows])

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode token ids: one string for [pos], a list of strings for [batch, pos] (TL's `to_string`)."""
        tokens = torch.as_tensor(tokens)
        tokenizer = self._need_tokenizer()
        return tokenizer.decode(tokens) if tokens.ndim <= 1 else tokenizer.batch_decode(tokens)

    def to_single_token(self, word: str) -> int:
        """The id of `word`, which must be exactly one token (else ValueError with its tokens)."""
        ids = self._need_tokenizer()(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens ({ids}), not one")
        return ids[0]

    def to_str_tokens(self, input: Any, expand_images: bool = False, **kwargs: Any) -> list[str] | list[list[str]]:
        """One string per token (TL's `to_str_tokens`), with each image's run of image tokens shown as ONE marker
        ``<image k: n tokens>`` (k counts the prompt's images from 0). `expand_images=True` keeps one string per
        position instead (``<image k>`` for each image token), so the list lines up with cache positions.

        input: text (str or list of str: tokenized with `to_tokens`, so bound inputs expand placeholders), token
               ids ([pos] or [batch, pos]), or the processor's inputs (a mapping with input_ids; with pixel_values
               the images are split by the layout, so adjacent images get one marker each). A [batch, pos]
               input gives one list per prompt. Padding tokens are kept (they hold positions)."""
        layout = None
        if isinstance(input, Mapping):
            ids = input["input_ids"]
            if input.get("pixel_values") is not None or self._bound.get("pixel_values") is not None:
                layout = self.layout({**self._bound, **input})
        elif isinstance(input, (str, list)) and (isinstance(input, str) or (input and isinstance(input[0], str))):
            ids = self.to_tokens(input, **kwargs)
            if isinstance(input, str):
                ids = ids[0]
        else:
            ids = torch.as_tensor(input)
        ids = torch.as_tensor(ids).cpu()
        if ids.ndim not in (1, 2) or ids.is_floating_point():
            raise ValueError(f"to_str_tokens: expected text, token ids [pos] / [batch, pos] or processor inputs, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        rows = ids[None] if ids.ndim == 1 else ids
        out = [self._str_row(rows[b], None if layout is None else layout.image_index[b], expand_images)
               for b in range(rows.shape[0])]
        return out[0] if ids.ndim == 1 else out

    def _str_row(self, ids: Tensor, image_index: Tensor | None, expand: bool) -> list[str]:
        is_img = ids == self.cfg.image_token_id
        if image_index is None:  # no layout: each contiguous run of image tokens is one image
            starts = is_img & ~torch.cat([torch.tensor([False]), is_img[:-1]])
            image_index = torch.where(is_img, starts.cumsum(0) - 1, -1)
        words = self._need_tokenizer().batch_decode(ids[:, None].tolist(), clean_up_tokenization_spaces=False)
        counts = torch.bincount(image_index[image_index >= 0]).tolist() if bool(is_img.any()) else []
        out, prev = [], -1
        for p, word in enumerate(words):
            k = int(image_index[p])
            if k < 0:
                out.append(word)
            elif expand:
                out.append(f"<image {k}>")
            elif k != prev:
                out.append(f"<image {k}: {counts[k]} tokens>")
            prev = k
        return out

    @contextmanager
    def bind_inputs(self, **inputs: Any) -> Iterator[Any]:
        """Supply image inputs (and attention_mask / position_ids) to every forward inside the block, so tools
        that call `model(tokens)` with tokens only, such as `transformer_lens.patching` and `head_detector`,
        run WITH the image. `input_ids` given here are not fed to the model (the tool passes its own); `to_tokens`
        uses them to expand image placeholders (see there).

            with model.bind_inputs(**inputs):
                effect = transformer_lens.patching.get_act_patch_resid_pre(model, corrupt_ids, clean_cache, metric)
        """
        unknown = sorted(set(inputs) - self._accepted)
        if unknown:
            raise TypeError(f"bind_inputs got unexpected keyword(s) {unknown}; it takes {sorted(self._accepted)}")
        previous = self._bound, self._bound_ids
        self._bound = {k: v for k, v in inputs.items() if k != "input_ids"}
        self._bound_ids = inputs.get("input_ids")
        try:
            yield self
        finally:
            self._bound, self._bound_ids = previous


__all__ = ["TokenAPI"]
