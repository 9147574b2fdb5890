"""HookedVLM: vision tower -> projector -> merge into the token sequence -> decoder -> logits, all our own
modules with HookPoints; transformer_lens's HookedRootModule supplies run_with_hooks / run_with_cache / hooks().

    pixels --vision.*--> projector.hook_out --merge--> hook_embed --blocks.{l}.*--> ln_final --> logits
    input_ids --hook_token_embed--^
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from .components import NORMS, Attention, GatedMLP, RotaryEmbedding, TransformerBlock
from .components.rotary import Rotary
from .config import HookedVLMConfig
from .families import get_family
from .merge import merge_image_features
from .positions import TokenLayout, build_layout

TEXT_KWARGS = ("input_ids", "attention_mask", "position_ids")


class HookedVLM(HookedRootModule):
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
        self.rotary = RotaryEmbedding(cfg.d_head, cfg.rope_theta, cfg.mrope_section)
        self.rotary_local = (RotaryEmbedding(cfg.d_head, cfg.local_rope_theta, cfg.mrope_section)  # sliding layers' own
                             if cfg.local_rope_theta is not None else None)  # base (Gemma 3); None: one rotary
        self.blocks = nn.ModuleList(self._block(l) for l in range(cfg.n_layers))
        self.ln_final = self._norm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
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
                                GatedMLP(c.d_model, c.d_mlp, c.act_fn, c.mlp_bias), *post)

    def layer_rotary(self, layer: int) -> RotaryEmbedding:
        """The rotary embedding decoder layer `layer` rotates its queries and keys with."""
        return getattr(self, self.blocks[layer].attn.rotary_key)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        **image_inputs: Any,
    ) -> Float[Tensor, "batch kept_pos d_vocab"]:
        """Logits [batch, pos, d_vocab]. `logits_to_keep` (as in HF): 0 = every position; k > 0 = the last k
        positions only; a 1-D index tensor = those positions. `ln_final` and the unembedding then run on those
        positions only (full-vocabulary logits at every position are the largest tensor of a long forward)."""
        x, rotary, mask = self.prepare(input_ids, attention_mask, position_ids, **image_inputs)
        for block in self.blocks:
            x = block(x, rotary, mask)
        if isinstance(logits_to_keep, Tensor):
            if logits_to_keep.ndim != 1 or logits_to_keep.is_floating_point():
                raise ValueError(f"logits_to_keep: expected an int or a 1-D integer index tensor, got "
                                 f"{logits_to_keep.dtype} {tuple(logits_to_keep.shape)}")
            x = x[:, logits_to_keep.to(x.device)]
        elif logits_to_keep:
            if not 0 < int(logits_to_keep) <= x.shape[1]:
                raise ValueError(f"logits_to_keep: expected 0 (all) or 1..{x.shape[1]}, got {logits_to_keep}")
            x = x[:, -int(logits_to_keep):]
        return self.unembed(self.ln_final(x.to(self.unembed.weight.device)))

    def prepare(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_ids: Tensor | None = None,
        **image_inputs: Any,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Rotary, Tensor | None]:
        """Everything before the decoder blocks: the residual stream's input (token embeddings with the image
        features placed, `hook_embed`), the rotary (cos, sin) (or {rotary module name: (cos, sin)} when layers rotate
        with different bases) and the additive attention mask (None when nothing is padded and no positions attend
        bidirectionally). `forward` = prepare -> blocks -> ln_final -> unembed; `hooked_vlm.resume` reuses it."""
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
        # an image token id outside the vocabulary (as HF allows) is looked up as 0; merge overwrites those rows
        x = self.embed(input_ids.masked_fill(image_mask, 0) if self.cfg.image_token_id >= self.cfg.d_vocab else input_ids)
        if self.cfg.embed_scale is not None:  # Gemma: the scale rounded to the model dtype first, as HF does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=torch.float32, device=x.device).to(x.dtype)
        x = self.hook_token_embed(x)
        if image_inputs.get("pixel_values") is not None:
            feats = self.family.image_features(self, input_ids, **image_inputs)
            x = merge_image_features(x, image_mask, feats)
        elif image_mask.any():
            raise ValueError(f"the text has {int(image_mask.sum())} image tokens but no pixel_values were given")
        x = self.hook_embed(x)
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = self.family.position_ids(self, input_ids, attention_mask, **image_inputs)
        position_ids = position_ids.to(input_ids.device)
        rotary = self.rotary(position_ids, x.dtype)
        if self.rotary_local is not None:  # each attention takes its own (Attention.rotary_key)
            rotary = {"rotary": rotary, "rotary_local": self.rotary_local(position_ids, x.dtype)}
        groups = self.family.attention_groups(self, input_ids, **image_inputs)
        return x, rotary, causal_padding_mask(attention_mask, x.dtype, groups)

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
                       ) -> tuple[Tensor, ActivationCache]:
        limit = self.max_cache_bytes if max_cache_bytes == "default" else max_cache_bytes
        if limit is not None:
            inputs = dict(kwargs, input_ids=args[0]) if args else kwargs
            estimate = self.estimate_cache_bytes(inputs, kwargs.get("names_filter"))
            if kwargs.get("incl_bwd"):
                estimate *= 2
            if estimate > limit:
                raise ValueError(
                    f"run_with_cache: this request would cache about {estimate / 2**30:.2f} GiB ({estimate} bytes), over "
                    f"max_cache_bytes={limit}. Narrow it: names_filter=[...] (e.g. fewer layers, or avoid "
                    "hook_pattern / hook_attn_scores, which grow with pos^2), device=\"cpu\" to keep the cache off the "
                    "accelerator, fewer prompts / positions; or pass max_cache_bytes=None to run it anyway."
                )
        out, cache = super().run_with_cache(*args, **kwargs)
        return out, ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def estimate_cache_bytes(self, inputs: Mapping[str, Any], names_filter: Any = None) -> int:
        """Bytes a run_with_cache of `inputs` would hold for the hooks `names_filter` selects (None: all), from the
        config and input shapes alone (nothing runs): decoder patterns / scores are batch * heads * pos^2 per
        layer, other decoder hooks batch * pos * width; vision hooks are bounded from pixel_values' crops / patches."""
        if names_filter is None:
            names = list(self.hook_dict)
        elif isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):
            names = [n for n in self.hook_dict if names_filter(n)]
        else:
            names = list(names_filter)
        ids = inputs.get("input_ids")
        b, s = tuple(ids.shape) if isinstance(ids, Tensor) and ids.ndim == 2 else (1, 0)
        c, v = self.cfg, self.cfg.vision
        item = self.embed.weight.element_size()
        pv = inputs.get("pixel_values", self._bound.get("pixel_values"))
        n_seq, n_tok = 0, 0  # vision: attention sequences (crops / images) and tokens per sequence (upper bound)
        if isinstance(pv, Tensor) and v is not None:
            if pv.ndim == 2:  # Qwen: flattened patches of all images
                n_seq, n_tok = 1, pv.shape[0]
            else:
                n_seq = pv.shape[0] * (pv.shape[1] if pv.ndim == 5 else 1)
                n_tok = (v.image_size // v.patch_size) ** 2 + 1 if v.image_size else 0
        n_feat = len(c.vision_feature_layer) if isinstance(c.vision_feature_layer, (list, tuple)) else 1
        v_width = 0 if v is None else max(v.d_model * n_feat, v.d_mlp)
        total = 0
        for name in names:
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith(("vision.", "projector.")):
                if leaf in ("hook_pattern", "hook_attn_scores"):
                    total += n_seq * (v.n_heads if v else 1) * n_tok**2
                else:
                    total += n_seq * n_tok * max(v_width, c.d_model)
                continue
            if leaf in ("hook_pattern", "hook_attn_scores"):
                per = c.n_heads * s
            elif ".q_norm." in name or ".k_norm." in name:  # per-head norms (Gemma 3's qk-norm)
                per = (c.n_heads if ".q_norm." in name else c.n_key_value_heads) * (1 if leaf == "hook_scale" else c.d_head)
            elif leaf in ("hook_q", "hook_rot_q", "hook_z"):
                per = c.n_heads * c.d_head
            elif leaf in ("hook_k", "hook_v", "hook_rot_k"):
                per = c.n_key_value_heads * c.d_head
            elif leaf == "hook_result":
                per = c.n_heads * c.d_model
            elif leaf in ("hook_pre", "hook_pre_linear", "hook_post") and ".mlp." in name:
                per = c.d_mlp
            elif leaf == "hook_scale":
                per = 1
            else:
                per = c.d_model
            total += b * s * per
        return int(total * item)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (follows `model.processor` if it is replaced)."""
        return getattr(self.processor, "tokenizer", self.processor)

    def layout(self, inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> TokenLayout:
        """Where every image token sits (crop, row, col), text positions, end-of-image, position ids."""
        return build_layout(self, {**(inputs or {}), **kwargs})

    def to_tokens(self, text: str | list[str], **kwargs: Any) -> Tensor:
        """Token ids [batch, pos] (TransformerLens's `to_tokens`). Each image placeholder token in the text (e.g.
        ``<image>``, Qwen's ``<|image_pad|>``; write what the processor's chat template writes around it) is
        expanded into as many image tokens as the k-th image of the inputs bound with `bind_inputs` takes there,
        so TL tools that tokenize text themselves (``head_detector``) get the sequence the model expects:

            inputs = model.processor(images=[img], text=[prompt], return_tensors="pt")
            with model.bind_inputs(**inputs):
                scores = transformer_lens.head_detector.detect_head(model, prompt, "previous_token_head")
        """
        if self.tokenizer is None:
            raise ValueError("this HookedVLM has no tokenizer: pass processor= to from_hf / from_pretrained")
        ids = self.tokenizer(text, return_tensors="pt", padding=True, **kwargs)["input_ids"]
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
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(r) for r in rows)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        return torch.tensor([[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in rows])

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        tokens = torch.as_tensor(tokens)
        return self.tokenizer.decode(tokens) if tokens.ndim <= 1 else self.tokenizer.batch_decode(tokens)

    def to_single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens ({ids}), not one")
        return ids[0]

    @contextmanager
    def bind_inputs(self, **inputs: Any) -> Iterator["HookedVLM"]:
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

    # ln_final's weight is folded into the unembedding at conversion (TransformerLens's fold_ln), and ln_final's own
    # weight is all ones. So `cache["ln_final.hook_normalized"] @ model.W_U` are the logits, ActivationCache's
    # logit_attrs / apply_ln_to_stack attributions sum to the logits, and TL's logit lens
    # (`accumulated_resid(apply_ln=True) @ W_U`, which calls model.ln_final) is not scaled twice.
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.unembed.weight.new_zeros(self.cfg.d_vocab)

    def tokens_to_residual_directions(self, tokens: Any) -> Tensor:
        """Rows of the folded W_U for token ids or strings ([..., d_model])."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self.W_U[:, torch.as_tensor(tokens, device=self.W_U.device)].movedim(0, -1)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the attention-output and MLP-output biases written to the residual stream before `layer`
        (and layer's attention bias if mlp_input), as TransformerLens defines it."""
        total = self.unembed.weight.new_zeros(self.cfg.d_model)
        for l in range(layer + int(mlp_input)):
            total = total + self.blocks[l].attn.b_O
            if include_mlp_biases and l < layer:
                total = total + self.blocks[l].mlp.b_out
        return total

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, hf_model: nn.Module, processor: Any = None, copy_weights: bool = True) -> "HookedVLM":
        """Convert an in-memory HF model. The HF model is never modified; with copy_weights=False the two share
        weight storage (no second copy in memory), so editing one model's weights edits the other's."""
        family = get_family(hf_model.config.model_type)
        cfg = family.config_from_hf(hf_model.config)
        param = next(hf_model.parameters())
        cfg.dtype, cfg.device, cfg.model_name = param.dtype, param.device, getattr(hf_model, "name_or_path", "")
        with torch.device("meta"):
            model = cls(cfg, processor)
        sd = family.convert_state_dict(hf_model.state_dict(), cfg)
        rotaries = family.rotary_from_hf(hf_model)
        for name, (inv_freq, _) in rotaries.items():
            sd[f"{name}.inv_freq"] = inv_freq
        if copy_weights:
            sd = {k: v.detach().clone() for k, v in sd.items()}
        fold_final_norm(sd, cfg.norm_offset)
        model.load_state_dict(sd, strict=True, assign=True)
        for name, (_, scaling) in rotaries.items():
            getattr(model, name).attention_scaling = scaling
        return model.eval()

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
        device_map: Any = None, processor: Any = "auto",
    ) -> "HookedVLM":
        """Load with Hugging Face (safetensors only: no pickle) and convert."""
        from .loading import load_hf

        hf_model, proc = load_hf(name_or_dir, dtype=dtype, device=device, device_map=device_map, processor=processor)
        return cls.from_hf(hf_model, proc, copy_weights=False)

    def hook_names(self, inputs: Mapping[str, Any] | None = None) -> list[str] | "HookShapes":
        """Every hook name (a list). Given model inputs, a `HookShapes` {name: shape} for those inputs instead
        (see `hook_shapes`); it prints as a table and iterates over the names like the list does."""
        return list(self.hook_dict) if inputs is None else self.hook_shapes(inputs)

    @torch.no_grad()
    def hook_shapes(self, inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> "HookShapes":
        """{hook name: activation shape} for these inputs, in hook order, from one forward that records shapes
        only (no tensor is kept). Hooks that did not run on these inputs map to None (e.g. vision blocks after the
        feature layer). Lazily computed activations (hook_pattern, hook_result) are computed for the record.

            model.hook_shapes(inputs)["blocks.0.attn.hook_pattern"]   # (batch, n_heads, pos, pos)
        """
        shapes: dict[str, tuple[int, ...]] = {}

        def record(tensor: Any, hook: HookPoint) -> None:
            shapes.setdefault(hook.name, tuple(tensor.shape) if isinstance(tensor, Tensor) else None)

        with self.hooks(fwd_hooks=[(lambda name: True, record)]):
            self(**{**(inputs or {}), **kwargs})
        return HookShapes((name, shapes.get(name)) for name in self.hook_dict)

    def extra_repr(self) -> str:
        c, v = self.cfg, self.cfg.vision
        size = "native resolution" if v is None or not v.image_size else f"image_size={v.image_size}"
        vision = "" if v is None else f"vision: {v.n_layers} blocks, d={v.d_model}, patch={v.patch_size}, {size}; "
        return (f"family={c.family!r}, n_layers={c.n_layers}, d_model={c.d_model}, n_heads={c.n_heads} "
                f"(kv {c.n_key_value_heads}), d_vocab={c.d_vocab}, {vision}{len(self.hook_dict)} hooks: "
                "model.hook_names(inputs) lists them with their shapes")

    # ------------------------------------------------------------------- hook checks (every way of adding)
    def _check_hook_name(self, name: Any) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"no hook point named {name!r}{hint} (model.hook_names() lists all {len(self.hook_dict)})")

    def add_hook(self, name: Any, hook: Any, dir: str = "fwd", *args: Any, **kwargs: Any) -> None:
        self._check_hook_name(name)
        super().add_hook(name, hook, dir, *args, **kwargs)

    def check_and_add_hook(self, hook_point: HookPoint, hook_point_name: str, hook: Any, dir: str = "fwd",
                           *args: Any, **kwargs: Any) -> None:
        super().check_and_add_hook(hook_point, hook_point_name, _checked(hook, hook_point_name) if dir == "fwd" else hook,
                                   dir, *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Any, dir: str) -> None:
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, _checked(hook, name) if dir == "fwd" else hook, dir)


class HookShapes(dict):
    """{hook name: shape tuple (None: did not run)}; prints one aligned line per hook."""

    def __repr__(self) -> str:
        width = max((len(n) for n in self), default=0)
        return "\n".join(f"{n:<{width}}  {'did not run' if s is None else list(s)}" for n, s in self.items())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _checked(fn: Any, name: str) -> Any:
    """Wrap a forward hook so that a returned activation of the wrong shape or dtype fails loudly, naming the hook,
    instead of breaking (or silently broadcasting) somewhere downstream."""

    def checked(tensor: Any, hook: HookPoint) -> Any:
        out = fn(tensor, hook=hook)
        if out is not None and isinstance(tensor, Tensor):
            if not isinstance(out, Tensor) or out.shape != tensor.shape or out.dtype != tensor.dtype:
                got = f"{type(out).__name__} {tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"the hook on {name!r} returned {got}; expected a tensor of shape {tuple(tensor.shape)} and dtype "
                    f"{tensor.dtype} (or None to leave the activation unchanged)"
                )
        return out

    checked.__wrapped__ = fn
    return checked


def fold_final_norm(sd: dict[str, Tensor], offset: float = 0.0) -> None:
    """unembed <- unembed * (offset + ln_final.w) (computed in float32); ln_final.w <- 1 - offset, so that the
    norm's multiplier is exactly 1. New tensors: the HF model's weights are untouched even when others are shared."""
    w = sd["ln_final.w"]
    sd["unembed.weight"] = (sd["unembed.weight"].float() * (offset + w.float())[None, :]).to(sd["unembed.weight"].dtype)
    sd["ln_final.w"] = torch.full_like(w, 1.0 - offset)


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
