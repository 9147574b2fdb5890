"""Logit lens over every layer and every position, image tokens included (nostalgebraist 2020).

The residual stream of any layer is decoded as if it were the last one: ``unembed(ln_final(resid))``, with the
model's own final norm (its scale recomputed for each residual vector) and unembedding. At the last layer's
``resid_post`` this *is* the model's forward (tested bit for bit), so layer ``n_layers - 1`` of the lens equals
the logits. Image positions are decoded like any other position: `plot_lens_image` paints one layer's values
back onto the picture with the layout's (row, col) of every image token.

    lens = logit_lens(model, inputs)                         # [layer, batch, pos, vocab]
    ld = lens_logit_diff(model, inputs, answer, wrong)       # [layer, batch, pos]
    vals, ids = lens_top_k(model, inputs, k=5)               # [layer, batch, pos, k] each
    plot_lens_image(ld[:, 0], model.layout(inputs), image, layer=2)

``hook`` is "resid_post" (default; layer l = after block l) or "resid_pre" (layer l = before block l, so
layer 0 decodes the embeddings themselves), or any ``{layer}`` template of a [batch, pos, d_model] residual hook.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .toolkit import as_positions, hook_template, resolve_layers

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


@torch.no_grad()
def residual_stack(model: "HookedVLM", inputs: dict[str, Any], hook: str = "resid_post",
                   layers: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """(residuals [layer, batch, pos, d_model], logits of the plain forward, layer indices)."""
    template = hook_template(hook)
    layer_ids = resolve_layers(model, template, layers)
    names = [template.format(layer=l) for l in layer_ids]
    logits, cache = model.run_with_cache(**inputs, names_filter=names)
    return torch.stack([cache[n] for n in names]), logits, layer_ids


def decode(model: "HookedVLM", resid: Tensor) -> Tensor:
    """unembed(ln_final(resid)) for any [..., d_model] tensor: the model's own last two steps."""
    return model.unembed(model.ln_final(resid))


def _select(values: Tensor, positions: Any) -> Tensor:
    if positions is None:
        return values
    mask = as_positions(positions, values.shape[2])
    if mask.ndim == 2:  # [batch, pos]: keep all positions, NaN elsewhere (prompts may differ)
        return values.masked_fill(~mask.to(values.device)[None, :, :, None], float("nan"))
    return values[:, :, mask.to(values.device)]


@torch.no_grad()
def logit_lens(model: "HookedVLM", inputs: dict[str, Any], hook: str = "resid_post", layers: Any = None,
               tokens: Any = None, positions: Any = None) -> Tensor:
    """Lens logits [layer, batch, pos, vocab]; with `tokens` (ids [n] for every prompt, or [batch, n] per
    prompt) only those columns: [layer, batch, pos, n]. `positions`: a 1-D mask / ints keeps those positions
    only; a [batch, pos] mask keeps the shape and fills the other positions with NaN."""
    resid, _, _ = residual_stack(model, inputs, hook, layers)
    out = decode(model, resid)
    if tokens is not None:
        ids = torch.as_tensor(tokens, device=out.device).long()
        if ids.ndim == 0:
            ids = ids[None]
        if ids.ndim == 1:
            out = out[..., ids]
        else:  # per prompt [batch, n]
            idx = ids[None, :, None, :].expand(out.shape[0], -1, out.shape[2], -1)
            out = out.gather(-1, idx)
    return _select(out, positions)


@torch.no_grad()
def lens_logit_diff(model: "HookedVLM", inputs: dict[str, Any], answer: Any, wrong: Any, hook: str = "resid_post",
                    layers: Any = None, positions: Any = None) -> Tensor:
    """logit[answer] - logit[wrong] of the lens at every layer and position: [layer, batch, pos]. `answer`,
    `wrong`: one id, or one per prompt ([batch])."""
    b = inputs["input_ids"].shape[0]
    a = torch.as_tensor(answer).long().flatten().expand(b) if torch.as_tensor(answer).numel() == 1 else torch.as_tensor(answer).long()
    w = torch.as_tensor(wrong).long().flatten().expand(b) if torch.as_tensor(wrong).numel() == 1 else torch.as_tensor(wrong).long()
    both = logit_lens(model, inputs, hook, layers, tokens=torch.stack([a, w], 1), positions=positions)
    return both[..., 0] - both[..., 1]


@torch.no_grad()
def lens_top_k(model: "HookedVLM", inputs: dict[str, Any], k: int = 5, hook: str = "resid_post", layers: Any = None,
               probs: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k lens tokens at every layer and position: (values, token ids), each [layer, batch, pos, k]; values
    are logits, or probabilities with ``probs=True``. `model.to_string(ids[l, b, p])` decodes them."""
    out = logit_lens(model, inputs, hook, layers)
    if probs:
        out = out.float().softmax(-1)
    return out.topk(k, dim=-1)


def plot_lens_image(values: Any, layout: Any, image: Any, layer: int, batch: int = 0, image_index: int = 0,
                    crop: int = 0, title: str | None = None, **kwargs: Any):
    """Paint one layer of lens values onto the picture.

    values: [layer, pos] (one prompt, e.g. ``lens_logit_diff(...)[:, b]``) or [layer, batch, pos]; `layer`
    indexes its first axis. Image tokens are placed at their (row, col) of the layout's grid
    (`plots.plot_image_overlay`), so only the positions of image `image_index`, crop `crop` are drawn.
    """
    from .plots import plot_image_overlay

    v = torch.as_tensor(values) if not isinstance(values, Tensor) else values
    if v.ndim not in (2, 3):
        raise ValueError(f"values must be [layer, pos] or [layer, batch, pos], got shape {tuple(v.shape)}")
    row = v[layer]
    if row.ndim == 2:
        row = row[batch]
    return plot_image_overlay(row, layout, image, batch=batch, image_index=image_index, crop=crop,
                              title=title or f"logit lens, layer {layer}", **kwargs)


__all__ = ["residual_stack", "decode", "logit_lens", "lens_logit_diff", "lens_top_k", "plot_lens_image"]
