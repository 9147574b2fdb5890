"""Reference implementations of the residual-stream activation-patching sweep, for comparison with hooked_vlm's
batched `patch_resid_by_layer_and_position`. All three compute the same thing:

    for each (layer l, position p): run the CORRUPT inputs with resid_pre[l][:, p] replaced by its CLEAN value,
    and evaluate metric(logits) (mean over prompts); plus the clean and corrupt baselines.

* `hf_hook_sweep`: plain PyTorch on the HF model. The clean residual stream comes from one forward with
  output_hidden_states=True (hidden_states[l] is the input of decoder layer l); each patch is one forward with a
  `register_forward_pre_hook(with_kwargs=True)` on decoder layer l that overwrites position p.
* `nnsight_sweep`: the same with nnsight (https://nnsight.net): one trace saving every layer's input on the
  clean run, then one trace per patch assigning `layers[l].input[:, p, :]`. nnsight's generic `NNsight`
  wrapper (the one that takes an arbitrary VLM with pixel inputs) cannot batch several invokes in one trace
  ("NNsight does not support batching multiple invokes"), so one trace per patch is its idiom here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def decoder_layers(hf: Any):
    return hf.model.language_model.layers


@torch.no_grad()
def hf_hook_sweep(hf: Any, clean: dict, corrupt: dict, metric: Callable[[Tensor], Tensor], layers: Sequence[int],
                  positions: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (scores [layer, pos], clean metric, corrupt metric), metric averaged over prompts."""
    out = hf(**clean, output_hidden_states=True)
    clean_value = metric(out.logits).float().mean().cpu()
    clean_resid = [out.hidden_states[l] for l in layers]
    del out
    corrupt_value = metric(hf(**corrupt).logits).float().mean().cpu()
    blocks = decoder_layers(hf)
    scores = torch.empty(len(layers), len(positions))
    for i, layer in enumerate(layers):
        src = clean_resid[i]
        for j, p in enumerate(positions):
            def pre_hook(module, args, kwargs, src=src, p=p):
                if args:
                    h = args[0].clone()
                    h[:, p] = src[:, p]
                    return (h,) + tuple(args[1:]), kwargs
                h = kwargs["hidden_states"].clone()
                h[:, p] = src[:, p]
                return args, {**kwargs, "hidden_states": h}

            handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                scores[i, j] = metric(hf(**corrupt).logits).float().mean().cpu()
            finally:
                handle.remove()
    return scores, clean_value, corrupt_value


def nnsight_available() -> str | None:
    """None if nnsight imports, else why not."""
    try:
        import nnsight  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"{type(err).__name__}: {err}"
    return None


def wrap_nnsight(hf: Any):
    """An nnsight wrapper around a deep copy of `hf`: wrapping replaces each module's forward with an nnsight
    controller, which must not slow down the plain-HF measurements."""
    import copy

    from nnsight import NNsight

    return NNsight(copy.deepcopy(hf))


@torch.no_grad()
def nnsight_sweep(nm: Any, clean: dict, corrupt: dict, metric: Callable[[Tensor], Tensor], layers: Sequence[int],
                  positions: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The same sweep with nnsight traces (see the module docstring)."""
    blocks = nm.model.language_model.layers
    # values leave a trace through .save(); they are kept in a dict because nnsight runs the with-block body
    # in its own scope, so a plain local assigned inside one trace is not visible to the code after it
    store: dict[str, Any] = {}
    with nm.trace(**clean):
        store["resid"] = [blocks[l].input.save() for l in layers]
        store["logits"] = nm.output.logits.save()
    clean_value = metric(store["logits"]).float().mean().cpu()
    with nm.trace(**corrupt):
        store["logits"] = nm.output.logits.save()
    corrupt_value = metric(store["logits"]).float().mean().cpu()
    scores = torch.empty(len(layers), len(positions))
    for i, layer in enumerate(layers):
        src = store["resid"][i]
        for j, p in enumerate(positions):
            with nm.trace(**corrupt):
                blocks[layer].input[:, p, :] = src[:, p, :]
                store["logits"] = nm.output.logits.save()
            scores[i, j] = metric(store["logits"]).float().mean().cpu()
    return scores, clean_value, corrupt_value


# ------------------------------------------------------------------------------------ head sweep (hook_z)
def head_dim(hf: Any) -> int:
    c = hf.config.text_config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@torch.no_grad()
def hf_head_sweep(hf: Any, clean: dict, corrupt: dict, metric: Callable[[Tensor], Tensor], layers: Sequence[int],
                  heads: Sequence[int], position: int) -> Tensor:
    """Head patching with torch hooks on HF: head h's output at `position` (the input of o_proj, columns
    h*d_head..) taken from the clean run into the corrupt one, one forward per (layer, head) -> scores [layer, head]."""
    blocks, dh = decoder_layers(hf), head_dim(hf)
    store: dict[int, Tensor] = {}
    handles = [blocks[l].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args, l=l: store.__setitem__(l, args[0].detach().clone())) for l in layers]
    try:
        hf(**clean)
    finally:
        for h in handles:
            h.remove()
    scores = torch.empty(len(layers), len(heads))
    for i, l in enumerate(layers):
        for j, h in enumerate(heads):
            def pre_hook(module, args, l=l, h=h):
                x = args[0].clone()
                x[:, position, h * dh:(h + 1) * dh] = store[l][:, position, h * dh:(h + 1) * dh]
                return (x,) + tuple(args[1:])

            handle = blocks[l].self_attn.o_proj.register_forward_pre_hook(pre_hook)
            try:
                scores[i, j] = metric(hf(**corrupt).logits).float().mean().cpu()
            finally:
                handle.remove()
    return scores


@torch.no_grad()
def nnsight_head_sweep(nm: Any, clean: dict, corrupt: dict, metric: Callable[[Tensor], Tensor], layers: Sequence[int],
                       heads: Sequence[int], position: int, d_head: int) -> Tensor:
    """The same head sweep with nnsight: one trace saving o_proj's inputs, then one trace per (layer, head)."""
    blocks, dh = nm.model.language_model.layers, d_head
    store: dict[str, Any] = {}
    with nm.trace(**clean):
        store["z"] = [blocks[l].self_attn.o_proj.input.save() for l in layers]
    scores = torch.empty(len(layers), len(heads))
    for i, l in enumerate(layers):
        src = store["z"][i]
        for j, h in enumerate(heads):
            cols = slice(h * dh, (h + 1) * dh)
            with nm.trace(**corrupt):
                blocks[l].self_attn.o_proj.input[:, position, cols] = src[:, position, cols]
                store["logits"] = nm.output.logits.save()
            scores[i, j] = metric(store["logits"]).float().mean().cpu()
    return scores
