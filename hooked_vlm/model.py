"""HookedVLM: vision tower -> projector -> merge into the token sequence -> decoder -> logits, all our own
modules with HookPoints; transformer_lens's HookedRootModule supplies run_with_hooks / run_with_cache / hooks().

    pixels --vision.*--> projector.hook_out --merge--> hook_embed --blocks.{l}.*--> ln_final --> logits
    input_ids --hook_token_embed--^
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import cache_guard
from .cache import HookedVLMCache
from .components import NORMS, Attention, GatedMLP, RotaryEmbedding, TransformerBlock
from .components.unembed import Unembed
from .components.rotary import Rotary
from .config import HookedVLMConfig
from .families import get_family
from .generation import GenerationMixin
from .merge import merge_image_features
from .positions import TokenLayout, build_layout
from .tl_api import TransformerLensAPI

TEXT_KWARGS = ("input_ids", "attention_mask", "position_ids")


class HookedVLM(GenerationMixin, TransformerLensAPI, HookedRootModule):
    """A vision-language model with TransformerLens hooks. Construction and the forward live here; the rest of
    TransformerLens's model API (to_tokens / to_str_tokens, weight views, loss, run_with_cache options, hook-name
    checks) in `hooked_vlm.tl_api.TransformerLensAPI`, generation in `hooked_vlm.generation.GenerationMixin`."""

    def __init__(self, cfg: HookedVLMConfig, processor: Any = None):
        super().__init__()
        self.cfg = cfg
        self.family = get_family(cfg.family)
        self.family.check_processor(processor)
        self.processor = processor
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_token_embed = HookPoint()  # token embeddings before image features are placed [batch, pos, d_model]
        self.vision = self.family.build_vision(cfg)
        self.projector = self.family.build_projector(cfg)
        self.hook_embed = HookPoint()  # the residual stream's input: tokens + image features [batch, pos, d_model]
        self.rotary = RotaryEmbedding(cfg.d_head, cfg.rope_theta, cfg.mrope_section, scaling=cfg.rope_scaling,
                                      interleaved=cfg.mrope_interleaved)
        self.rotary_local = (RotaryEmbedding(cfg.d_head, cfg.local_rope_theta, cfg.mrope_section)  # sliding layers' own
                             if cfg.local_rope_theta is not None else None)  # base (Gemma 3); None: one rotary
        self.blocks = nn.ModuleList(self._block(l) for l in range(cfg.n_layers))
        self.ln_final = self._norm(cfg.d_model)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self._accepted = frozenset(TEXT_KWARGS + self.family.image_kwargs)
        self._bound: dict[str, Any] = {}
        self._bound_ids: Tensor | None = None
        self.setup()

    def _norm(self, d: int) -> nn.Module:
        c = self.cfg
        return NORMS[c.normalization_type](d, c.eps, **({"offset": c.norm_offset} if c.norm_offset else {}))

    def _block(self, l: int) -> TransformerBlock:
        """Decoder block `l`, shaped by the config alone (no family names here)."""
        c = self.cfg
        window = c.layer_windows[l] if c.layer_windows else None
        attn = Attention(
            c.d_model, c.n_heads, c.n_key_value_heads, c.d_head, c.qkv_bias, c.o_bias, causal=True, rotary=True,
            window=window, scale=c.attn_scale, q_norm=self._norm(c.d_head) if c.qk_norm else None,
            k_norm=self._norm(c.d_head) if c.qk_norm else None,
            rotary_key="rotary_local" if self.rotary_local is not None and window is not None else "rotary")
        post = (self._norm(c.d_model), self._norm(c.d_model)) if c.post_norms else (None, None)
        return TransformerBlock(self._norm(c.d_model), attn, self._norm(c.d_model),
                                GatedMLP(c.d_model, c.d_mlp, c.act_fn, c.mlp_bias), *post,
                                deepstack=l in c.deepstack_layers)

    def layer_rotary(self, layer: int) -> RotaryEmbedding:
        """The rotary embedding decoder layer `layer` rotates its queries and keys with."""
        return getattr(self, self.blocks[layer].attn.rotary_key)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        *,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        **image_inputs: Any,
    ) -> Any:
        """Logits [batch, pos, d_vocab] by default. `logits_to_keep` (as in HF): 0 = every position; k > 0 = the
        last k positions only; a 1-D index tensor = those positions (ln_final and the unembedding run on those only).

        TransformerLens's options (hooked_vlm/tl_api.py):
        return_type:    "logits", "loss" (next-token cross-entropy over text positions only, see `loss_fn`),
                        "both" (logits, loss) or None (runs up to ln_final, returns None).
        loss_per_token: the loss as [batch, pos - 1] instead of its mean.
        stop_at_layer:  run blocks[:stop_at_layer] only and return that residual stream [batch, pos, d_model]
                        (= blocks.{l}.hook_resid_pre; negative counts from the end; n_layers: last resid_post).
        start_at_layer: `input_ids` is then the residual stream [batch, pos, d_model] entering that block; pass
                        the same attention_mask, and `tokens=` (the token ids, for the loss and for Qwen's M-RoPE
                        positions with image_grid_thw / mm_token_type_ids) or `position_ids=`. The vision tower
                        does not run: image features are already in the residual."""
        if start_at_layer is None:
            x, rotary, mask, inject = self.prepare(input_ids, attention_mask, position_ids, **image_inputs)
            tokens = input_ids
        else:
            deep = [l for l in self.cfg.deepstack_layers if l >= range(len(self.blocks))[start_at_layer]]
            if deep:  # their image-feature additions come from the vision tower, which does not run here
                raise ValueError(f"start_at_layer={start_at_layer}: layers {deep} add DeepStack image features, which "
                                 "start_at_layer cannot recompute; start after the last of them or run the full forward")
            x, rotary, mask, inject = self._resume_inputs(input_ids, tokens, attention_mask, position_ids, **image_inputs)
        layers = self._layer_range(start_at_layer, stop_at_layer)
        for l, block in zip(range(len(self.blocks))[layers], self.blocks[layers]):
            x = block(x, rotary, mask, inject=inject.get(l))
        if stop_at_layer is not None:
            return x
        return self._output(x, tokens, attention_mask, return_type, loss_per_token, logits_to_keep)

    def prepare(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_ids: Tensor | None = None,
        **image_inputs: Any,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Rotary, Tensor | None, dict[int, Tensor]]:
        """Everything before the decoder blocks: the residual stream's input (token embeddings with the image
        features placed, `hook_embed`), the rotary (cos, sin) (or {rotary module name: (cos, sin)} when layers rotate
        with different bases), the additive attention mask (None when nothing is padded and no positions attend
        bidirectionally) and the per-layer additions {layer: [batch, pos, d_model]} that blocks add after their MLP
        (`inject`; Qwen3-VL DeepStack, empty for other families). `forward` = prepare -> blocks(...,
        inject=inject.get(l)) -> ln_final -> unembed; `hooked_vlm.resume` reuses it."""
        if self._bound:  # inputs bound with `bind_inputs`, for tools that pass tokens only
            attention_mask = self._bound.get("attention_mask") if attention_mask is None else attention_mask
            position_ids = self._bound.get("position_ids") if position_ids is None else position_ids
            image_inputs = {**{k: v for k, v in self._bound.items() if k not in TEXT_KWARGS}, **image_inputs}
        self._check_kwargs(input_ids, image_inputs)
        input_ids = input_ids.to(self.embed.weight.device)
        if image_inputs.get("pixel_values") is not None:  # pixels on another device follow input_ids to the model's;
            # another float dtype is cast to the tower's weights by the tower (as HF does)
            image_inputs = dict(image_inputs, pixel_values=image_inputs["pixel_values"].to(input_ids.device))
        image_mask = input_ids == self.cfg.image_token_id
        inject: dict[int, Tensor] = {}
        plan = self.family.plan(self, input_ids, **image_inputs)  # parsed and checked once for this call
        x = self.token_embeddings(input_ids)
        if plan.pixel_values is not None:
            feats = self.family.image_features(self, plan)
            if isinstance(feats, tuple):  # (features, {decoder layer: features added after that layer's MLP})
                feats, extra = feats
                inject = {l: merge_image_features(torch.zeros_like(x), image_mask, f) for l, f in extra.items()}
            x = merge_image_features(x, image_mask, feats)
        elif image_mask.any():
            raise ValueError(f"the text has {int(image_mask.sum())} image tokens but no pixel_values were given")
        x = self.hook_embed(x)
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = self.family.position_ids(self, input_ids, attention_mask, plan)
        rotary = self.rotaries(position_ids.to(input_ids.device), x.dtype)
        groups = self.family.attention_groups(self, input_ids, plan)
        return x, rotary, causal_padding_mask(attention_mask, x.dtype, groups), inject

    def token_embeddings(self, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """`hook_token_embed`: the token embeddings (times `cfg.embed_scale` where the family scales them), before
        image features are placed. `prepare` and generation's decode steps both embed through here."""
        image_mask = input_ids == self.cfg.image_token_id
        # an image token id outside the vocabulary (as HF allows) is looked up as 0; merge overwrites those rows
        x = self.embed(input_ids.masked_fill(image_mask, 0) if self.cfg.image_token_id >= self.cfg.d_vocab else input_ids)
        if self.cfg.embed_scale is not None:  # Gemma: the scale rounded to the model dtype first, as HF does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=torch.float32, device=x.device).to(x.dtype)
        return self.hook_token_embed(x)

    def rotaries(self, position_ids: Tensor, dtype: torch.dtype) -> Rotary:
        """(cos, sin) for these positions, or {rotary module name: (cos, sin)} when some layers rotate with their
        own base (Gemma 3's local layers; each attention picks its own through `Attention.rotary_key`)."""
        rotary = self.rotary(position_ids, dtype)
        if self.rotary_local is not None:
            rotary = {"rotary": rotary, "rotary_local": self.rotary_local(position_ids, dtype)}
        return rotary

    def _check_kwargs(self, input_ids: Tensor | None, image_inputs: dict[str, Any]) -> None:
        unknown = sorted(set(image_inputs) - self._accepted)
        if unknown:
            raise TypeError(
                f"HookedVLM ({self.cfg.family}) got unexpected keyword(s) {unknown}; it takes {sorted(self._accepted)}"
            )
        if input_ids is None:
            raise TypeError("HookedVLM needs input_ids (inputs_embeds is not supported: hook `hook_embed` instead)")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
            got = f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))} {getattr(input_ids, 'dtype', '')}"
            raise ValueError(f"input_ids: expected an integer tensor [batch, pos], got {got}")
        if input_ids.numel() == 0:  # would run and return empty logits: nothing a caller asked for
            raise ValueError(f"input_ids: expected at least one prompt of at least one token, got shape "
                             f"{tuple(input_ids.shape)} (an empty prompt or an empty batch)")
        pv = image_inputs.get("pixel_values")
        if pv is not None and (not isinstance(pv, Tensor) or not pv.is_floating_point()):
            raise ValueError(f"pixel_values: expected a floating-point tensor, got {getattr(pv, 'dtype', type(pv).__name__)}")
        if pv is not None and pv.is_meta and not self.embed.weight.is_meta:
            raise ValueError(f"pixel_values: expected a tensor with data (the model is on {self.embed.weight.device}), "
                             "got a meta tensor")

    # ------------------------------------------------------------------------------------- TL conveniences
    # refuse run_with_cache requests estimated above this many bytes (None: no limit); per call: max_cache_bytes=
    max_cache_bytes: int | None = 8 * 2**30

    def run_with_cache(self, *args: Any, max_cache_bytes: int | None | str = "default", **kwargs: Any
                       ) -> tuple[Any, Any]:
        """TransformerLens's run_with_cache (names_filter, pos_slice, return_cache_object, incl_bwd, ...: see
        `TransformerLensAPI.run_with_cache`), refused before anything runs when the estimated cache is over
        `max_cache_bytes` (default: the instance's `max_cache_bytes`; None: no limit), and with cache entries that a
        later hook's in-place edit cannot rewrite (see hooked_vlm/cache_guard.py)."""
        cache_guard.check_cache_request(self, args, kwargs,
                                        self.max_cache_bytes if max_cache_bytes == "default" else max_cache_bytes)
        return super().run_with_cache(*args, **kwargs)  # TransformerLensAPI.run_with_cache

    def estimate_cache_bytes(self, inputs: Mapping[str, Any], names_filter: Any = None) -> int:
        """Bytes a run_with_cache of `inputs` would hold for the hooks `names_filter` selects (None: all): an upper
        bound from the config and input shapes alone (nothing runs); per hook: `cache_guard.estimate_hook_bytes`."""
        return cache_guard.estimate_cache_bytes(self, inputs, names_filter)

    def layout(self, inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> TokenLayout:
        """Where every image token sits (crop, row, col), text positions, end-of-image, position ids."""
        return build_layout(self, {**(inputs or {}), **kwargs})

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, hf_model: nn.Module, processor: Any = None, copy_weights: bool = True) -> "HookedVLM":
        """Convert an in-memory HF model. The HF model is never modified; with copy_weights=False the two share
        weight storage (no second copy in memory), so editing one model's weights edits the other's. Config values
        we do not implement are refused by name (docs/supported_configurations.md)."""
        from .loading import from_hf

        return from_hf(cls, hf_model, processor, copy_weights)

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
        device_map: Any = None, processor: Any = "auto", strict: bool = True,
    ) -> "HookedVLM":
        """Load with Hugging Face (safetensors only: no pickle) and convert. Strict: missing or mis-shaped tensors
        raise a ValueError naming them; so do tensors the model does not use, unless strict=False (then a warning
        lists them)."""
        from .loading import from_pretrained

        return from_pretrained(cls, name_or_dir, dtype=dtype, device=device, device_map=device_map,
                               processor=processor, strict=strict)

    def extra_repr(self) -> str:
        c, v = self.cfg, self.cfg.vision
        size = "native resolution" if v is None or not v.image_size else f"image_size={v.image_size}"
        vision = "" if v is None else f"vision: {v.n_layers} blocks, d={v.d_model}, patch={v.patch_size}, {size}; "
        return (f"family={c.family!r}, n_layers={c.n_layers}, d_model={c.d_model}, n_heads={c.n_heads} "
                f"(kv {c.n_key_value_heads}), d_vocab={c.d_vocab}, {vision}{len(self.hook_dict)} hooks: "
                "model.hook_names(inputs) lists them with their shapes")

def causal_padding_mask(attention_mask: Tensor | None, dtype: torch.dtype, groups: Tensor | None = None
                        ) -> Tensor | None:
    """None when nothing is padded and nothing attends bidirectionally (attention then uses the causal fast path);
    else an additive [batch, 1, query, key] mask with the dtype's minimum, so fully padded query rows stay finite
    (uniform), as in HF eager attention. `groups` [batch, pos] (-1 = none): positions of one group also see each
    other's later positions (HF's blockwise overlay, OR-ed with causal before padding is applied)."""
    if groups is not None and not bool((groups >= 0).any()):
        groups = None
    if groups is None and (attention_mask is None or bool(attention_mask.all())):
        return None
    ref = groups if attention_mask is None else attention_mask
    b, s = ref.shape
    allowed = torch.ones(s, s, dtype=torch.bool, device=ref.device).tril()[None, None].expand(b, 1, s, s)
    if groups is not None:
        g = groups.to(ref.device)
        allowed = allowed | ((g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0))[:, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
