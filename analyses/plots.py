"""Shared plotly figures for the analyses. Every function returns a `plotly.graph_objects.Figure` (never shows it).

* `plot_layer_position(scores [layer, pos], layout)`: heatmap with hover text naming the token and, for image
  tokens, image / crop / row / col (`TokenLayout.describe`).
* `plot_image_overlay(scores [pos], layout, image)`: per-image-token scores painted back onto the picture
  (crop 0 = the base grid) as a semi-transparent heatmap.
* `plot_heads(scores [layer, head])`, `plot_by_layer(scores [layer])`, `plot_effect_table({name: value})`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

DIVERGING = "RdBu"


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def _zmid(values: np.ndarray) -> dict[str, Any]:
    """Centre a diverging scale on 0 when the values have both signs."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0 < finite.max():
        return dict(colorscale=DIVERGING, zmid=0.0, reversescale=True)
    return dict(colorscale="Viridis")


def token_strings(layout: Any, batch: int = 0, tokens: Any = None) -> list[str]:
    """One label per position of prompt `batch`: `tokens` may be a list of strings, a model / processor /
    tokenizer (decoded token by token), or None (token ids are shown)."""
    ids = layout.input_ids[batch].tolist()
    if tokens is None:
        return [f"id {i}" for i in ids]
    if isinstance(tokens, (list, tuple)):
        if len(tokens) != len(ids):
            raise ValueError(f"got {len(tokens)} token strings for a sequence of {len(ids)}")
        return [str(t) for t in tokens]
    tok = getattr(tokens, "tokenizer", None) or tokens
    if getattr(tok, "tokenizer", None) is not None:  # a processor inside a model
        tok = tok.tokenizer
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        raise TypeError("tokens= must be a list of strings, a tokenizer, a processor or a model with a tokenizer")
    return [str(t) for t in tok.convert_ids_to_tokens(ids)]


def plot_layer_position(
    scores: Any,
    layout: Any,
    batch: int = 0,
    tokens: Any = None,
    title: str | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> go.Figure:
    """Heatmap of scores [layer, pos] (e.g. `patch_resid_by_layer_and_position`, attribution).

    layout:    the TokenLayout of the prompts (hover text of prompt `batch`).
    tokens:    list of strings, or a model / tokenizer to decode `layout.input_ids[batch]`; None shows ids.
    layers:    row labels (default 0..n-1); positions: the sequence position of each column (default 0..pos-1).
    """
    z = _np(scores)
    if z.ndim != 2:
        raise ValueError(f"scores must be [layer, pos], got shape {z.shape}")
    n_layers, n_cols = z.shape
    layers = list(range(n_layers)) if layers is None else list(layers)
    positions = list(range(n_cols)) if positions is None else list(positions)
    if len(layers) != n_layers or len(positions) != n_cols:
        raise ValueError("layers / positions labels do not match the scores' shape")
    strs = token_strings(layout, batch, tokens)
    col_text = [f"{strs[p]!r}<br>{layout.describe(batch, p)}" for p in positions]
    text = [[f"layer {layer}<br>{col_text[j]}<br>score {z[i, j]:.4g}" for j in range(n_cols)] for i, layer in enumerate(layers)]
    fig = go.Figure(go.Heatmap(z=z, x=positions, y=layers, text=text, hoverinfo="text", **_zmid(z)))
    is_img = layout.is_image[batch]
    ticks = [p for p in positions if not bool(is_img[p])]
    fig.update_layout(
        title=title, xaxis_title="position", yaxis_title="layer",
        xaxis=dict(tickmode="array", tickvals=ticks, ticktext=[strs[p] for p in ticks], tickangle=-60),
    )
    return fig


def _image_array(image: Any) -> np.ndarray:
    """PIL image, HWC uint8 / float array, or CHW tensor (any range) -> HWC uint8."""
    if isinstance(image, Tensor):
        arr = image.detach().float().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros(arr.shape) if hi <= lo else (arr - lo) / (hi - lo)
        arr = (arr * 255).round().astype(np.uint8)
    return arr[..., :3]


def token_grid(scores_per_pos: Any, layout: Any, batch: int = 0, image: int = 0, crop: int = 0) -> np.ndarray:
    """Scores of one image's tokens of `crop` arranged on its patch grid [rows, cols] (NaN where no token)."""
    s = _np(scores_per_pos)
    if s.ndim == 2:
        s = s[batch]
    rows, cols = layout.grids[batch][image][crop]
    grid = np.full((rows, cols), np.nan)
    sel = (layout.image_index[batch] == image) & (layout.crop[batch] == crop) & (layout.col[batch] >= 0) & (layout.row[batch] >= 0)
    for p in sel.nonzero().flatten().tolist():
        grid[int(layout.row[batch, p]), int(layout.col[batch, p])] = s[p]
    return grid


def plot_image_overlay(
    scores_per_pos: Any,
    layout: Any,
    image: Any,
    batch: int = 0,
    image_index: int = 0,
    crop: int = 0,
    opacity: float = 0.55,
    title: str | None = None,
) -> go.Figure:
    """Paint per-token scores ([pos] for prompt `batch`, or [batch, pos]) back onto the picture.

    The tokens of image `image_index`, crop `crop` (0 = the base grid) are placed at their (row, col) in the
    layout's grid, and the grid is stretched over the picture (PIL image, HWC array or CHW tensor) as a
    semi-transparent heatmap; hover shows row / col / score.
    """
    grid = token_grid(scores_per_pos, layout, batch, image_index, crop)
    arr = _image_array(image)
    h, w = arr.shape[:2]
    rows, cols = grid.shape
    dy, dx = h / rows, w / cols
    fig = go.Figure(go.Image(z=arr, hoverinfo="skip"))
    text = [[f"row {r} col {c}<br>score {grid[r, c]:.4g}" for c in range(cols)] for r in range(rows)]
    fig.add_trace(go.Heatmap(
        z=grid, x0=dx / 2 - 0.5, dx=dx, y0=dy / 2 - 0.5, dy=dy, opacity=opacity, text=text, hoverinfo="text",
        **_zmid(grid),
    ))
    fig.update_layout(title=title, xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed", scaleanchor="x"))
    return fig


def plot_heads(
    scores: Any,
    title: str | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> go.Figure:
    """Heatmap of per-head scores [layer, head] (patch_heads, head attribution); hover names "L{l}H{h}"."""
    z = _np(scores)
    if z.ndim != 2:
        raise ValueError(f"scores must be [layer, head], got shape {z.shape}")
    layers = list(range(z.shape[0])) if layers is None else list(layers)
    heads = list(range(z.shape[1])) if heads is None else list(heads)
    text = [[f"L{layer}H{h}<br>score {z[i, j]:.4g}" for j, h in enumerate(heads)] for i, layer in enumerate(layers)]
    fig = go.Figure(go.Heatmap(z=z, x=heads, y=layers, text=text, hoverinfo="text", **_zmid(z)))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", xaxis=dict(dtick=1), yaxis=dict(dtick=1))
    return fig


def plot_by_layer(scores: Any, title: str | None = None, layers: Sequence[int] | None = None) -> go.Figure:
    """Line plot of one score per layer ([layer]), or several named series ({name: [layer]})."""
    series = scores if isinstance(scores, Mapping) else {"score": scores}
    fig = go.Figure()
    for name, values in series.items():
        y = _np(values)
        x = list(range(len(y))) if layers is None else list(layers)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=str(name)))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="score", showlegend=len(series) > 1)
    return fig


def plot_effect_table(table: Mapping[str, Any], title: str | None = None, yaxis_title: str = "metric") -> go.Figure:
    """Bar chart of {condition: value}. A value may be a number or a per-prompt tensor / array (bar = mean,
    error bar = standard error)."""
    names, means, errs = [], [], []
    for name, value in table.items():
        v = _np(value).reshape(-1)
        names.append(str(name))
        means.append(float(np.nanmean(v)) if v.size else float("nan"))
        errs.append(float(np.nanstd(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0)
    bar = go.Bar(x=names, y=means, error_y=dict(type="data", array=errs, visible=any(e > 0 for e in errs)),
                 text=[f"{m:.3g}" for m in means], textposition="outside")
    fig = go.Figure(bar)
    fig.update_layout(title=title, xaxis_title="condition", yaxis_title=yaxis_title)
    return fig


__all__ = ["plot_layer_position", "plot_image_overlay", "plot_heads", "plot_by_layer", "plot_effect_table",
           "token_strings", "token_grid"]
