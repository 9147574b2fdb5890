"""LLaVA-1.5 (`llava`): CLIP (or SigLIP) tower -> feature layer(s) and "default"/"full" selection -> 2-layer MLP
projector -> one feature per image token, Llama (or Qwen2) decoder with 1-D RoPE."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import HookedVLMConfig, VisionCfg
from ..projector import MLPProjector
from ..vision import ViTTower
from . import register
from .backbones import CLIP_VISION, SIGLIP_VISION, TEXT_DECODERS
from .base import (Family, FieldRules, ImageCoords, ImageInputs, KeyMapper, decoder_fields, make_plan, map_decoder,
                   map_vit_blocks)

TOWER_KINDS = {"clip_vision_model": dict(class_token=True, pre_norm=True, patch_bias=False),
               "siglip_vision_model": dict(class_token=False, pre_norm=False, patch_bias=True)}


def vit_cfg(vc: Any) -> VisionCfg:
    if vc.model_type not in TOWER_KINDS:
        raise ValueError(f"unsupported vision tower {vc.model_type!r}; supported: {sorted(TOWER_KINDS)}")
    return VisionCfg(
        d_model=vc.hidden_size, n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads, d_mlp=vc.intermediate_size,
        act_fn=vc.hidden_act, patch_size=vc.patch_size, image_size=vc.image_size, n_channels=vc.num_channels,
        eps=vc.layer_norm_eps, **TOWER_KINDS[vc.model_type],
    )


def map_vit(km: KeyMapper, vcfg: VisionCfg, prefix: str) -> None:
    km.map("vision.patch_embed.weight", f"{prefix}.embeddings.patch_embedding.weight")
    if vcfg.patch_bias:
        km.map("vision.patch_embed.bias", f"{prefix}.embeddings.patch_embedding.bias")
    if vcfg.class_token:
        km.map("vision.class_embed", f"{prefix}.embeddings.class_embedding")
    km.map("vision.pos_embed", f"{prefix}.embeddings.position_embedding.weight")
    if vcfg.pre_norm:
        km.norm("vision.ln_pre", f"{prefix}.pre_layrnorm")
    map_vit_blocks(km, vcfg.n_layers, f"{prefix}.encoder")


@dataclass(frozen=True)
class Selection:
    """Which tower outputs a call reads: the feature layers and the selection strategy ("default" / "full")."""

    layers: tuple[int, ...]
    strategy: str


def feature_layers(cfg: HookedVLMConfig, override: int | list[int] | None) -> list[int]:
    layer = cfg.vision_feature_layer if override is None else override
    return [layer] if isinstance(layer, int) else list(layer)


LLAVA_IMPLEMENTED = ("image_token_index", "multimodal_projector_bias", "projector_hidden_act", "text_config",
                     "vision_config", "vision_feature_layer", "vision_feature_select_strategy", "tie_word_embeddings")
LLAVA = FieldRules("LlavaConfig", implemented=LLAVA_IMPLEMENTED,
                   ignored={"image_seq_length": "the processor's count of image tokens; the model places one feature "
                                                "per image token it finds"})


class Llava(Family):
    model_type = "llava"
    config_fields = (LLAVA, *TEXT_DECODERS, CLIP_VISION, SIGLIP_VISION)
    image_kwargs = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
    ignored_keys = (
        ("model.vision_tower.post_layernorm", "the VLM reads hidden states before the tower's final norm"),
        ("model.vision_tower.head", "SigLIP pooling head: not used by the VLM"),
    )

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        return HookedVLMConfig(
            **decoder_fields(hf_config.text_config), qkv_bias=hf_config.text_config.model_type == "qwen2"
            or bool(getattr(hf_config.text_config, "attention_bias", False)),
            o_bias=bool(getattr(hf_config.text_config, "attention_bias", False)),
            family=self.model_type, image_token_id=hf_config.image_token_id, vision=vit_cfg(hf_config.vision_config),
            projector_act=hf_config.projector_hidden_act, projector_bias=hf_config.multimodal_projector_bias,
            vision_feature_layer=hf_config.vision_feature_layer,
            vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        )

    def build_vision(self, cfg: HookedVLMConfig) -> nn.Module:
        return ViTTower(cfg.vision)

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        n_feat = len(feature_layers(cfg, None))
        return MLPProjector(cfg.vision.d_model * n_feat, cfg.d_model, cfg.projector_act, cfg.projector_bias, flat=True)

    def _strategy(self, cfg: HookedVLMConfig, override: str | None) -> str:
        strategy = override or cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        return strategy

    def plan(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
             **options: Any) -> ImageInputs:
        """The feature layers and the selection ("default" drops CLS), resolved once per call."""
        select = Selection(tuple(feature_layers(model.cfg, options.get("vision_feature_layer"))),
                           self._strategy(model.cfg, options.get("vision_feature_select_strategy")))
        return make_plan(pixel_values, options, select)

    def image_features(self, model: nn.Module, plan: ImageInputs) -> Tensor:
        feats = model.vision(plan.pixel_values, list(plan.geometry.layers))
        if plan.geometry.strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return model.projector(feats)

    def image_coords(self, model: nn.Module, plan: ImageInputs) -> list[ImageCoords]:
        v = model.cfg.vision
        side = v.image_size // v.patch_size
        rows = torch.arange(side).repeat_interleave(side)
        cols = torch.arange(side).repeat(side)
        if v.class_token and plan.geometry.strategy == "full":
            rows, cols = torch.cat([torch.tensor([-1]), rows]), torch.cat([torch.tensor([-1]), cols])
        n = len(rows)
        one = ImageCoords(crop=torch.zeros(n, dtype=torch.long), row=rows, col=cols, t=torch.zeros(n, dtype=torch.long),
                          grids={0: (side, side)})
        return [one] * plan.pixel_values.shape[0]

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        km = KeyMapper(hf_sd, self.ignored_keys)
        map_vit(km, cfg.vision, "model.vision_tower")
        km.linear("projector.fc_in", "model.multi_modal_projector.linear_1")
        km.linear("projector.fc_out", "model.multi_modal_projector.linear_2")
        map_decoder(km, cfg, "model.language_model", "lm_head.weight")
        return km.finish()


register(Llava())
