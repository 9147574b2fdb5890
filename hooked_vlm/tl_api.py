"""TransformerLens's model API on HookedVLM: weight views, loss, forward options, caching options and the
hook-name checks (tokens and strings: hooked_vlm/tl_tokens.py). `HookedVLM` inherits `TransformerLensAPI`; model.py keeps construction and the forward.

Weight views follow TransformerLens's shapes (`W_Q` [n_layers, n_heads, d_model, d_head], ...; grouped-query keys
and values repeated to n_heads as TL's GroupedQueryAttention does). They are views of HF's weights: the decoder
norms' weights are NOT folded into them (only ln_final's weight is, into `W_U`), so `hook_q` is
`blocks[l].ln1(resid_pre) @ W_Q[l] + b_Q[l]` (ln1 includes its weight), not `ln1.hook_normalized @ W_Q[l]`.
"""
from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Callable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice
from transformer_lens.utilities import remove_batch_dim as drop_batch_dim

from . import cache_guard
from .components.rotary import Rotary
from .cache import HookedVLMCache
from .tl_tokens import TokenAPI

RETURN_TYPES = ("logits", "loss", "both", None)
# hooks whose second axis is not the decoder's positions: left whole by run_with_cache(pos_slice=...)
NOT_DECODER_POSITIONS = ("vision.", "projector.")
# decoder hooks shaped [batch, pos, head, ...]: position is axis -3 (TL's rule, plus the rotated q / k)
PER_HEAD_POSITION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k")


class TransformerLensAPI(TokenAPI):
    """Mixin: everything of TransformerLens's HookedTransformer API that is not construction or the forward
    (tokens and strings in `hooked_vlm.tl_tokens.TokenAPI`)."""

    # ------------------------------------------------------------------------------------- weight views
    # ln_final's weight is folded into the unembedding at conversion (TransformerLens's fold_ln), and ln_final's own
    # weight is all ones. So `cache["ln_final.hook_normalized"] @ model.W_U` are the logits, ActivationCache's
    # logit_attrs / apply_ln_to_stack attributions sum to the logits, and TL's logit lens
    # (`accumulated_resid(apply_ln=True) @ W_U`, which calls model.ln_final) is not scaled twice.
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding [d_model, d_vocab] with ln_final's weight folded in (= `model.unembed.W_U`)."""
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        """The unembedding bias [d_vocab] (zeros here; = `model.unembed.b_U`)."""
        return self.unembed.b_U

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding [d_vocab, d_model]. Image positions take projected image features instead."""
        return self.embed.weight

    def _stack(self, part: str, name: str) -> Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks])

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="[n_layers, n_heads, d_model, d_head] (GQA expanded)")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="[n_layers, n_heads, d_model, d_head] (GQA expanded)")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[n_layers, n_heads, d_head, d_model]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[n_layers, n_heads, d_head]")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="[n_layers, n_heads, d_head] (GQA expanded)")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="[n_layers, n_heads, d_head] (GQA expanded)")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[n_layers, d_model]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[n_layers, d_model, d_mlp] (up projection)")
    W_gate = property(lambda self: self._stack("mlp", "W_gate"), doc="[n_layers, d_model, d_mlp]")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[n_layers, d_mlp, d_model]")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[n_layers, d_mlp]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[n_layers, d_model]")

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O for every layer and head: a FactoredMatrix [n_layers, n_heads, d_model, d_model]."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T for every layer and head: a FactoredMatrix [n_layers, n_heads, d_model, d_model]. Rotary
        positions are not in it (see `Attention.QK`)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

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

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """As TransformerLens: True makes every decoder block build `attn.hook_result` (per-head outputs
        [batch, pos, head, d_model]) on every forward, hooked or not; the attention output is then the sum of the
        results plus b_O. False (the default) builds it only when it is hooked or cached, which is enough for
        every hook and cache here; the flag exists for code that sets it."""
        for block in self.blocks:
            block.attn.use_attn_result = bool(use_attn_result)
        self.cfg.use_attn_result = bool(use_attn_result)

    # ------------------------------------------------------------------------- forward options (TL's)
    def _layer_range(self, start_at_layer: int | None, stop_at_layer: int | None) -> slice:
        """The blocks a forward runs: `blocks[start_at_layer:stop_at_layer]` (negative allowed, as TL)."""
        n = len(self.blocks)
        for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if value is not None and (not isinstance(value, int) or not -n <= value <= n):
                raise ValueError(f"{name}: expected an int in -{n}..{n} (this decoder has {n} blocks), got {value!r}")
        return slice(start_at_layer, stop_at_layer)

    def _resume_inputs(
        self, residual: Any, tokens: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
        **image_inputs: Any,
    ) -> tuple[Tensor, Rotary, Tensor | None, dict[int, Tensor]]:
        """(x, rotary, mask, no DeepStack additions) for `forward(residual, start_at_layer=l, ...)`. The images are not recomputed (they
        are in the residual already); positions come from `position_ids`, or from `tokens` and the image inputs
        (Qwen's M-RoPE needs tokens + image_grid_thw + mm_token_type_ids), or are 0..pos-1 for 1-D RoPE."""
        from .model import causal_padding_mask

        if not isinstance(residual, Tensor) or residual.ndim != 3 or residual.shape[-1] != self.cfg.d_model \
                or not residual.is_floating_point():
            got = f"{type(residual).__name__} {tuple(getattr(residual, 'shape', ()))}"
            raise ValueError(f"start_at_layer: the first input must be the residual stream [batch, pos, d_model="
                             f"{self.cfg.d_model}] entering that block, got {got}")
        unknown = sorted(set(image_inputs) - self._accepted)
        if unknown:
            raise TypeError(f"HookedVLM got unexpected keyword(s) {unknown}; it takes {sorted(self._accepted)}")
        bound = self._bound
        attention_mask = bound.get("attention_mask") if attention_mask is None else attention_mask
        position_ids = bound.get("position_ids") if position_ids is None else position_ids
        image_inputs = {**{k: v for k, v in bound.items() if k not in ("attention_mask", "position_ids")}, **image_inputs}
        device = self.embed.weight.device
        x = residual.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask: expected shape {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
        plan = None  # the image inputs, parsed once, for the positions and the attention groups
        if tokens is not None:
            if tuple(tokens.shape) != tuple(x.shape[:2]):
                raise ValueError(f"tokens: expected shape {tuple(x.shape[:2])}, got {tuple(tokens.shape)}")
            tokens = tokens.to(device)
            plan = self.family.plan(self, tokens, **image_inputs)
        if position_ids is None:
            if plan is not None:
                position_ids = self.family.position_ids(self, tokens, attention_mask, plan)
            elif self.cfg.mrope_section is None:
                position_ids = torch.arange(x.shape[1], device=device).expand(x.shape[0], -1)
            else:
                raise ValueError("start_at_layer on an M-RoPE model (Qwen2-VL family) needs the positions: pass "
                                 "tokens=input_ids with the image inputs (image_grid_thw, mm_token_type_ids), or "
                                 "position_ids=model.layout(inputs).position_ids")
        rotary = self.rotaries(position_ids.to(device), x.dtype)
        # families whose image tokens attend bidirectionally (Gemma 3) need the tokens to know the groups
        groups = self.family.attention_groups(self, tokens, plan) if plan is not None else None
        return x, rotary, causal_padding_mask(attention_mask, x.dtype, groups), {}

    def _output(self, x: Tensor, tokens: Tensor | None, attention_mask: Tensor | None, return_type: str | None,
                loss_per_token: bool, logits_to_keep: Any) -> Any:
        """ln_final -> unembed -> what `return_type` asks for (TL's semantics; None runs ln_final only)."""
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type: expected one of {list(RETURN_TYPES)}, got {return_type!r}")
        if return_type in ("loss", "both"):
            if tokens is None:
                raise ValueError(f"return_type={return_type!r} needs the token ids: with start_at_layer pass tokens=")
            if isinstance(logits_to_keep, Tensor) or logits_to_keep:
                raise ValueError(f"return_type={return_type!r} scores every position: logits_to_keep must be 0")
        if isinstance(logits_to_keep, Tensor):
            if logits_to_keep.ndim != 1 or logits_to_keep.is_floating_point():
                raise ValueError(f"logits_to_keep: expected an int or a 1-D integer index tensor, got "
                                 f"{logits_to_keep.dtype} {tuple(logits_to_keep.shape)}")
            x = x[:, logits_to_keep.to(x.device)]
        elif logits_to_keep:
            if not 0 < int(logits_to_keep) <= x.shape[1]:
                raise ValueError(f"logits_to_keep: expected 0 (all) or 1..{x.shape[1]}, got {logits_to_keep}")
            x = x[:, -int(logits_to_keep):]
        x = self.ln_final(x.to(self.unembed.weight.device))
        if return_type is None:
            return None
        logits = self.unembed(x)
        if return_type == "logits":
            return logits
        mask = self._bound.get("attention_mask") if attention_mask is None else attention_mask
        loss = self.loss_fn(logits, tokens, mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(
        self, logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None, per_token: bool = False,
    ) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
        """Next-token cross-entropy over TEXT: the logits at position i are scored against token i + 1 only if
        both are text tokens (not image tokens) and not padding. So image positions never predict or are
        predicted, and the text token right after an image (predicted from an image position) is not scored.
        per_token: [batch, pos - 1] losses, 0 where not scored (as TL's masked loss); else their mean over the
        scored positions."""
        tokens = tokens.to(logits.device)
        log_probs = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        text = tokens != self.cfg.image_token_id
        if attention_mask is not None:
            text = text & attention_mask.to(logits.device).bool()
        scored = text[:, :-1] & text[:, 1:]
        loss = -log_probs.masked_fill(~scored, 0.0)
        if per_token:
            return loss
        n = int(scored.sum())
        if n == 0:
            raise ValueError("return_type='loss': no pair of adjacent text tokens to score (image positions and "
                             "padding are never scored)")
        return loss.sum() / n

    # ------------------------------------------------------------------------------------ run_with_cache
    def run_with_cache(
        self, *model_args: Any, names_filter: Any = None, pos_slice: Any = None, return_cache_object: bool = True,
        remove_batch_dim: bool = False, incl_bwd: bool = False, device: Any = None, reset_hooks_end: bool = True,
        clear_contexts: bool = False, **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run the model (`model(*model_args, **model_kwargs)`, e.g. `**inputs` and `return_type=`,
        `stop_at_layer=`) and cache activations: returns (output, cache).

        names_filter:  None (every hook), a name, a list of names, or a function name -> bool. A name that is not a
                       hook raises ValueError naming it and the nearest hook names.
        pos_slice:     keep only these decoder positions (int, (start, stop[, step]), list, or a
                       transformer_lens Slice; an int keeps its axis, as TL). Only hooks on the decoder's position
                       axis are sliced (hook_token_embed, hook_embed, blocks.*, ln_final.*; for patterns and scores
                       the query axis); `vision.*` and `projector.*` hooks, whose second axis is patches or image
                       tokens, are kept whole.
        return_cache_object: True gives a transformer_lens ActivationCache, False the plain {name: tensor} dict.
        remove_batch_dim, incl_bwd (cache gradients as "<name>_grad": the output must be a scalar, e.g.
        return_type="loss"), device (where cached tensors go), reset_hooks_end, clear_contexts: as TransformerLens.
        Requests estimated above `model.max_cache_bytes` are refused first (see `estimate_cache_bytes`)."""
        keep = self._names_filter(names_filter)
        if incl_bwd and not torch.is_grad_enabled():
            raise ValueError("run_with_cache(incl_bwd=True) needs autograd, but gradients are off (torch.no_grad() or "
                             "set_grad_enabled(False)): run it with gradients enabled")
        ids = model_kwargs.get("input_ids", model_args[0] if model_args else None)
        if remove_batch_dim and isinstance(ids, Tensor) and ids.ndim >= 2 and ids.shape[0] != 1:
            raise ValueError(f"remove_batch_dim=True needs a batch of one prompt, got {ids.shape[0]}")
        slicer = Slice.unwrap(pos_slice)  # an int keeps its axis, as TL
        cache: dict[str, Tensor] = {}

        def save(tensor: Tensor, hook: HookPoint, grad: bool = False) -> None:
            stored = tensor.detach().to(device)
            if remove_batch_dim:
                stored = drop_batch_dim(stored)
            if pos_slice is not None and not hook.name.startswith(NOT_DECODER_POSITIONS):
                dim = -3 if hook.name.endswith(PER_HEAD_POSITION_HOOKS) else -2  # patterns / scores: the query axis
                if stored.ndim >= -dim:
                    stored = slicer.apply(stored, dim=dim)
            cache[hook.name + ("_grad" if grad else "")] = stored

        names = [name for name in self.hook_dict if keep(name)]
        fwd = [(name, save) for name in names]
        bwd = [(name, partial(save, grad=True)) for name in names] if incl_bwd else []
        self.is_caching = True
        cached = set(names)
        with cache_guard.separate_aliases(self, cache, cached.__contains__), \
                self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, Tensor) or out.numel() != 1:
                    raise ValueError("run_with_cache(incl_bwd=True) calls backward() on the output, which must be a "
                                     "scalar: pass return_type=\"loss\"")
                out.backward()
        if not return_cache_object:
            return out, cache
        counts = (ids == self.cfg.image_token_id).sum(1).cpu() if isinstance(ids, Tensor) and ids.ndim == 2 else None
        return out, HookedVLMCache(cache, self, has_batch_dim=not remove_batch_dim, image_tokens=counts)

    def _names_filter(self, names_filter: Any) -> Callable[[str], bool]:
        """TL's names_filter forms as a function; names given as a str or list must be hook names."""
        if names_filter is None:
            return lambda name: True
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple, set)):
            for name in names_filter:
                self._check_hook_name(name)
            wanted = set(names_filter)
            return lambda name: name in wanted
        if callable(names_filter):
            return names_filter
        raise ValueError(f"names_filter: expected None, a hook name, a list of names or a function, got "
                         f"{type(names_filter).__name__}")

    # --------------------------------------------------------------------------------------- hook names
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

    # ------------------------------------------------------------------- hook checks (every way of adding)
    def _check_hook_name(self, name: Any) -> None:
        """Raise for a hook name the model does not have, naming the nearest ones (difflib)."""
        if isinstance(name, str) and name not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"no hook point named {name!r}{hint} (model.hook_names() lists all {len(self.hook_dict)})")

    def add_hook(self, name: Any, hook: Any, dir: str = "fwd", *args: Any, **kwargs: Any) -> None:
        """TL's `add_hook` (name or name filter), refusing unknown names; forward hooks are shape-checked."""
        self._check_hook_name(name)
        super().add_hook(name, hook, dir, *args, **kwargs)

    def check_and_add_hook(self, hook_point: HookPoint, hook_point_name: str, hook: Any, dir: str = "fwd",
                           *args: Any, **kwargs: Any) -> None:
        """TL's hook-adding entry point, with forward hooks wrapped by the shape / dtype check."""
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


__all__ = ["TransformerLensAPI", "HookShapes", "RETURN_TYPES"]
