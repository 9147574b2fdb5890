"""EAP-IG with an adaptive, per-prompt step count, and the completeness error of every EAP / EAP-IG graph.

Why adaptive. On a trained model a prompt's metric along the interpolation path clean -> corrupt often flips
almost like a step (on the Shapes organisms within 0.001-0.05 of the path, at a different place for every
prompt). The integrand of integrated gradients is then a spike, and a fixed grid of m points either hits it
(the scores are several times too large) or misses it (too small): on shapes_qwen2_vl the edge embed_image ->
L1H0.k (exact -41.15) scores -249 with m = 3, -51 with m = 5, -142 with m = 6.

What we do. The graph's inputs are interpolated with a separate fraction alpha_b for every prompt b, so each
prompt gets its own grid. At every grid point one forward gives the prompt's metric M_b(alpha) and one backward
its receivers' gradients; the input edges' scores at that point sum to dM_b/dalpha (`analyses.completeness`).
The scores are the trapezoid rule over each prompt's grid, and each interval [a, c] has a free error estimate:
|(c - a) (dM/dalpha(a) + dM/dalpha(c)) / 2 - (M(c) - M(a))|. Starting from a uniform grid, every round bisects
each prompt's worst interval (one batched forward and backward for all prompts), until the completeness error
(`Completeness.error()`: sum_b |sum of input scores_b - total_b| / sum_b |total_b|) is under `tol` or every
prompt has `max_steps` points; then it warns. The grid follows the flip, so a step of width w costs about
log2(1 / w) extra points instead of 1 / w.

Per-prompt grids need to know which prompt each vision activation belongs to (``image_path=True``): one row per
prompt (one image each, LLaVA), or Qwen's packed tower with one image per prompt (``image_grid_thw``). Otherwise
every prompt shares one grid, refined where the summed interval error is largest.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .completeness import Completeness
from .toolkit import Metric, progress_bar
from .toolkit.metric import as_float, metric_values
from .edge_graph import EdgeGraph, _is_edge, _is_vision, deepstack_layers, node_activations, node_names, receiver_names

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


def input_nodes(nodes: Sequence[str], image_path: bool) -> list[str]:
    """The graph's inputs (the nodes EAP-IG interpolates), whose edges form a cut: their scores sum to the total."""
    first = ("V.embed", "embed_text") if image_path else ("embed_image", "embed_text")
    return [u for u in nodes if u in first or u.startswith("DS")]


def vision_prompt_index(model: "HookedVLM", inputs: dict[str, Any], like: Tensor) -> Tensor | None:
    """For a vision activation [rows, patches, d]: the prompt of each (row, patch), flattened [rows * patches]; None
    where rows do not map to prompts (several images or crops per prompt)."""
    ids = inputs["input_ids"]
    b = ids.shape[0]
    rows, patches = like.shape[0], like.shape[1]
    n_img = (ids == model.cfg.image_token_id).sum(-1)
    if rows == b and bool((n_img == n_img[0]).all()) and int(n_img[0]) > 0:
        return torch.arange(b).repeat_interleave(patches)
    thw = inputs.get("image_grid_thw")
    if rows == 1 and thw is not None and thw.shape[0] == b and bool((n_img > 0).all()):
        sizes = thw.long().prod(-1).cpu()
        if int(sizes.sum()) == patches:
            return torch.arange(b).repeat_interleave(sizes)
    return None


def prompt_sums(vals: Tensor, index: Tensor, b: int) -> Tensor:
    """[..., rows * patches] -> [..., b]: sum over each prompt's vision elements."""
    out = torch.zeros(*vals.shape[:-1], b, dtype=vals.dtype)
    return out.index_add_(-1, index.to(vals.device), vals)


def _setup(model: "HookedVLM", clean: dict[str, Any], corrupt: dict[str, Any], metric: Metric, image_path: bool,
           fwd_hooks: Sequence[tuple[str, Callable]]) -> dict[str, Any]:
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        clean_logits, acts_c = node_activations(model, clean, image_path=image_path)
        corrupt_logits, acts_x = node_activations(model, corrupt, image_path=image_path)
        _, cc = model.run_with_cache(**clean, names_filter=["hook_embed"])
        _, cx = model.run_with_cache(**corrupt, names_filter=["hook_embed"])
    nodes, recv = node_names(model, image_path=image_path), receiver_names(model, image_path=image_path)
    for u in nodes:
        if _is_vision(u) and acts_x[u].shape != acts_c[u].shape:
            raise ValueError(f"{u}: the clean run gives shape {tuple(acts_c[u].shape)}, the corrupt run "
                             f"{tuple(acts_x[u].shape)}; image-path EAP needs the same image sizes / crops")
    return dict(acts_c=acts_c, acts_x=acts_x, e_c=cc["hook_embed"], e_x=cx["hook_embed"], nodes=nodes, recv=recv,
                clean_v=metric_values(metric, clean_logits), corrupt_v=metric_values(metric, corrupt_logits))


def _evaluate(model: "HookedVLM", clean: dict[str, Any], metric: Metric, s: dict[str, Any], alpha: Tensor,
              vidx: Tensor | None, image_path: bool, per_position: bool,
              fwd_hooks: Sequence[tuple[str, Callable]]) -> tuple[Tensor, Tensor, Tensor | None]:
    """One point of every prompt's path (alpha [B]): (metric [B], decoder scores [U, V, B(, P)], vision scores
    [U_vis, V_vis, B] (or [U_vis, V_vis] summed over the batch where vidx is None); None without the image path)."""
    from .edges import receiver_gradients

    acts_c, acts_x, nodes, recv = s["acts_c"], s["acts_x"], s["nodes"], s["recv"]
    a = alpha.to(s["e_c"].dtype)
    ab = a.view(-1, 1, 1)
    hooks = list(fwd_hooks)
    if image_path:
        v_c, v_x = acts_c["V.embed"], acts_x["V.embed"]
        av = a[vidx].view(*v_c.shape[:2], 1) if vidx is not None else a[0]
        ve = v_c + av.to(v_c.device, v_c.dtype) * (v_x - v_c)
        hooks.append(("vision.blocks.0.hook_resid_pre", lambda x, hook=None: ve.to(x.device, x.dtype)))
    for l in deepstack_layers(model):
        ds = acts_c[f"DS{l}"] + ab.to(acts_c[f"DS{l}"].device) * (acts_x[f"DS{l}"] - acts_c[f"DS{l}"])
        hooks.append((f"blocks.{l}.hook_deepstack", lambda x, hook=None, ds=ds: ds.to(x.device, x.dtype)))
    e_c, e_x = s["e_c"], s["e_x"]
    values, grads = receiver_gradients(model, clean, metric, embed=e_c + ab.to(e_c.device) * (e_x - e_c),
                                       fwd_hooks=hooks, image_path=image_path)
    n = model.cfg.n_layers
    vnodes, vrecv = [u for u in nodes if _is_vision(u)], [v for v in recv if _is_vision(v)]
    dnodes, drecv = nodes[len(vnodes):], recv[len(vrecv):]
    diff = torch.stack([acts_x[u] - acts_c[u] for u in dnodes])
    grad = torch.stack([grads[v] for v in drecv])
    dec = as_float(torch.einsum("ubpd,vbpd->uvbp" if per_position else "ubpd,vbpd->uvb", diff, grad.to(diff.dtype)))
    valid = torch.tensor([[_is_edge(u, v, n) for v in drecv] for u in dnodes])
    dec = dec.masked_fill(~valid.view(*valid.shape, *[1] * (dec.ndim - 2)), float("nan"))
    vis = None
    if image_path:
        vdiff = torch.stack([(acts_x[u] - acts_c[u]).flatten(0, 1) for u in vnodes])  # [U, N, d]
        vgrad = torch.stack([grads[v].flatten(0, 1) for v in vrecv]).to(vdiff.dtype)  # [V, N, d]
        if vidx is not None:
            vis = prompt_sums(as_float(torch.einsum("und,vnd->uvn", vdiff, vgrad)), vidx, alpha.shape[0])
        else:
            vis = as_float(torch.einsum("und,vnd->uv", vdiff, vgrad))
        vvalid = torch.tensor([[_is_edge(u, v, n) for v in vrecv] for u in vnodes])
        vis = vis.masked_fill(~vvalid.view(*vvalid.shape, *[1] * (vis.ndim - 2)), float("nan"))
    return as_float(values), dec, vis


def graph_completeness(nodes: list[str], receivers: list[str], dec: Tensor, vis: Tensor | None, clean_v: Tensor,
                       corrupt_v: Tensor, image_path: bool) -> Completeness:
    """Completeness of scores [U, V, B(, P)] (decoder block, per prompt) and vision scores [U_vis, V_vis, B] (or
    batch sums [U_vis, V_vis], then only the batch mean is checked)."""
    n_vis = sum(_is_vision(u) for u in nodes)
    inputs = input_nodes(nodes, image_path)
    rows = [i - n_vis for i, u in enumerate(nodes) if u in inputs and not _is_vision(u)]
    d = dec if dec.ndim == 3 else dec.sum(-1)
    est = d[rows].nansum((0, 1))  # [B]
    total = corrupt_v - clean_v
    if vis is not None and "V.embed" in inputs:
        row = vis[nodes.index("V.embed")].nansum(0)
        if row.ndim == 0:  # batch sum only
            return Completeness(est.mean() + row / clean_v.shape[0], total.mean(), per_prompt=False)
        est = est + row
    return Completeness(est, total)


def _weights(alphas: list[Tensor]) -> Tensor:
    """Trapezoid weights [n_points, B] from each prompt's grid (alphas[k][b]: point k of prompt b)."""
    a = torch.stack(alphas)  # [K, B]
    order = a.argsort(0)
    s = a.gather(0, order)
    gaps = s.diff(dim=0)
    w_sorted = torch.zeros_like(s)
    w_sorted[:-1] += gaps / 2
    w_sorted[1:] += gaps / 2
    return torch.zeros_like(a).scatter_(0, order, w_sorted)


def _interval_errors(alphas: list[Tensor], values: list[Tensor], slopes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per prompt and interval of its sorted grid: (|trapezoid of dM/dalpha - (M(c) - M(a))| [K-1, B], the
    interval's midpoint [K-1, B])."""
    a, m, g = torch.stack(alphas), torch.stack(values), torch.stack(slopes)
    order = a.argsort(0)
    a, m, g = a.gather(0, order), m.gather(0, order), g.gather(0, order)
    width = a.diff(dim=0)
    trap = width * (g[1:] + g[:-1]) / 2
    return (trap - m.diff(dim=0)).abs(), (a[1:] + a[:-1]) / 2


def adaptive_eap_ig(model: "HookedVLM", clean: dict[str, Any], corrupt: dict[str, Any], metric: Metric, *,
                    tol: float = 0.05, start: int = 5, max_steps: int = 64, per_prompt: bool = False,
                    per_position: bool = False, image_path: bool = False,
                    fwd_hooks: Sequence[tuple[str, Callable]] = (), progress: bool = False) -> EdgeGraph:
    """EAP-IG whose grid grows per prompt until the completeness error is under `tol` (see the module docstring).
    `start` intervals on a uniform grid first (start + 1 points), at most `max_steps` points per prompt; warns
    (UserWarning) when the bound is not reached. The graph's `steps` is the number of points per prompt and its
    `completeness` the final error."""
    if start < 1 or max_steps < start + 1:
        raise ValueError(f"need start >= 1 and max_steps >= start + 1 (the uniform grid has start + 1 points), got "
                         f"start={start}, max_steps={max_steps}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if image_path and (per_prompt or per_position):
        raise ValueError("image_path=True gives batch-mean scores only: per_prompt / per_position cannot be combined "
                         "with it")
    s = _setup(model, clean, corrupt, metric, image_path, fwd_hooks)
    b = clean["input_ids"].shape[0]
    vidx = vision_prompt_index(model, clean, s["acts_c"]["V.embed"]) if image_path else None
    shared = image_path and vidx is None
    nodes, recv = s["nodes"], s["recv"]
    inputs = input_nodes(nodes, image_path)
    alphas: list[Tensor] = []
    values: list[Tensor] = []
    slopes: list[Tensor] = []
    decs: list[Tensor] = []
    viss: list[Tensor | None] = []
    total = s["corrupt_v"] - s["clean_v"]

    def run(alpha: Tensor, positions: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        return _evaluate(model, clean, metric, s, alpha, vidx, image_path, positions, fwd_hooks)

    def add(alpha: Tensor) -> None:
        v, dec, vis = run(alpha, False)
        slope = graph_completeness(nodes, recv, dec, vis if not shared else None, s["clean_v"], s["corrupt_v"],
                                   image_path).estimate
        if shared:  # the tower's input edges are batch sums: spread over prompts evenly for the stopping rule
            slope = slope + vis[nodes.index("V.embed")].nansum() / b
        alphas.append(alpha)
        values.append(v)
        slopes.append(slope)
        decs.append(dec)
        viss.append(vis)

    def error() -> float:
        est = (_weights(alphas) * torch.stack(slopes)).sum(0)
        if shared:
            return float((est.mean() - total.mean()).abs() / total.mean().abs())
        return float((est - total).abs().sum() / total.abs().sum())

    bar = progress_bar(range(max_steps), desc="EAP-IG (adaptive)", progress=progress)
    it = iter(bar)
    for k in range(start + 1):
        add(torch.full((b,), k / start, dtype=torch.float64))
        next(it, None)
    err = error()
    while err > tol and len(alphas) < max_steps:
        errs, mids = _interval_errors(alphas, values, slopes)
        if shared:
            i = int(errs.sum(1).argmax())
            alpha = mids[i]
        else:
            alpha = mids.gather(0, errs.argmax(0, keepdim=True))[0]
        add(alpha)
        next(it, None)
        err = error()
    if hasattr(bar, "close"):
        bar.close()
    w = _weights(alphas)  # [K, B]
    if per_position:  # the grid is fixed now: a second pass keeps the position axis
        dec = sum(w[k][:, None] * run(a, True)[1].nan_to_num() for k, a in enumerate(alphas))
        dec = dec.masked_fill(torch.isnan(decs[0])[..., None], float("nan"))
    else:
        dec = sum(w[k].to(decs[k].dtype) * decs[k] for k in range(len(alphas)))
    vis = None
    if image_path:
        vis = (sum(w[k] * viss[k] for k in range(len(alphas))) if not shared
               else sum(float(w[k, 0]) * viss[k] for k in range(len(alphas))))
    comp = graph_completeness(nodes, recv, dec, vis, s["clean_v"], s["corrupt_v"], image_path)
    steps = len(alphas)
    if err > tol:
        warnings.warn(f"EAP-IG did not reach the completeness bound: error {err:.3f} > tol {tol} with max_steps="
                      f"{max_steps} points per prompt (sum of input-edge scores {float(comp.estimate.mean()):+.4g} "
                      f"vs total effect {float(total.mean()):+.4g}); raise max_steps or treat the scores as rough",
                      UserWarning, stacklevel=2)
    scores, clean_v, corrupt_v = dec, s["clean_v"], s["corrupt_v"]
    if not per_prompt:
        scores, clean_v, corrupt_v = scores.mean(2), clean_v.mean(), corrupt_v.mean()
    if image_path:
        full = torch.full((len(nodes), len(recv)), float("nan"), dtype=scores.dtype)
        n_vn, n_vr = sum(map(_is_vision, nodes)), sum(map(_is_vision, recv))
        full[:n_vn, :n_vr] = (vis.sum(-1) if vis.ndim == 3 else vis).to(scores.dtype) / b
        full[n_vn:, n_vr:] = scores
        scores = full
    return EdgeGraph(scores, nodes, recv, clean_v, corrupt_v, f"EAP-IG(adaptive, {steps} points)",
                     per_position=per_position, completeness=comp, steps=steps)
