"""Edge attribution patching (EAP; Syed et al. 2023, arXiv 2310.10348) and EAP-IG (Hanna et al. 2024), over a
component graph of the decoder (optionally with the vision tower: ``image_path=True``), with edge-level patching
for exact effects and faithfulness.

Graph. Upstream nodes (each writes an additive term of the residual stream):
  ``embed_image`` (``hook_embed`` at image positions: the projector's output, i.e. the whole image path),
  ``embed_text`` (``hook_embed`` elsewhere), every head ``L{l}H{h}`` (its ``hook_result``) and every MLP
  ``MLP{l}`` (``hook_mlp_out``). The attention output bias is a constant, not a node.
  DeepStack models (Qwen3-VL) add ``DS{l}`` (``blocks.{l}.hook_deepstack``: image features added after block l's
  MLP; a graph input like ``embed_image``, written after ``MLP{l}``); with ``image_path=True`` they raise.
Receivers (each reads the residual stream):
  ``L{l}H{h}.q`` (query head h), ``L{l}H{g}.k`` / ``L{l}H{g}.v`` (KEY/VALUE head g: with grouped-query attention
  one kv head serves ``n_heads / n_kv_heads`` query heads), ``MLP{l}`` and ``logits``.
An edge u -> v exists when u writes before v reads: u in an earlier layer for attention receivers, heads of the
same layer and anything earlier for MLP receivers, everything for the logits.

Image path (``image_path=True`` on every function below; default False = the decoder graph above, unchanged).
The vision tower's residual is additive too: resid_post(K-1) = resid_pre(0) + sum_k (attn_out_k + mlp_out_k)
over the K blocks that run (with one vision feature layer the ViT towers stop after it; Qwen towers run every
block). Extra nodes, written before every decoder node:
  ``V.embed`` (``vision.blocks.0.hook_resid_pre``: the tower residual's input, for Qwen2.5-VL in window order),
  ``V{k}.attn`` (``vision.blocks.{k}.hook_attn_out``) and ``V{k}.mlp`` (``vision.blocks.{k}.hook_mlp_out``).
Extra receivers: ``V{k}.attn`` (the block's attention input ``ln1(resid_pre_k + delta)``: one receiver for q, k
and v of every head, recomputed at ``vision.blocks.{k}.attn.hook_q/k/v``), ``V{k}.mlp``
(``mlp(ln2(resid_mid_k + delta))`` at ``hook_mlp_out``) and ``projector`` (``delta`` added to the last running
block's ``hook_resid_post``, which only the projector reads). Edges: ``V.embed`` and ``V{j}.*`` -> ``V{k}.attn``
for j < k; those and ``V{k}.attn`` -> ``V{k}.mlp``; every tower node -> ``projector``. ``embed_image`` stays the
bridge into the decoder (no vision node has an edge into a decoder receiver), so ablating the projector's edges
changes ``embed_image``'s current value, which the decoder edges then carry. Vision activations are
[n_images_or_crops, patches, d_vision] (Qwen: [1, all patches, d_vision]); they do not map to prompts one to one,
so a vision edge's EAP score is summed over the whole batch and divided by the batch size B (a mean over prompts,
like the decoder scores), and ``per_prompt`` (and ``per_position``) scores raise with ``image_path=True``. Models
reading several vision feature layers raise (their projector reads several blocks' residuals).

Per-receiver inputs. q, k and v of a layer read ONE residual (through ln1), so the receivers are made separate
in the forward: the receiver's slice of ``hook_q`` / ``hook_k`` / ``hook_v`` is recomputed as
``{q,k,v}_proj(ln1(resid_pre + delta_v))[head]`` (MLPs: ``mlp(ln2(resid_mid + delta_v))`` at ``hook_mlp_out``;
logits: ``delta`` added to the final residual). With ``delta_v = 0`` the forward is unchanged; the gradient with
respect to ``delta_v`` is dM/d(input of v) along v's own path only (as TransformerLens's split-qkv input gives).

Scores (noising, gradients at the clean run):
    EAP(u -> v)    = sum over positions of (a_u(corrupt) - a_u(clean)) . dM/d(input of v) |clean
    EAP-IG(u -> v) = same with the gradient averaged over m runs whose ``hook_embed`` (and DeepStack additions)
                     is clean + (k/m) (corrupt - clean), k = 0..m-1 (left Riemann sum from the clean end, so m = 1
                     is EAP exactly)
With ``image_path=True`` EAP-IG interpolates the graph's INPUTS instead: ``V.embed`` and ``hook_embed`` at text
positions, while the image positions of ``hook_embed`` follow the tower (projector output) so that the vision
receivers keep a gradient; decoder-edge EAP-IG scores with m > 1 therefore differ from ``image_path=False``.
``per_position=True`` keeps a trailing position axis on decoder edges: score[..., p] = (a_u(corrupt) -
a_u(clean))[p] . grad_v[p], which sums over p to the ordinary score.
Each score estimates M(clean with only edge u -> v carrying the corrupt a_u) - M(clean), which `edge_effects`
computes exactly by edge patching (`patch_edges`): v's input becomes its current input plus
``a_u(source) - a_u(current)`` for every ablated edge u -> v. In a model that is linear from ``hook_embed`` to
the metric (MLPs zeroed, attention patterns and norm scales frozen) EAP equals the exact effects (tested).

Completeness: every graph carries `completeness` (`analyses.completeness`): the input edges' scores (a cut of the
graph) summed against the exact M(corrupt) - M(clean). ``eap_ig(steps="auto")`` (the default) refines each
prompt's interpolation grid until that error is under `tol` (`analyses.edge_ig`); ``steps=m`` keeps the fixed
left Riemann sum.

`prune` keeps the top-n edges by |score|; `faithfulness` runs the clean input with every OTHER edge ablated
(counterfactual: the corrupt run's a_u; mean: a_u averaged over the leading axis of the clean run: over prompts
per position, for vision nodes over images / crops per patch, so for Qwen's packed [1, patches, d] tower a no-op).
Ablating every edge with counterfactual values reproduces the corrupt run, keeping every edge the clean run (both
tested, with and without the image path). Not included: per-prompt and per-position scores of vision edges (they
raise), a connectivity clean-up of pruned graphs (dangling edges are kept as they are), and models with attention
post-norms (Gemma 3: per-head outputs are not additive terms of the residual stream; every entry point raises).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .toolkit import Metric, progress_bar
from .toolkit.hooks import frozen_parameters
from .toolkit.metric import as_float, metric_values
from .edge_graph import (Edge, EdgeGraph, _image_mask, _is_edge, _is_vision, _no_tower_run, deepstack_layers,
                         node_activations, node_names, receiver_names)
from .edge_patching import _edge_hooks
from .edge_ig import adaptive_eap_ig, graph_completeness, prompt_sums, vision_prompt_index

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


# ------------------------------------------------------------------------------------------- EAP / EAP-IG
def receiver_gradients(model: "HookedVLM", inputs: dict[str, Any], metric: Metric, embed: Tensor | None = None,
                       fwd_hooks: Sequence[tuple[str, Callable]] = (), *, image_path: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """(metric [batch], {receiver: dM/d(input of receiver)}) from one forward and one backward: decoder receivers
    [batch, pos, d_model], vision receivers (``image_path=True``) shaped like the vision residual; each gradient
    is of the metric SUMMED over the batch (for decoder receivers that is prompt b's own metric at row b).
    `embed` overrides ``hook_embed`` (EAP-IG's interpolation); with ``image_path=True`` only at text positions,
    so that the image positions keep the projector's output and the tower its gradient."""
    b, p = inputs["input_ids"].shape
    w = model.W_E
    leaves = {v: torch.zeros(b, p, model.cfg.d_model, dtype=w.dtype, device=w.device, requires_grad=True)
              for v in receiver_names(model)}
    vleaves: dict[str, Tensor] | None = {} if image_path else None
    hooks = list(fwd_hooks)
    if embed is not None and image_path:
        img = _image_mask(model, inputs)
        hooks.append(("hook_embed", lambda x, hook=None: torch.where(img.to(x.device), x, embed.to(x.device, x.dtype))))
    elif embed is not None:
        hooks.append(("hook_embed", lambda x, hook=None: embed.to(x.device, x.dtype)))
    hooks += _edge_hooks(model, inputs, None, None, leaves, image_path, vleaves)
    with torch.enable_grad(), frozen_parameters(model), model.hooks(fwd_hooks=hooks):
        values = metric(model(**inputs))
        if image_path:
            missing = [v for v in receiver_names(model, image_path=True) if _is_vision(v) and v not in vleaves]
            if missing:
                raise _no_tower_run()
            leaves = {v: vleaves[v] for v in receiver_names(model, image_path=True) if _is_vision(v)} | leaves
        grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    return values.detach(), {v: (g if g is not None else torch.zeros_like(leaves[v])).detach()
                             for v, g in zip(leaves, grads)}


def eap(
    model: "HookedVLM",
    clean: dict[str, Any],
    corrupt: dict[str, Any],
    metric: Metric,
    *,
    ig_steps: int | None = None,
    per_prompt: bool = False,
    per_position: bool = False,
    image_path: bool = False,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    progress: bool = False,
) -> EdgeGraph:
    """EAP scores of every edge (``ig_steps=m``: EAP-IG with m interpolation steps; see the module docstring).
    `fwd_hooks` are applied to every run first (e.g. to study a modified model).

    ``per_prompt``: a trailing batch axis. ``per_position``: a trailing position axis (decoder positions; the
    scores sum over it to the ordinary ones). ``image_path``: add the vision tower's nodes and receivers; its
    edges' scores are summed over the whole batch / B (images and crops do not map to prompts one to one in
    every family), so ``image_path`` with ``per_prompt`` or ``per_position`` raises ValueError.
    The graph's `completeness` compares the input edges' summed scores with M(corrupt) - M(clean)."""
    if image_path and (per_prompt or per_position):
        raise ValueError("image_path=True gives batch-mean scores only: vision activations do not map to prompts "
                         "(nor to decoder positions) one to one in every family, so per_prompt / per_position "
                         "cannot be combined with it")
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        clean_logits, acts_c = node_activations(model, clean, image_path=image_path)
        corrupt_logits, acts_x = node_activations(model, corrupt, image_path=image_path)
        if ig_steps is not None:
            _, cc = model.run_with_cache(**clean, names_filter=["hook_embed"])
            _, cx = model.run_with_cache(**corrupt, names_filter=["hook_embed"])
            e_c, e_x = cc["hook_embed"], cx["hook_embed"]
    clean_v, corrupt_v = metric_values(metric, clean_logits), metric_values(metric, corrupt_logits)
    nodes, recv = node_names(model, image_path=image_path), receiver_names(model, image_path=image_path)
    vnodes, vrecv = [u for u in nodes if _is_vision(u)], [v for v in recv if _is_vision(v)]
    for u in vnodes:
        if acts_x[u].shape != acts_c[u].shape:
            raise ValueError(f"{u}: the clean run gives shape {tuple(acts_c[u].shape)}, the corrupt run "
                             f"{tuple(acts_x[u].shape)}; image-path EAP needs the same image sizes / crops")
    if ig_steps is None:
        _, grads = receiver_gradients(model, clean, metric, fwd_hooks=fwd_hooks, image_path=image_path)
        method = "EAP"
    else:
        if ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
        grads = {}
        for k in progress_bar(range(ig_steps), desc="EAP-IG", progress=progress):
            hooks = list(fwd_hooks)
            if image_path:  # the tower's input is interpolated too; image positions of hook_embed follow it
                v_c, v_x = acts_c["V.embed"], acts_x["V.embed"]
                ve = v_c + (k / ig_steps) * (v_x - v_c)
                hooks.append(("vision.blocks.0.hook_resid_pre", lambda x, hook=None, ve=ve: ve.to(x.device, x.dtype)))
            for l in deepstack_layers(model):  # DeepStack additions are graph inputs too: interpolated like hook_embed
                ds = acts_c[f"DS{l}"] + (k / ig_steps) * (acts_x[f"DS{l}"] - acts_c[f"DS{l}"])
                hooks.append((f"blocks.{l}.hook_deepstack", lambda x, hook=None, ds=ds: ds.to(x.device, x.dtype)))
            _, g = receiver_gradients(model, clean, metric, embed=e_c + (k / ig_steps) * (e_x - e_c),
                                      fwd_hooks=hooks, image_path=image_path)
            for v in recv:
                grads[v] = g[v] if k == 0 else grads[v] + g[v]
        grads = {v: g / ig_steps for v, g in grads.items()}
        method = f"EAP-IG({ig_steps})"
    n = model.cfg.n_layers
    dnodes, drecv = nodes[len(vnodes):], recv[len(vrecv):]
    diff = torch.stack([acts_x[u] - acts_c[u] for u in dnodes])  # [U, B, P, D]
    grad = torch.stack([grads[v] for v in drecv])  # [V, B, P, D]
    eq = "ubpd,vbpd->uvbp" if per_position else "ubpd,vbpd->uvb"
    scores = as_float(torch.einsum(eq, diff, grad.to(diff.dtype)))
    valid = torch.tensor([[_is_edge(u, v, n) for v in drecv] for u in dnodes])
    scores = scores.masked_fill(~valid.view(*valid.shape, *[1] * (scores.ndim - 2)), float("nan"))
    vis_input = None
    if image_path:  # the tower's input row per prompt where images map to prompts, for the completeness check
        vidx = vision_prompt_index(model, clean, acts_c["V.embed"])
        d0 = (acts_x["V.embed"] - acts_c["V.embed"]).flatten(0, 1)
        g0 = torch.stack([grads[v].flatten(0, 1) for v in vrecv]).to(d0.dtype)
        vis_input = (prompt_sums(as_float(torch.einsum("nd,vnd->vn", d0, g0)), vidx, clean_v.shape[0])
                     if vidx is not None else as_float(torch.einsum("nd,vnd->v", d0, g0)))[None]
    comp = graph_completeness(nodes, recv, scores, vis_input, clean_v, corrupt_v, image_path)
    if not per_prompt:
        scores, clean_v, corrupt_v = scores.mean(2), clean_v.mean(), corrupt_v.mean()
    if image_path:  # per_prompt / per_position are off: scores [U_dec, V_dec]
        vdiff = torch.stack([(acts_x[u] - acts_c[u]).flatten() for u in vnodes])  # [U_vis, N]
        vgrad = torch.stack([grads[v].flatten() for v in vrecv])  # [V_vis, N]
        vscores = as_float((vdiff @ vgrad.to(vdiff.dtype).T) / clean["input_ids"].shape[0])
        vvalid = torch.tensor([[_is_edge(u, v, n) for v in vrecv] for u in vnodes])
        full = torch.full((len(nodes), len(recv)), float("nan"), dtype=scores.dtype)
        full[: len(vnodes), : len(vrecv)] = vscores.to(scores.dtype).masked_fill(~vvalid, float("nan"))
        full[len(vnodes) :, len(vrecv) :] = scores
        scores = full
    return EdgeGraph(scores, nodes, recv, clean_v, corrupt_v, method, per_position=per_position, completeness=comp,
                     steps=ig_steps)


def eap_ig(model: "HookedVLM", clean: dict[str, Any], corrupt: dict[str, Any], metric: Metric,
           steps: int | str = "auto", *, tol: float = 0.05, max_steps: int = 64, start: int = 5,
           **kwargs: Any) -> EdgeGraph:
    """EAP-IG. ``steps="auto"`` (default): each prompt's grid is refined until the completeness error is under
    `tol` (default 5%), from a uniform grid of `start` intervals to at most `max_steps` points per prompt, with the
    trapezoid rule; warns when the bound is not reached (`analyses.edge_ig`). ``steps=m``: the fixed left Riemann
    sum of m points (m = 1 is EAP). Either way the graph carries `completeness` and `steps`."""
    if steps == "auto":
        return adaptive_eap_ig(model, clean, corrupt, metric, tol=tol, max_steps=max_steps, start=start, **kwargs)
    if isinstance(steps, str) or not isinstance(steps, int):
        raise ValueError(f"steps must be 'auto' or a positive int, got {steps!r}")
    return eap(model, clean, corrupt, metric, ig_steps=steps, **kwargs)
