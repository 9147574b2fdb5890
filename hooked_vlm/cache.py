"""`HookedVLMCache`: TransformerLens' ActivationCache, exact on models whose residual stream gets additions that
are neither an attention nor an MLP output (Qwen3-VL DeepStack: `blocks.{l}.hook_deepstack`, image features
added after block l's MLP, inside its resid_post).

TransformerLens decomposes the residual stream into embed + attn_out + mlp_out per layer. Here
`decompose_resid` (mode "all" with embeddings) also lists `{l}_deepstack` after `{l}_mlp_out`, and
`get_full_resid_decomposition` lists them before "bias", so both stacks sum to the residual stream at image
positions too. For other families nothing changes (no `hook_deepstack` in the cache). mode="attn" / "mlp" and
incl_embeds=False leave the additions out: they are image embeddings, not layer outputs.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import Slice


# hooks holding one row per image token in reading order ([n_image_tokens, d], hook_names.md): batch slicing
# takes the rows of the kept prompts
IMAGE_ROW_HOOKS = re.compile(r"projector(\.deepstack\.\d+)?\.hook_out")


class HookedVLMCache(ActivationCache):
    """TransformerLens' ActivationCache (+ DeepStack, see the module docstring). `image_tokens` [batch]: each
    prompt's image-token count, so `apply_slice_to_batch_dim` slices `projector.hook_out` (one row per image
    token, reading order) by prompt too; TransformerLens would leave it whole."""

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True,
                 image_tokens: torch.Tensor | None = None):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.image_tokens = image_tokens

    def _deepstack(self, layers: range, pos_slice: Slice) -> tuple[list[torch.Tensor], list[str]]:
        parts, labels = [], []
        for l in layers:
            name = f"blocks.{l}.hook_deepstack"
            if name in self.cache_dict:
                parts.append(pos_slice.apply(self[name], dim=-2))
                labels.append(f"{l}_deepstack")
        return parts, labels

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all", apply_ln: bool = False,
                        pos_slice: Any = None, incl_embeds: bool = True, return_labels: bool = False) -> Any:
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        stack, labels = super().decompose_resid(layer, mlp_input=mlp_input, mode=mode, apply_ln=False,
                                                pos_slice=pos_slice, incl_embeds=incl_embeds, return_labels=True)
        extra, extra_labels = self._deepstack(range(layer), pos_slice) if mode == "all" and incl_embeds else ([], [])
        if extra:
            rows = list(stack)
            for part, label in zip(extra, extra_labels):  # right after that layer's MLP output
                at = labels.index(f"{label.split('_')[0]}_mlp_out") + 1
                rows.insert(at, part)
                labels.insert(at, label)
            stack = torch.stack(rows, dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False, expand_neurons: bool = True,
                                     apply_ln: bool = False, pos_slice: Any = None, return_labels: bool = False,
                                     project_output_onto: torch.Tensor | None = None) -> Any:
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        stack, labels = super().get_full_resid_decomposition(
            layer, mlp_input=mlp_input, expand_neurons=expand_neurons, apply_ln=apply_ln, pos_slice=pos_slice,
            return_labels=True, project_output_onto=project_output_onto)
        extra, extra_labels = self._deepstack(range(layer), pos_slice)
        if extra:
            rows = torch.stack(extra, dim=0)
            if apply_ln:
                rows = self.apply_ln_to_stack(rows, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            if project_output_onto is not None:
                rows = rows @ project_output_onto.to(rows.dtype)
            at = labels.index("bias")
            stack = torch.cat([stack[:at], rows.to(stack.dtype), stack[at:]], dim=0)
            labels = labels[:at] + extra_labels + labels[at:]
        return (stack, labels) if return_labels else stack

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "HookedVLMCache":
        out = super().apply_slice_to_batch_dim(batch_slice)
        counts = self.image_tokens
        if counts is None or not self.has_batch_dim:
            return HookedVLMCache(out.cache_dict, self.model, has_batch_dim=out.has_batch_dim)
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        prompts = batch_slice.apply(torch.arange(len(counts)), dim=0).reshape(-1)
        prompt_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
        rows = torch.cat([(prompt_of_row == p).nonzero().flatten() for p in prompts.tolist()] or [torch.zeros(0, dtype=torch.long)])
        for name, value in self.cache_dict.items():
            if IMAGE_ROW_HOOKS.fullmatch(name) and value.shape[0] == int(counts.sum()):
                out.cache_dict[name] = value[rows.to(value.device)]
        return HookedVLMCache(out.cache_dict, self.model, has_batch_dim=out.has_batch_dim, image_tokens=counts[prompts])


__all__ = ["HookedVLMCache"]
