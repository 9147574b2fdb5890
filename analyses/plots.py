"""Shared plotly figures for the analyses. Every function returns a `plotly.graph_objects.Figure` (never shows it).

* `plot_layer_position(scores [layer, pos], layout)`: heatmap with hover text naming the token and, for image
  tokens, image / crop / row / col (`TokenLayout.describe`).
* `plot_image_overlay(scores [pos], layout, image)`: per-image-token scores painted back onto the picture
  (crop 0 = the base grid) as a semi-transparent heatmap.
* `plot_heads(scores [layer, head])`, `plot_by_layer(scores [layer])`, `plot_effect_table({name: value})`.
* `plot_attention_heads(cache, layout, [(layer, head), ...])`: one attention-pattern heatmap per chosen head, hover
  naming the query and key tokens (image / crop / row / col for image tokens).
* `attention_to_image(cache, layout, layer, head, query_pos)`: one query's attention to each image token on the
  image's [rows, cols] grid; `plot_attention_to_image` paints it on the picture.
* `circuitsvis_heads(cache, layout, heads)`: the same heads in circuitsvis (optional: `pip install circuitsvis`).

Scores may be tensors, arrays, or the analyses' result objects (anything with a `.scores` tensor, e.g.
`PatchResult`, `AttributionResult`, `EdgeGraph`; see `scores_of`). Heatmaps carry an explicit colour range:
pass `zmin=` / `zmax=`, or `like=other_fig` to share another figure's, so two methods' maps compare by eye.
Static export: `fig.write_image("f.png")` needs the optional `kaleido` package and a Chrome / Chromium
(docs/coming_from_transformerlens.md, "Plots in notebooks"); `fig.write_html("f.html")` needs nothing.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

DIVERGING = "RdBu"


def scores_of(x: Any) -> Any:
    """The values to plot: a tensor / array / list as is, or the `.scores` of an analysis result object
    (`analyses.patching.PatchResult`, `AttributionResult`, `EdgeGraph`, ...). A `.scores` dict with one entry
    gives that entry; with several, pass the one you want (e.g. `result.scores["z"]`)."""
    if isinstance(x, (Tensor, np.ndarray, list, tuple, float, int)) or not hasattr(x, "scores"):
        return x
    s = x.scores
    if isinstance(s, Mapping):
        if len(s) != 1:
            raise ValueError(f"{type(x).__name__}.scores holds {sorted(s)}: pass one of them, e.g. result.scores[{next(iter(s))!r}]")
        s = next(iter(s.values()))
    return s


def _np(x: Any) -> np.ndarray:
    x = scores_of(x)
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def _zmid(values: np.ndarray, zmin: float | int | None = None, zmax: float | int | None = None, like: Any = None) -> dict[str, Any]:
    """Colour settings of a heatmap, with an explicit range so that figures can share it.

    Default: a diverging scale centred on 0 with a symmetric range when the values have both signs, else Viridis
    over [min, max]. `zmin` / `zmax` fix the range (with both signs inside it: diverging, centred on 0).
    `like=fig` copies the colour settings of another figure's first heatmap, so two methods' heatmaps can be
    compared by eye."""
    if like is not None:
        ref = next((t for t in like.data if t.type == "heatmap"), None)
        if ref is None or ref.zmin is None:
            raise ValueError("like= must be a figure made by analyses.plots with a heatmap (it carries zmin / zmax)")
        return dict(colorscale=ref.colorscale, zmin=ref.zmin, zmax=ref.zmax, zmid=ref.zmid, reversescale=ref.reversescale)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if zmin is None and zmax is None and lo < 0 < hi:
        zmax = max(-lo, hi)
        zmin = -zmax
    zmin, zmax = (lo if zmin is None else float(zmin)), (hi if zmax is None else float(zmax))
    if zmin >= zmax:
        zmax = zmin + 1.0  # constant values: any range that shows them
    if zmin < 0 < zmax:
        return dict(colorscale=DIVERGING, zmid=0.0, zmin=zmin, zmax=zmax, reversescale=True)
    return dict(colorscale="Viridis", zmin=zmin, zmax=zmax)


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
    zmin: float | int | None = None,
    zmax: float | int | None = None,
    like: go.Figure | None = None,
) -> go.Figure:
    """Heatmap of scores [layer, pos] (e.g. `patch_resid_by_layer_and_position`, attribution): a tensor / array or
    a result object with `.scores` (see `scores_of`).

    layout:    the TokenLayout of the prompts (hover text of prompt `batch`).
    zmin, zmax, like: a fixed colour range, or `like=other_fig` to share another figure's (see `_zmid`).
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
    fig = go.Figure(go.Heatmap(z=z, x=positions, y=layers, text=text, hoverinfo="text", **_zmid(z, zmin, zmax, like)))
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
    zmin: float | int | None = None,
    zmax: float | int | None = None,
    like: go.Figure | None = None,
) -> go.Figure:
    """Paint per-token scores ([pos] for prompt `batch`, or [batch, pos]; or a result object with `.scores`)
    back onto the picture. zmin / zmax / like: a shared colour range (see `_zmid`).

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
        **_zmid(grid, zmin, zmax, like),
    ))
    fig.update_layout(title=title, xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed", scaleanchor="x"))
    return fig


def plot_heads(
    scores: Any,
    title: str | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    zmin: float | int | None = None,
    zmax: float | int | None = None,
    like: go.Figure | None = None,
) -> go.Figure:
    """Heatmap of per-head scores [layer, head] (patch_heads, head attribution; a tensor or a result object with
    `.scores`); hover names "L{l}H{h}". zmin / zmax / like: a shared colour range (see `_zmid`)."""
    z = _np(scores)
    if z.ndim != 2:
        raise ValueError(f"scores must be [layer, head], got shape {z.shape}")
    layers = list(range(z.shape[0])) if layers is None else list(layers)
    heads = list(range(z.shape[1])) if heads is None else list(heads)
    text = [[f"L{layer}H{h}<br>score {z[i, j]:.4g}" for j, h in enumerate(heads)] for i, layer in enumerate(layers)]
    fig = go.Figure(go.Heatmap(z=z, x=heads, y=layers, text=text, hoverinfo="text", **_zmid(z, zmin, zmax, like)))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", xaxis=dict(dtick=1), yaxis=dict(dtick=1))
    return fig


def plot_by_layer(scores: Any, title: str | None = None, layers: Sequence[int] | None = None) -> go.Figure:
    """Line plot of one score per layer ([layer]), or several named series ({name: [layer]}); each may be a result
    object with `.scores`."""
    scores = scores_of(scores)
    series = scores if isinstance(scores, Mapping) else {"score": scores}
    fig = go.Figure()
    for name, values in series.items():
        y = _np(values)
        x = list(range(len(y))) if layers is None else list(layers)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=str(name)))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="score", showlegend=len(series) > 1)
    return fig


def plot_effect_table(table: Mapping[str, Any], title: str | None = None, yaxis_title: str = "metric") -> go.Figure:
    """Bar chart of {condition: value}. A value may be a number, a per-prompt tensor / array (bar = mean,
    error bar = standard error) or a result object with `.scores`."""
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


__all__ = ["scores_of", "plot_layer_position", "plot_image_overlay", "plot_heads", "plot_by_layer", "plot_effect_table",
           "token_strings", "token_grid", "plot_attention_heads", "attention_to_image", "plot_attention_to_image",
           "circuitsvis_heads"]


# --- attention patterns of chosen heads --------------------------------------------------------------------------

def _pattern(patterns: Any, layer: int) -> Tensor | np.ndarray:
    """`blocks.{layer}.attn.hook_pattern` [batch, head, q, k] from a cache / mapping, with a clear error if absent."""
    name = f"blocks.{layer}.attn.hook_pattern"
    try:
        return patterns[name]
    except (KeyError, IndexError, TypeError) as err:
        raise KeyError(f"{name} is not in the cache: run_with_cache(..., names_filter=...) must keep it") from err


def _query_positions(layout: Any, batch: int, query_pos: Any) -> list[int]:
    """An int, a list of ints, or a bool mask ([pos] or [batch, pos], e.g. `layout.final_token()`) -> positions."""
    if isinstance(query_pos, (int, np.integer)):
        return [int(query_pos)]
    if isinstance(query_pos, Tensor) and query_pos.dtype == torch.bool:
        mask = query_pos[batch] if query_pos.ndim == 2 else query_pos
        return mask.nonzero().flatten().tolist()
    if isinstance(query_pos, Tensor):
        return [int(p) for p in query_pos.flatten().tolist()]
    return [int(p) for p in query_pos]


def _real_positions(layout: Any, batch: int) -> list[int]:
    """Positions of prompt `batch` that are not padding."""
    return layout.attention_mask[batch].bool().nonzero().flatten().tolist()


def plot_attention_heads(
    patterns: Any,
    layout: Any,
    heads: Sequence[tuple[int, int]],
    batch: int = 0,
    query_positions: Any = None,
    title: str | None = None,
    tokens: Any = None,
    cols: int = 2,
    zmax: float | int | None = None,
    like: go.Figure | None = None,
) -> go.Figure:
    """One heatmap per chosen head of its attention pattern (query rows x key columns), in a grid of subplots.

    patterns:        an ActivationCache or mapping with `blocks.{l}.attn.hook_pattern` [batch, head, q, k].
    heads:           [(layer, head), ...]; trace i (`fig.data[i]`) is head `heads[i]`, titled "L{l}H{h}".
    query_positions: the query rows to show (int, list, or bool mask [batch, pos] / [pos] such as
                     `layout.final_token()`); default every non-padding position. Key columns are every
                     non-padding position. Each trace's x / y are the sequence positions of its columns / rows.
    tokens:          token labels (see `token_strings`); hover shows query and key token and, for image tokens,
                     image / crop / row / col (`TokenLayout.describe`).
    """
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("heads must name at least one (layer, head)")
    from plotly.subplots import make_subplots

    keys = _real_positions(layout, batch)
    queries = keys if query_positions is None else _query_positions(layout, batch, query_positions)
    strs = token_strings(layout, batch, tokens)
    label = {p: f"{strs[p]!r}, {layout.describe(batch, p)}" for p in sorted(set(keys) | set(queries))}
    zs = []
    for layer, head in heads:
        pat = _np(_pattern(patterns, layer)[batch, head])
        zs.append(pat[np.ix_(queries, keys)])
    if like is not None:
        zmax = like.layout.coloraxis.cmax
    if zmax is None:
        zmax = max(float(np.nanmax(z)) if z.size else 0.0 for z in zs) or 1.0

    cols = max(1, min(cols, len(heads)))
    rows = -(-len(heads) // cols)
    names = [f"L{layer}H{head}" for layer, head in heads]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=0.12 if rows > 1 else 0.0)
    is_img = layout.is_image[batch]
    ticks = [p for p in keys if not bool(is_img[p])]
    qticks = [p for p in queries if not bool(is_img[p])]
    for i, ((layer, head), z) in enumerate(zip(heads, zs)):
        text = [[f"{names[i]}<br>query {label[q]}<br>key {label[k]}<br>attention {z[a, b]:.4g}"
                 for b, k in enumerate(keys)] for a, q in enumerate(queries)]
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Heatmap(z=z, x=keys, y=queries, text=text, hoverinfo="text", name=names[i],
                                 coloraxis="coloraxis"), row=r, col=c)
        fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=[strs[p] for p in ticks], tickangle=-60,
                         tickfont=dict(size=9), row=r, col=c)
        fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=qticks, ticktext=[strs[p] for p in qticks],
                         tickfont=dict(size=9), row=r, col=c)
    fig.update_layout(title=title, coloraxis=dict(colorscale="Blues", cmin=0.0, cmax=zmax, colorbar_title="attn"),
                      height=120 + 300 * rows)
    return fig


def attention_to_image(
    patterns: Any,
    layout: Any,
    layer: int,
    head: int,
    query_pos: Any,
    batch: int = 0,
    image: int = 0,
    crop: int = 0,
) -> np.ndarray:
    """Attention from one query position of head L{layer}H{head} to each token of image `image` (crop `crop`, 0 =
    the base grid), on the image's patch grid [rows, cols] (NaN where no token; see `token_grid`).

    query_pos: a position, or a bool mask with one True per prompt (e.g. `layout.final_token()`).
    The grid sums (np.nansum) to the query's attention mass on those image tokens. `plot_attention_to_image`
    paints the same scores on the picture (through `plot_image_overlay`).
    """
    return token_grid(_attention_row(patterns, layout, layer, head, query_pos, batch), layout, batch, image, crop)


def _attention_row(patterns: Any, layout: Any, layer: int, head: int, query_pos: Any, batch: int) -> np.ndarray:
    q = _query_positions(layout, batch, query_pos)
    if len(q) != 1:
        raise ValueError(f"query_pos must select exactly one position of prompt {batch}, got {q}")
    return _np(_pattern(patterns, layer)[batch, head, q[0]])


def plot_attention_to_image(
    patterns: Any,
    layout: Any,
    layer: int,
    head: int,
    query_pos: Any,
    picture: Any,
    batch: int = 0,
    image: int = 0,
    crop: int = 0,
    title: str | None = None,
) -> go.Figure:
    """`attention_to_image` painted on the picture (PIL image, HWC array or CHW tensor) with `plot_image_overlay`;
    the overlay's heatmap (`fig.data[1].z`) is that grid."""
    row = _attention_row(patterns, layout, layer, head, query_pos, batch)
    if title is None:
        title = f"L{layer}H{head}: attention to image {image} (total {np.nansum(token_grid(row, layout, batch, image, crop)):.3f})"
    return plot_image_overlay(row, layout, picture, batch=batch, image_index=image, crop=crop, title=title)


def circuitsvis_heads(
    patterns: Any,
    layout: Any,
    heads: Sequence[tuple[int, int]],
    batch: int = 0,
    tokens: Any = None,
) -> Any:
    """`circuitsvis.attention.attention_patterns` for the chosen heads of prompt `batch` (padding dropped).

    Optional: needs `pip install circuitsvis` (not a dependency of hooked_vlm)."""
    try:
        import circuitsvis.attention as cv_attention
    except ImportError as err:
        raise ImportError("circuitsvis_heads needs circuitsvis, which hooked_vlm does not install: "
                          "pip install circuitsvis") from err
    import inspect

    heads = [(int(l), int(h)) for l, h in heads]
    keep = _real_positions(layout, batch)
    strs = token_strings(layout, batch, tokens)
    attention = np.stack([_np(_pattern(patterns, l)[batch, h])[np.ix_(keep, keep)] for l, h in heads])
    kwargs: dict[str, Any] = dict(tokens=[strs[p] for p in keep], attention=attention)
    if "attention_head_names" in inspect.signature(cv_attention.attention_patterns).parameters:
        kwargs["attention_head_names"] = [f"L{l}H{h}" for l, h in heads]
    return cv_attention.attention_patterns(**kwargs)
