"""TokenLayout: where every token of a (batched) multimodal prompt comes from, and position sets over it.

Every per-token field is a [batch, pos] tensor, so a *position set* is simply a boolean mask [batch, pos]
(one row per prompt) and analyses can combine sets with & and |.

Worked example (LLaVA-1.5, 336 px CLIP, patch 14, "default" selection, batch of one)::

    input_ids:  <s> USER : <image>x576 \\n What is this ? ASSISTANT :
    position:    0   1   2   3 ... 578  579 ...
    is_image:    F   F   F   T ... T    F
    image_index: -1  -1  -1  0 ... 0    -1
    crop:        -1  -1  -1  0 ... 0    -1          (0 = base grid; LLaVA has no other crop)
    row, col:    -1  -1  -1  (0,0) (0,1) ... (23,23) -1
    last_image_token() -> position 578; LLaVA has no end-of-image marker (has_end_of_image_token is False), so
    end_of_image() is the first text position after the image, 579 (the narrow-gate paper's choice), never a patch; in_box(0, 0, .5, .5) -> the 144 tokens of rows 0-11, cols 0-11.

LLaVA-OneVision (anyres): crop 0 is the base grid, crop 1 the unpadded hi-res grid; a newline token closes
each row with col = -1. Qwen2-VL: each token is a merged 2x2 patch with (t, row, col) in the merged grid, and
end_of_image() is the <|vision_end|> token after the last image token; `position_ids` then has shape
[3, batch, pos] (M-RoPE; see the family's docstring for its worked example).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass
class TokenLayout:
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Tensor  # [batch, pos] or [3, batch, pos]
    is_image: Bool[Tensor, "batch pos"]
    image_index: Int[Tensor, "batch pos"]  # which image of that prompt; -1 elsewhere
    crop: Int[Tensor, "batch pos"]
    row: Int[Tensor, "batch pos"]
    col: Int[Tensor, "batch pos"]
    t: Int[Tensor, "batch pos"]
    grids: list[list[dict[int, tuple[int, int]]]] = field(default_factory=list)  # [batch][image] -> {crop: (rows, cols)}
    end_of_image_offset: int = 1
    has_end_of_image_token: bool = False  # False: end_of_image() is the first text position after the image (LLaVA)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def check_inputs(self, input_ids: Tensor) -> None:
        """Raise if this layout was built from other inputs."""
        if tuple(input_ids.shape) != self.shape or not torch.equal(input_ids.cpu(), self.input_ids):
            raise ValueError(
                f"this TokenLayout was built for other inputs (layout input_ids {self.shape}, given {tuple(input_ids.shape)}"
                f"{', same shape but different tokens' if tuple(input_ids.shape) == self.shape else ''})"
            )

    # ---- position sets (boolean masks [batch, pos]) ----
    def image_positions(self, image: int | None = None) -> Bool[Tensor, "batch pos"]:
        return self.is_image if image is None else self.image_index == self._image(image)

    def text_positions(self) -> Bool[Tensor, "batch pos"]:
        return ~self.is_image & self.attention_mask.bool()

    def _image(self, image: int) -> Tensor:
        n = self.image_index.max(dim=1).values + 1  # images per prompt
        if (n == 0).any():
            raise ValueError("some prompts in this batch have no image tokens")
        idx = torch.full_like(n, image) if image >= 0 else n + image
        if ((idx < 0) | (idx >= n)).any():
            raise ValueError(f"image {image} is out of range: the prompts have {n.tolist()} images")
        return idx[:, None]

    def _one_per_row(self, pos: Tensor) -> Bool[Tensor, "batch pos"]:
        b, s = self.shape
        if ((pos < 0) | (pos >= s)).any():
            raise ValueError(f"position {pos.tolist()} is outside the sequence of length {s}")
        mask = torch.zeros(b, s, dtype=torch.bool)
        mask[torch.arange(b), pos] = True
        return mask

    def last_image_token(self, image: int = -1) -> Bool[Tensor, "batch pos"]:
        m = self.image_positions(image)
        return self._one_per_row(torch.where(m, torch.arange(self.shape[1]), -1).max(dim=1).values)

    def first_after_image(self, image: int = -1) -> Bool[Tensor, "batch pos"]:
        return self._one_per_row(self.last_image_token(image).int().argmax(dim=1) + 1)

    def end_of_image(self, image: int = -1) -> Bool[Tensor, "batch pos"]:
        """The position through which image information is said to pass ('narrow gate'), never an image patch: the
        end marker after the image where the family has one (Qwen's <|vision_end|>, Gemma 3's <end_of_image>),
        else the first text position after it (LLaVA, as 2412.06646 does; `has_end_of_image_token` says which)."""
        return self._one_per_row(self.last_image_token(image).int().argmax(dim=1) + self.end_of_image_offset)

    def text_after_image(self, image: int = -1) -> Bool[Tensor, "batch pos"]:
        """The real text tokens after image `image` (default the last): the narrow-gate knockout's queries. An
        end-of-image marker is the gate, not a query; without one (LLaVA) every text token after the image is a
        query, the end-of-image position (the first of them) too."""
        last = self.last_image_token(image).int().argmax(dim=1) + int(self.has_end_of_image_token)
        return self.text_positions() & (torch.arange(self.shape[1])[None, :] > last[:, None])

    def final_token(self) -> Bool[Tensor, "batch pos"]:
        """The last real token of each prompt (right padding aware)."""
        s = self.shape[1]
        return self._one_per_row(torch.where(self.attention_mask.bool(), torch.arange(s), -1).max(dim=1).values)

    def in_box(self, x0: Any, y0: float | int | None = None, x1: float | int | None = None, y1: float | int | None = None,
               image: int = 0, crop: int = 0) -> Bool[Tensor, "batch pos"]:
        """Image tokens of `crop` whose patch centre lies in the box, given as fractions of the image (0..1):
        `in_box(x0, y0, x1, y1)` uses one box for every prompt; `in_box(boxes)` one box per prompt, with `boxes`
        a [batch, 4] tensor / array or a list of (x0, y0, x1, y1), row b for prompt b (e.g. each prompt's own
        object: `in_box([[x0 / w, y0 / h, x1 / w, y1 / h] for (x0, y0, x1, y1) in per_prompt_pixel_boxes])`)."""
        b = self.shape[0]
        if y0 is None and x1 is None and y1 is None:
            boxes = torch.as_tensor(x0, dtype=torch.float32)
            if tuple(boxes.shape) != (b, 4):
                raise ValueError(f"in_box(boxes): expected one (x0, y0, x1, y1) per prompt, shape ({b}, 4), got "
                                 f"{tuple(boxes.shape)}")
        elif None in (y0, x1, y1):
            raise ValueError("in_box: give x0, y0, x1, y1 (one box for all prompts) or boxes [batch, 4] alone")
        else:
            boxes = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32).expand(b, 4)
        mask = self.image_positions(image) & (self.crop == crop) & (self.col >= 0)
        out = torch.zeros_like(mask)
        for bi in range(b):
            img = int(self._image(image)[bi, 0])
            rows, cols = self.grids[bi][img][crop]
            cy, cx = (self.row[bi].float() + 0.5) / rows, (self.col[bi].float() + 0.5) / cols  # float32, as before
            bx0, by0, bx1, by1 = boxes[bi].tolist()
            out[bi] = mask[bi] & (cx >= bx0) & (cx < bx1) & (cy >= by0) & (cy < by1)
        return out

    def random_image_tokens(self, k: int, seed: int = 0, image: int | None = None) -> Bool[Tensor, "batch pos"]:
        gen = torch.Generator().manual_seed(seed)
        m = self.image_positions(image)
        out = torch.zeros_like(m)
        for bi in range(self.shape[0]):
            idx = m[bi].nonzero().flatten()
            if len(idx) < k:
                raise ValueError(f"asked for {k} random image tokens but prompt {bi} has {len(idx)}")
            out[bi, idx[torch.randperm(len(idx), generator=gen)[:k]]] = True
        return out

    def describe(self, batch: int, pos: int) -> str:
        """Hover text: the token and, for image tokens, its image / crop / row / col."""
        if not self.is_image[batch, pos]:
            return f"pos {pos} (text)"
        return (f"pos {pos} image {int(self.image_index[batch, pos])} crop {int(self.crop[batch, pos])} "
                f"row {int(self.row[batch, pos])} col {int(self.col[batch, pos])}")


def build_layout(model: Any, inputs: Mapping[str, Any]) -> TokenLayout:
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids").cpu()
    attention_mask = inputs.pop("attention_mask", None)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.cpu()
    position_ids = inputs.pop("position_ids", None)
    family = model.family
    b, s = input_ids.shape
    is_image = input_ids == model.cfg.image_token_id
    fields = {k: torch.full((b, s), -1, dtype=torch.long) for k in ("image_index", "crop", "row", "col", "t")}
    grids: list[list[dict[int, tuple[int, int]]]] = [[] for _ in range(b)]
    plan = family.plan(model, input_ids, **inputs)  # parsed once, for the coordinates and the positions
    if plan.pixel_values is not None:
        coords = family.image_coords(model, plan)
        # images are consumed in reading order: prompt 0's images first, each taking its token count
        cursor = 0
        for bi in range(b):
            pos = is_image[bi].nonzero().flatten()
            start, k = 0, 0
            while start < len(pos):
                if cursor >= len(coords):
                    raise ValueError(f"prompt {bi} has more image tokens than the {len(coords)} images give")
                c = coords[cursor]
                n = len(c.row)
                span = pos[start : start + n]
                if len(span) != n:
                    raise ValueError(f"prompt {bi}: image {k} needs {n} image tokens, only {len(span)} are left")
                fields["image_index"][bi, span] = k
                for name in ("crop", "row", "col", "t"):
                    fields[name][bi, span] = getattr(c, name)
                grids[bi].append(c.grids)
                start, k, cursor = start + n, k + 1, cursor + 1
        if cursor != len(coords):
            raise ValueError(f"the prompts hold {cursor} images' tokens but {len(coords)} images were given")
    elif is_image.any():
        raise ValueError("the prompts have image tokens but no pixel_values were given")
    if position_ids is None:
        with torch.no_grad():
            position_ids = family.position_ids(model, input_ids.to(model.embed.weight.device),
                                               attention_mask.to(model.embed.weight.device), plan)
    return TokenLayout(input_ids, attention_mask, position_ids.cpu(), is_image, grids=grids,
                       end_of_image_offset=family.end_of_image_offset(),
                       has_end_of_image_token=family.has_end_of_image_token, **fields)
