"""LLaVA-OneVision (`llava_onevision`): SigLIP tower -> 2-layer MLP projector, run on every *crop* of an image
("anyres"), then packed: base grid, unpadded (and possibly downsampled) hi-res grid with an `image_newline`
token closing each row. Qwen2 decoder with plain 1-D RoPE (positions 0..S-1, left pads counted, as HF).

How one image becomes tokens (HF `get_image_features` + `pack_image_features`, reproduced exactly):

1. `select_best_resolution(image_size, image_grid_pinpoints)` picks a canvas (H, W); the processor resizes the
   image into it keeping the aspect ratio, pads the rest, and cuts it into (H/s) x (W/s) crops of the tower's
   input size s. pixel_values holds [base, crop_0_0, crop_0_1, ...]: the base is the whole image squashed to s x s.
2. Every crop goes through the tower and the projector: a g x g grid of features (g = s / patch size).
3. The hi-res crops are stitched into one (H/s*g) x (W/s*g) grid; the rows (or cols) that only saw padding are
   cut away (`unpad_image`); if the grid still has more than ~`max` * g * g features ("anyres_max_<max>", ratio
   > 1.1) it is bilinearly downsampled by that ratio.
4. Sequence = base grid (g*g, row-major), then the hi-res grid row by row, each row followed by `image_newline`.
   Prompts with several images (`batch_num_images` given and > 1 for that prompt) take a single crop instead:
   the image is padded to a square, resized to s x s, and gives the base grid plus one `image_newline`.

Worked example (tiny config: image_size s = 32, patch 8 -> g = 4; pinpoints [[32,32],[32,64],[64,32],[64,64]];
"anyres_max_9"; "full" selection), one image of height 40 and width 24, i.e. image_sizes = [[40, 24]]:

    best resolution (H, W) = (64, 32) -> 2 x 1 crops -> pixel_values [1, 3, 3, 32, 32] (base + 2 crops)
    stitched hi-res grid: 8 rows x 4 cols; the image's aspect 24/40 = 0.6 > 4/8 = 0.5, so it filled the width:
        new_height = int(round(40 * 4/24, 7)) = 6, padding = (8 - 6) // 2 = 1 -> keep rows 1..6: a 6 x 4 grid
    ratio = sqrt(6*4 / (9 * 4*4)) = 0.41 <= 1.1 -> no downsampling
    image tokens = 16 (base) + 6 * (4 + 1) (hi-res rows + newlines) = 46, as the processor expands <image>

    token k:  0 .. 15        | 16  17  18  19  20      | 21 .. 25   | ... | 41  42  43  44  45
    crop:     0              | 1   1   1   1   1       | 1          |     | 1   1   1   1   1
    row:      k // 4         | 0   0   0   0   0       | 1          |     | 5   5   5   5   5
    col:      k % 4          | 0   1   2   3   -1 (nl) | 0 1 2 3 -1 |     | 0   1   2   3   -1 (nl)
    grids = {0: (4, 4), 1: (6, 4)}; rows of crop 1 count within the *unpadded* grid, so row 0 is the image's top.

The same image in a prompt with two images (batch_num_images = [2]): 16 base tokens + 1 newline (crop 0,
row 3, col -1) = 17 tokens; its base grid then covers the image padded to a square, not the image itself.
For the released checkpoints (s = 384, patch 14) g = 27: 729 base tokens, and anyres_max_9 caps the hi-res
grid near 9 * 729 features.

Hooks: `projector.mlp.hook_in` / `projector.mlp.hook_out` are the per-crop grids before / after the MLP
[n_crops, g*g, d]; `projector.hook_out` is the packed features of all images [n_image_tokens, d_model], in
the order they are placed into the sequence (newline tokens included).

Differences from HF, on purpose: HF's forward accepts `vision_aspect_ratio` but ignores it (it always uses
`config.vision_aspect_ratio`); we raise if it differs from ours (`cfg.family_options["vision_aspect_ratio"]`)
instead of silently ignoring it. Videos (`pixel_values_videos`) are not supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import HookedVLMConfig
from ..projector import MLPProjector
from . import register
from .backbones import SIGLIP_VISION, TEXT_DECODERS
from .base import FieldRules, ImageCoords, ImageInputs, KeyMapper, make_plan, map_decoder
from .llava import LLAVA_IMPLEMENTED, Llava, Selection, feature_layers, map_vit


@dataclass(frozen=True)
class ImagePlan:
    """How one image's crops are packed. `crops` = number of tower crops (1 = single crop: base grid +
    one newline). For multi-crop images: `crop_grid` = (rows, cols) of hi-res crops, `keep` = (row0, row1,
    col0, col1), the unpadded window of the stitched (rows*g) x (cols*g) grid, `out` = its final (rows, cols)
    after the optional anyres_max downsampling."""

    crops: int
    crop_grid: tuple[int, int] = (0, 0)
    keep: tuple[int, int, int, int] = (0, 0, 0, 0)
    out: tuple[int, int] = (0, 0)

    @property
    def downsampled(self) -> bool:
        kh, kw = self.keep[1] - self.keep[0], self.keep[3] - self.keep[2]
        return self.out != (kh, kw)


def max_patches(vision_aspect_ratio: str) -> int:
    # HF parses it with str.strip("anyres_max_") (a character set); the same call keeps the same results
    try:
        return int(vision_aspect_ratio.strip("anyres_max_"))
    except ValueError:
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}") from None


def plan_image(size_hw: Sequence[int], pinpoints: list, image_size: int, g: int, aspect: str, multi_crop: bool) -> ImagePlan:
    """Geometry of one image, with HF's arithmetic (image_size_to_num_patches, get_anyres_image_grid_shape,
    unpad_image, the anyres_max ratio)."""
    from transformers.image_processing_utils import select_best_resolution

    if not multi_crop:
        return ImagePlan(crops=1)
    oh, ow = (int(v) for v in size_hw)
    bh, bw = select_best_resolution([oh, ow], pinpoints)
    crops = math.ceil(bh / image_size) * math.ceil(bw / image_size) + 1
    nph, npw = bh // image_size, bw // image_size
    ch, cw = nph * g, npw * g
    r0, r1, c0, c1 = 0, ch, 0, cw
    if ow / oh > cw / ch:
        pad = (ch - int(round(oh * (cw / ow), 7))) // 2
        r0, r1 = pad, ch - pad
    else:
        pad = (cw - int(round(ow * (ch / oh), 7))) // 2
        c0, c1 = pad, cw - pad
    kh, kw = r1 - r0, c1 - c0
    ratio = math.sqrt(kh * kw / (max_patches(aspect) * g**2))
    out = (int(kh // ratio), int(kw // ratio)) if ratio > 1.1 else (kh, kw)
    return ImagePlan(crops=crops, crop_grid=(nph, npw), keep=(r0, r1, c0, c1), out=out)


@dataclass(frozen=True)
class OnevisionImages:
    """A call's parsed images (the plan's geometry): the feature selection and each image's crop plan."""

    select: Selection
    plans: tuple[ImagePlan, ...]


class OnevisionProjector(nn.Module):
    """The MLP projector run per crop, then anyres packing with the learned `image_newline`."""

    def __init__(self, d_in: int, d_model: int, act: str, bias: bool, grid: int):
        super().__init__()
        self.grid = grid
        self.mlp = MLPProjector(d_in, d_model, act, bias)
        self.image_newline = nn.Parameter(torch.zeros(d_model))
        self.hook_out = HookPoint()  # packed features of all images, in sequence order [n_image_tokens, d_model]

    def forward(self, feats: Float[Tensor, "n_crops pos d_in"], plans: list[ImagePlan]) -> Float[Tensor, "n_tokens d_model"]:
        crops = torch.split(self.mlp(feats), [p.crops for p in plans], dim=0)
        return self.hook_out(torch.cat([self.pack(c, p) for c, p in zip(crops, plans)], dim=0))

    def pack(self, crops: Float[Tensor, "n pos d"], plan: ImagePlan) -> Float[Tensor, "tokens d"]:
        newline = self.image_newline.to(crops.dtype)
        if plan.crops == 1:
            return torch.cat([crops[0], newline[None]], dim=0)
        g, (nph, npw), (r0, r1, c0, c1) = self.grid, plan.crop_grid, plan.keep
        base = crops[0]
        if base.shape[0] != g * g:
            raise ValueError(
                f"anyres packing needs {g * g} features per crop (a {g}x{g} grid) but the selected features have "
                f"{base.shape[0]}: with a SigLIP tower use vision_feature_select_strategy 'full' (HF raises here too)"
            )
        hi = crops[1:].view(nph, npw, g, g, -1).permute(4, 0, 2, 1, 3).contiguous()  # [d, nph, g, npw, g]
        hi = hi.flatten(1, 2).flatten(2, 3)[:, r0:r1, c0:c1]  # stitched, unpadded [d, rows, cols]
        if plan.downsampled:
            hi = nn.functional.interpolate(hi[None], list(plan.out), mode="bilinear")[0]
        hi = torch.cat([hi, newline[:, None, None].expand(*hi.shape[:-1], 1)], dim=-1)
        return torch.cat([base, hi.flatten(1, 2).transpose(0, 1)], dim=0)


ONEVISION = FieldRules(
    "LlavaOnevisionConfig", implemented=LLAVA_IMPLEMENTED + ("image_grid_pinpoints", "vision_aspect_ratio"),
    ignored={"video_token_index": "videos are refused at the input (pixel_values_videos)"},
)


class LlavaOnevision(Llava):
    model_type = "llava_onevision"
    # the released checkpoints use SigLIP; a CLIP tower is not parity-tested with anyres packing, so refused
    config_fields = (ONEVISION, *TEXT_DECODERS, SIGLIP_VISION)
    image_kwargs = ("pixel_values", "image_sizes", "batch_num_images", "vision_feature_layer",
                    "vision_feature_select_strategy", "vision_aspect_ratio")
    ignored_keys = Llava.ignored_keys

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        cfg = super().config_from_hf(hf_config)
        cfg.family_options = dict(
            image_grid_pinpoints=[list(p) for p in hf_config.image_grid_pinpoints],
            vision_aspect_ratio=hf_config.vision_aspect_ratio,
        )
        return cfg

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        n_feat = len(feature_layers(cfg, None))
        return OnevisionProjector(cfg.vision.d_model * n_feat, cfg.d_model, cfg.projector_act, cfg.projector_bias,
                                  cfg.vision.image_size // cfg.vision.patch_size)

    # ------------------------------------------------------------------------------------------ inputs
    def plan(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
             **options: Any) -> ImageInputs:
        """Every image's crop plan, the feature selection and the input checks, once per call."""
        cfg = model.cfg
        select = Selection(tuple(feature_layers(cfg, options.get("vision_feature_layer"))),
                           self._strategy(cfg, options.get("vision_feature_select_strategy")))
        if pixel_values is None:
            return make_plan(None, options, OnevisionImages(select, ()))
        images = self._plans(cfg, options.get("image_sizes"), options.get("batch_num_images"),
                             options.get("vision_aspect_ratio"))
        geometry = OnevisionImages(select, tuple(images))
        if options.get("batch_num_images") is not None:
            self._check_batch_num_images(model, input_ids, geometry, options["batch_num_images"])
        self._check_crops(pixel_values, images)
        return make_plan(pixel_values, options, geometry)

    def _plans(self, cfg: HookedVLMConfig, image_sizes: Any, batch_num_images: Any, vision_aspect_ratio: str | None
               ) -> list[ImagePlan]:
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes ([n_images, 2]: each original image's (height, width), "
                             "as the processor returns it) together with pixel_values")
        sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
        opts = cfg.family_options
        if vision_aspect_ratio is not None and vision_aspect_ratio != opts["vision_aspect_ratio"]:
            raise ValueError(
                f"vision_aspect_ratio={vision_aspect_ratio!r} differs from the config's {opts['vision_aspect_ratio']!r}: "
                "HF's forward accepts this keyword but ignores it (it always uses config.vision_aspect_ratio), so "
                "honouring it would break parity. Set model.cfg.family_options['vision_aspect_ratio'] (and the "
                "processor's vision_aspect_ratio) instead."
            )
        if batch_num_images is None:
            multi = [True] * len(sizes)  # HF: every image gets the anyres treatment
        else:
            counts = [int(n) for n in torch.as_tensor(batch_num_images).flatten().tolist()]
            if sum(counts) != len(sizes):
                raise ValueError(f"batch_num_images {counts} adds up to {sum(counts)} images but image_sizes describes "
                                 f"{len(sizes)} images")
            multi = [n == 1 for n in counts for _ in range(n)]
        v = cfg.vision
        g = v.image_size // v.patch_size
        return [plan_image(s, opts["image_grid_pinpoints"], v.image_size, g, opts["vision_aspect_ratio"], m)
                for s, m in zip(sizes, multi)]

    @staticmethod
    def _check_crops(pixel_values: Tensor, plans: Sequence[ImagePlan]) -> None:
        """pixel_values: the processor's padded [n_images, max_crops, C, H, W] or concatenated 4-D crops."""
        want = [p.crops for p in plans]
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(plans):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes describes {len(plans)}")
            if max(want) > pixel_values.shape[1]:
                raise ValueError(f"the image sizes need up to {max(want)} crops per image but pixel_values has "
                                 f"{pixel_values.shape[1]} (do image_grid_pinpoints match the processor's?)")
        elif pixel_values.ndim == 4:
            if pixel_values.shape[0] != sum(want):
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} crops but the image sizes need {sum(want)} "
                                 f"({want} per image)")
        else:
            raise ValueError(f"pixel_values: expected 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")

    @staticmethod
    def _crops(pixel_values: Tensor, plans: Sequence[ImagePlan]) -> Tensor:
        """[n_crops, C, H, W]: each image's crops (HF's slicing of the padded 5-D input; checked by the plan)."""
        if pixel_values.ndim == 5:
            return torch.cat([pv[: p.crops] for pv, p in zip(pixel_values, plans)], dim=0)
        return pixel_values

    def image_features(self, model: nn.Module, plan: ImageInputs) -> Tensor:
        images: OnevisionImages = plan.geometry
        feats = model.vision(self._crops(plan.pixel_values, images.plans), list(images.select.layers))
        if images.select.strategy == "default":
            feats = feats[:, 1:]
        return model.projector(feats, list(images.plans))

    def _check_batch_num_images(self, model: nn.Module, input_ids: Tensor, images: "OnevisionImages",
                                batch_num_images: Any) -> None:
        """batch_num_images must give one count per prompt, and each prompt's images must account for exactly
        that prompt's image tokens (HF would only fail later with an anonymous count mismatch)."""
        counts = [int(n) for n in torch.as_tensor(batch_num_images).flatten().tolist()]
        if len(counts) != input_ids.shape[0]:
            raise ValueError(f"batch_num_images has {len(counts)} entries {counts}, expected one per prompt "
                             f"({input_ids.shape[0]} prompts)")
        per_image = [len(c.row) for c in self._coords(model.cfg, images)]
        have = (input_ids == model.cfg.image_token_id).sum(1).tolist()
        if sum(per_image) != sum(have):
            raise ValueError(f"the text has {sum(have)} image tokens but the images give {sum(per_image)} feature vectors; "
                             f"batch_num_images {counts} decides which images get a single crop, so check it as well "
                             "as the processor's image-token expansion")
        start = 0
        for b, n in enumerate(counts):
            want = sum(per_image[start : start + n])
            if want != have[b]:
                raise ValueError(f"batch_num_images {counts} gives prompt {b} {n} image(s) = {want} image tokens, but the "
                                 f"prompt has {have[b]} image tokens")
            start += n

    def image_coords(self, model: nn.Module, plan: ImageInputs) -> list[ImageCoords]:
        return self._coords(model.cfg, plan.geometry)

    def _coords(self, cfg: HookedVLMConfig, images: "OnevisionImages") -> list[ImageCoords]:
        v = cfg.vision
        g = v.image_size // v.patch_size
        # the tower's tokens of one crop: [CLS] (CLIP) + the g x g grid; "default" drops the first one
        rows, cols = torch.arange(g).repeat_interleave(g), torch.arange(g).repeat(g)
        if v.class_token:
            rows, cols = torch.cat([torch.tensor([-1]), rows]), torch.cat([torch.tensor([-1]), cols])
        if images.select.strategy == "default":
            rows, cols = rows[1:], cols[1:]
        out = []
        for plan in images.plans:
            crop, row, col = [torch.zeros_like(rows)], [rows], [cols]
            grids = {0: (g, g)}
            if plan.crops == 1:  # single crop: one newline closes the base grid's last row
                crop.append(torch.zeros(1, dtype=torch.long))
                row.append(torch.tensor([g - 1]))
                col.append(torch.tensor([-1]))
            else:
                if len(rows) != g * g:
                    raise ValueError(f"anyres packing needs {g * g} features per crop, the selection gives {len(rows)}")
                h, w = plan.out
                grids[1] = (h, w)
                crop.append(torch.ones(h * (w + 1), dtype=torch.long))
                row.append(torch.arange(h).repeat_interleave(w + 1))
                col.append(torch.cat([torch.arange(w), torch.tensor([-1])]).repeat(h))
            crop, row, col = torch.cat(crop), torch.cat(row), torch.cat(col)
            out.append(ImageCoords(crop=crop, row=row, col=col, t=torch.zeros_like(crop), grids=grids))
        return out

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        km = KeyMapper(hf_sd, self.ignored_keys)
        map_vit(km, cfg.vision, "model.vision_tower")
        km.linear("projector.mlp.fc_in", "model.multi_modal_projector.linear_1")
        km.linear("projector.mlp.fc_out", "model.multi_modal_projector.linear_2")
        km.map("projector.image_newline", "model.image_newline")
        map_decoder(km, cfg, "model.language_model", "lm_head.weight")
        return km.finish()


register(LlavaOnevision())
