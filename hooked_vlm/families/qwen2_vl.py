"""Qwen2-VL (`qwen2_vl`): native-resolution ViT (3-D patches, 2-D rotary, attention within each image) -> patch
merger (2x2 patches -> one token) -> Qwen2 decoder with 3-D multimodal rotary positions (M-RoPE).

Inputs are what the HF processor returns: `input_ids`, `attention_mask`, `pixel_values` [n_patches, C*T*P*P],
`image_grid_thw` [n_images, 3] (in patches) and `mm_token_type_ids` [batch, pos] (0 text, 1 image, 2 video).
Each image becomes `<|vision_start|> <|image_pad|> x (t * h/2 * w/2) <|vision_end|>` in the text.

M-RoPE position ids (shape [3, batch, pos]: temporal, height, width) follow HF's `get_rope_index`, recomputed on
every call (no `rope_deltas` state). Text tokens advance all three axes together by 1; the tokens of an image
all start at the current position p and get (p + t, p + row, p + col) in the MERGED grid; the text after the
image continues at p + max(h, w) / merge_size. Worked example: 2 text tokens, one image with
image_grid_thw = [1, 4, 6] (a 2 x 3 merged grid, 6 image tokens), 3 text tokens:

    tokens:    A   <vs>  <img> <img> <img> <img> <img> <img>  <ve>  B   C
    type:      0    0     1     1     1     1     1     1      0    0   0
    temporal:  0    1     2     2     2     2     2     2      5    6   7
    height:    0    1     2     2     2     3     3     3      5    6   7
    width:     0    1     2     3     4     2     3     4      5    6   7

(<vs> / <ve> are <|vision_start|> / <|vision_end|>: ordinary text tokens for the positions; the image starts at
p = 2 and the text after it at 2 + max(4, 6) / 2 = 5.) With left padding the pads are skipped and get position
0 on all three axes, the real tokens numbered as above. Without images (no `image_grid_thw`) the positions are
HF's plain 0..S-1 on all three axes, counting pads. TokenLayout gives each image token (t, row, col) in the
merged grid (here row 0 cols 0-2, then row 1), crop 0 and grids {0: (2, 3)}; end_of_image() is <|vision_end|>.

Video inputs (pixel_values_videos, video_grid_thw, video tokens) are rejected with a ValueError.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from ..config import HookedVLMConfig, VisionCfg
from ..vision.qwen_vit import PatchMerger, QwenViTTower, plan_grid
from . import register
from .backbones import DECODER_IGNORED, DECODER_IMPLEMENTED
from .base import (Accept, Family, FieldRules, ImageCoords, ImageInputs, KeyMapper, decoder_fields, make_plan, map_decoder,
                   rope_parameters_ok)

VIDEO_KWARGS = ("pixel_values_videos", "video_grid_thw")


def mrope_position_ids(
    input_ids: Tensor, mm_token_type_ids: Tensor, image_grid_thw: Tensor, attention_mask: Tensor | None, merge: int
) -> Tensor:
    """HF `get_rope_index` for images: [3, batch, pos] (see the module docstring)."""
    b, s = input_ids.shape
    out = torch.zeros(3, b, s, dtype=torch.long)
    types_all = mm_token_type_ids.cpu()
    keep_all = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    grids = [tuple(g) for g in image_grid_thw.cpu().tolist()]
    used = 0
    for bi in range(b):
        keep = keep_all[bi]
        chunks, cur = [], 0
        for kind, group in itertools.groupby(types_all[bi][keep].tolist()):
            n = len(list(group))
            if kind == 0:
                chunks.append(torch.arange(n).expand(3, n) + cur)
                cur += n
                continue
            if kind != 1:
                raise ValueError(f"mm_token_type_ids has modality {kind} (2 = video): only images are supported")
            if used >= len(grids):
                raise ValueError(f"the prompts have more image-token runs than the {len(grids)} rows of image_grid_thw")
            t, h, w = grids[used]
            gh, gw = h // merge, w // merge
            if n != t * gh * gw:
                raise ValueError(
                    f"prompt {bi}: an image-token run has {n} tokens but its image_grid_thw row {used} {[t, h, w]} "
                    f"gives {t * gh * gw} tokens ({t} x {gh} x {gw} after {merge}x{merge} merging)"
                )
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w) // merge
            used += 1
        if chunks:
            out[:, bi, keep] = torch.cat(chunks, dim=1)
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {used} images' tokens")
    return out.to(input_ids.device)


QWEN_VL_TOP = dict(
    implemented=("image_token_id", "text_config", "vision_config", "tie_word_embeddings", "vision_start_token_id",
                 "vision_end_token_id"),
    ignored={"video_token_id": "videos are refused at the input (pixel_values_videos, video tokens)"},
)
QWEN_VL_TEXT = dict(
    implemented=DECODER_IMPLEMENTED,
    ignored={**DECODER_IGNORED,
             "use_sliding_window": "read by HF only through layer_types (refused unless all full_attention)",
             "sliding_window": "read by HF only through layer_types (refused unless all full_attention)",
             "max_window_layers": "read by HF only through layer_types (refused unless all full_attention)"},
    refused={"layer_types": Accept("every layer 'full_attention' (sliding windows are not implemented for M-RoPE "
                                   "decoders)", lambda v: all(t == "full_attention" for t in v or [])),
             "rope_parameters": rope_parameters_ok(("default",))},  # M-RoPE; its mrope_section is implemented
)
QWEN_VIT_IMPLEMENTED = ("depth", "hidden_act", "hidden_size", "in_channels", "num_heads", "patch_size",
                        "spatial_merge_size", "temporal_patch_size")
QWEN_VIT_REFUSED = {"rope_parameters": rope_parameters_ok(("default", "axial"))}  # 2-D rope: rope_theta only
QWEN2_VL_FIELDS = (
    FieldRules("Qwen2VLConfig", **QWEN_VL_TOP),
    FieldRules("Qwen2VLTextConfig", **QWEN_VL_TEXT),
    FieldRules("Qwen2VLVisionConfig", implemented=QWEN_VIT_IMPLEMENTED + ("embed_dim", "mlp_ratio"),
               ignored={"initializer_range": "initialisation only"}, refused=QWEN_VIT_REFUSED),
)


class Qwen2VL(Family):
    has_end_of_image_token = True
    model_type = "qwen2_vl"
    config_fields = QWEN2_VL_FIELDS
    image_kwargs = ("pixel_values", "image_grid_thw", "mm_token_type_ids") + VIDEO_KWARGS

    # ---------------------------------------------------------------------------------------------- config
    def vision_cfg(self, vc: Any) -> VisionCfg:
        return VisionCfg(
            d_model=vc.embed_dim, n_layers=vc.depth, n_heads=vc.num_heads, d_mlp=int(vc.embed_dim * vc.mlp_ratio),
            act_fn=vc.hidden_act, patch_size=vc.patch_size, n_channels=vc.in_channels, normalization_type="LN",
            eps=1e-6, temporal_patch_size=vc.temporal_patch_size, spatial_merge_size=vc.spatial_merge_size,
            rope_theta=(getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0),
        )

    def merger_width(self, vc: Any) -> int:
        return vc.hidden_size

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        tc = hf_config.text_config
        sliding = [i for i, kind in enumerate(getattr(tc, "layer_types", None) or []) if kind != "full_attention"]
        if sliding:
            raise ValueError(f"{self.model_type}: sliding-window decoder layers {sliding} are not supported")
        fields = decoder_fields(tc)
        fields.update(d_head=tc.hidden_size // tc.num_attention_heads,  # as HF's Qwen2-VL attention
                      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
        rope = getattr(tc, "rope_parameters", None) or {}
        vision = self.vision_cfg(hf_config.vision_config)
        if self.merger_width(hf_config.vision_config) != tc.hidden_size:
            raise ValueError(f"the patch merger outputs width {self.merger_width(hf_config.vision_config)}, "
                             f"the decoder's is {tc.hidden_size}")
        return HookedVLMConfig(
            **fields, mrope_section=list(rope.get("mrope_section", [16, 24, 24])), qkv_bias=True, o_bias=False,
            family=self.model_type, image_token_id=hf_config.image_token_id, vision=vision,
            family_options=dict(video_token_id=getattr(hf_config, "video_token_id", None),
                                vision_start_token_id=getattr(hf_config, "vision_start_token_id", None),
                                vision_end_token_id=getattr(hf_config, "vision_end_token_id", None)),
        )

    def build_vision(self, cfg: HookedVLMConfig) -> nn.Module:
        return QwenViTTower(cfg.vision)

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        return PatchMerger(cfg.vision, cfg.d_model)

    # ---------------------------------------------------------------------------------------------- inputs
    def _check(self, image_inputs: dict[str, Any]) -> None:
        videos = [k for k in VIDEO_KWARGS + ("second_per_grid_ts",) if image_inputs.get(k) is not None]
        if videos:
            raise ValueError(f"{self.model_type}: video inputs ({', '.join(videos)}) are not supported; pass images only")
        if image_inputs.get("pixel_values") is not None and image_inputs.get("image_grid_thw") is None:
            raise ValueError(f"{self.model_type}: pixel_values were given without image_grid_thw (the processor returns "
                             "both; image_grid_thw [n_images, 3] gives each image's temporal/height/width in patches)")

    def plan(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
             **options: Any) -> ImageInputs:
        """The input check (no videos; pixel_values with image_grid_thw, which must describe them) and the tower's
        grid (attention segments, Qwen2.5-VL's window partition), once per call."""
        self._check(dict(options, pixel_values=pixel_values))
        grid = None if pixel_values is None else plan_grid(pixel_values, options["image_grid_thw"], model.cfg.vision)
        return make_plan(pixel_values, options, grid)

    def image_features(self, model: nn.Module, plan: ImageInputs) -> Tensor:
        hidden = model.vision(plan.pixel_values, plan.geometry)
        return model.projector(hidden, plan.geometry.window_index)

    def position_ids(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                     plan: ImageInputs) -> Tensor:
        b, s = input_ids.shape
        image_grid_thw, mm_token_type_ids = plan.get("image_grid_thw"), plan.get("mm_token_type_ids")
        if image_grid_thw is None:  # HF: plain 0..S-1 on all three axes (pads counted)
            return torch.arange(s, device=input_ids.device).expand(3, b, s)
        if mm_token_type_ids is None:
            raise ValueError(
                f"{self.model_type}: image_grid_thw was given without mm_token_type_ids, which M-RoPE positions need "
                "(the processor returns it; by hand: (input_ids == image_token_id).int())"
            )
        if tuple(mm_token_type_ids.shape) != (b, s):
            raise ValueError(f"mm_token_type_ids: expected shape {(b, s)}, got {tuple(mm_token_type_ids.shape)}")
        is_image = (input_ids == model.cfg.image_token_id).cpu()
        marked = mm_token_type_ids.cpu() == 1
        if not torch.equal(marked, is_image):
            raise ValueError(
                f"mm_token_type_ids and input_ids disagree on the image tokens: mm_token_type_ids marks {int(marked.sum())} "
                f"tokens as image (1), input_ids has {int(is_image.sum())} image tokens (id {model.cfg.image_token_id})"
                f"{', at different positions' if int(marked.sum()) == int(is_image.sum()) else ''}"
            )
        return mrope_position_ids(input_ids, mm_token_type_ids, image_grid_thw, attention_mask,
                                  model.cfg.vision.spatial_merge_size)

    def image_coords(self, model: nn.Module, plan: ImageInputs) -> list[ImageCoords]:
        merge = model.cfg.vision.spatial_merge_size
        coords = []
        for t, h, w in plan.geometry.grid_thw.tolist():
            gh, gw = h // merge, w // merge
            grid = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            tt, rr, cc = (a.flatten() for a in grid)
            coords.append(ImageCoords(crop=torch.zeros_like(tt), row=rr, col=cc, t=tt, grids={0: (gh, gw)}))
        return coords

    def end_of_image_offset(self) -> int:
        return 1  # <|vision_end|>

    # ----------------------------------------------------------------------------------------------- weights
    def map_vision_mlp(self, km: KeyMapper, ours: str, hf: str) -> None:
        km.linear(f"{ours}.fc_in", f"{hf}.fc1")
        km.linear(f"{ours}.fc_out", f"{hf}.fc2")

    def map_vision_blocks(self, km: KeyMapper, n_layers: int, visual: str) -> None:
        """The Qwen ViT blocks (fused qkv split into q / k / v; the MLP by `map_vision_mlp`), shared by the Qwen
        families."""
        for i in range(n_layers):
            p, o = f"{visual}.blocks.{i}", f"vision.blocks.{i}"
            for kind in ("weight", "bias"):
                q, k, val = km.take(f"{p}.attn.qkv.{kind}").chunk(3, dim=0)
                km.put(f"{o}.attn.q_proj.{kind}", q)
                km.put(f"{o}.attn.k_proj.{kind}", k)
                km.put(f"{o}.attn.v_proj.{kind}", val)
            km.linear(f"{o}.attn.o_proj", f"{p}.attn.proj")
            km.norm(f"{o}.ln1", f"{p}.norm1")
            km.norm(f"{o}.ln2", f"{p}.norm2")
            self.map_vision_mlp(km, f"{o}.mlp", f"{p}.mlp")

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        km = KeyMapper(hf_sd, self.ignored_keys)
        v = cfg.vision
        km.put("vision.patch_embed.weight", km.take("model.visual.patch_embed.proj.weight").reshape(v.d_model, -1))
        self.map_vision_blocks(km, v.n_layers, "model.visual")
        km.norm("projector.ln_q", "model.visual.merger.ln_q")
        km.linear("projector.fc_in", "model.visual.merger.mlp.0")
        km.linear("projector.fc_out", "model.visual.merger.mlp.2")
        map_decoder(km, cfg, "model.language_model", "lm_head.weight")
        return km.finish()


register(Qwen2VL())
