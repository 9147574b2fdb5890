"""CLIP / SigLIP vision tower (LLaVA-1.5, LLaVA-OneVision): conv patches + learned absolute positions,
optional class token (CLIP) and pre-norm (CLIP's `pre_layrnorm`), then bidirectional pre-norm blocks.

Hook names (under `vision.`): hook_patch_embed [n_img, n_patch, d] (conv output), hook_embed [n_img, pos, d]
(after class token and positions, = HF hidden_states[0] after pre-norm), blocks.{i}.* as in the decoder.
Only the blocks up to the deepest feature layer run: later blocks cannot influence the VLM's output.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..components import MLP, NORMS, Attention, GatedMLP, TransformerBlock
from ..config import VisionCfg


def vision_block(cfg: VisionCfg, rotary: bool = False, rotary_in_float32: bool = False) -> TransformerBlock:
    """A bidirectional pre-norm block sized by `cfg`; shared by every vision tower."""
    norm = NORMS[cfg.normalization_type]
    mlp = (
        GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=True) if cfg.gated_mlp else MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
    )
    attn = Attention(
        cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_head, qkv_bias=True, o_bias=True, causal=False,
        rotary=rotary, rotary_in_float32=rotary_in_float32,
    )
    return TransformerBlock(norm(cfg.d_model, cfg.eps), attn, norm(cfg.d_model, cfg.eps), mlp)


def hidden_state_index(layer: int, n_layers: int) -> int:
    """HF `hidden_states` index (0 = embeddings, i = output of block i-1) as a non-negative int."""
    idx = layer if layer >= 0 else n_layers + 1 + layer
    if not 0 <= idx <= n_layers:
        raise ValueError(f"vision feature layer {layer} is outside the tower's hidden states 0..{n_layers}")
    return idx


class ViTTower(nn.Module):
    def __init__(self, cfg: VisionCfg):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.n_channels, cfg.d_model, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.class_embed = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(n_patches + int(cfg.class_token), cfg.d_model))
        self.ln_pre = NORMS[cfg.normalization_type](cfg.d_model, cfg.eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(vision_block(cfg) for _ in range(cfg.n_layers))
        self.ln_post = NORMS[cfg.normalization_type](cfg.d_model, cfg.eps) if cfg.post_norm else None
        self.hook_patch_embed = HookPoint()
        self.hook_embed = HookPoint()

    def forward(
        self, pixel_values: Float[Tensor, "n_img channel height width"], feature_layers: list[int]
    ) -> Float[Tensor, "n_img pos d_feature"]:
        """The hidden states at `feature_layers` (HF indexing, negatives allowed), concatenated on the last axis;
        with `cfg.post_norm`, the last block's output after the final norm (HF's `last_hidden_state`)."""
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.n_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values: expected [n_images, {cfg.n_channels}, {cfg.image_size}, {cfg.image_size}], "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.hook_patch_embed(x)
        if self.class_embed is not None:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.hook_embed(x)
        wanted = sorted({hidden_state_index(l, cfg.n_layers) for l in feature_layers})
        states = {0: x}
        for i, block in enumerate(self.blocks[: wanted[-1]]):
            x = block(x)
            states[i + 1] = x
        if self.ln_post is not None:
            if [hidden_state_index(l, cfg.n_layers) for l in feature_layers] != [cfg.n_layers]:
                raise ValueError(f"a tower with a final norm outputs its last layer only; asked for layers {feature_layers}")
            return self.ln_post(x)
        return torch.cat([states[hidden_state_index(l, cfg.n_layers)] for l in feature_layers], dim=-1)
