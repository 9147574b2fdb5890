"""The component graph of `analyses.edges` (EAP / EAP-IG) and `analyses.edge_patching`: node and receiver names,
which edges exist, and the nodes' activations. See `analyses.edges` for the graph's definition (nodes, receivers,
the image path)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hooked_vlm.vision.vit import ViTTower, hidden_state_index
from .toolkit import act_name
from .completeness import Completeness

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


Edge = tuple[str, str]


# ----------------------------------------------------------------------------------------------- the graph
def _feature_depth(layer: Any, n_blocks: int) -> int:
    if isinstance(layer, (list, tuple)):
        if len(layer) != 1:
            raise ValueError(f"the image-path graph needs a single vision feature layer, got vision_feature_layer="
                             f"{list(layer)} (the projector would read several blocks' residuals)")
        layer = layer[0]
    return hidden_state_index(int(layer), n_blocks)


def vision_depth(model: "HookedVLM", inputs: dict[str, Any] | None = None) -> int:
    """The number K of vision blocks that run (blocks 0..K-1 are in the image-path graph): every block for the Qwen
    towers; for the ViT towers (LLaVA, LLaVA-OneVision) the blocks up to the single vision feature layer."""
    tower = getattr(model, "vision", None)
    if tower is None or getattr(model.cfg, "vision", None) is None or not hasattr(tower, "blocks"):
        raise ValueError("image_path=True needs a model with a vision tower")
    n = len(tower.blocks)
    if not isinstance(tower, ViTTower):
        return n
    depth = _feature_depth(model.cfg.vision_feature_layer, n)
    if inputs is not None and inputs.get("vision_feature_layer") is not None:
        if _feature_depth(inputs["vision_feature_layer"], n) != depth:
            raise ValueError(f"the inputs override vision_feature_layer={inputs['vision_feature_layer']!r}; the "
                             f"image-path graph is built from model.cfg.vision_feature_layer="
                             f"{model.cfg.vision_feature_layer!r}")
    if depth == 0:
        raise ValueError("the vision feature layer is the tower's embedding: no vision block runs, so the image-path "
                         "graph would be empty")
    return depth


def _vision_nodes(k: int) -> list[str]:
    return ["V.embed"] + [f"V{i}.{s}" for i in range(k) for s in ("attn", "mlp")]


def _vision_receivers(k: int) -> list[str]:
    return [f"V{i}.{s}" for i in range(k) for s in ("attn", "mlp")] + ["projector"]


def _is_vision(name: str) -> bool:
    return name == "projector" or name.startswith("V")


def deepstack_layers(model: "HookedVLM") -> list[int]:
    """Decoder layers with a DeepStack addition (Qwen3-VL: `blocks.{l}.hook_deepstack`); [] for other families."""
    return list(model.cfg.deepstack_layers)


def check_additive_heads(model: "HookedVLM") -> None:
    """Raise unless every head's ``hook_result`` (and MLP output) is an additive term of the residual stream."""
    if any(getattr(b, "ln1_post", None) is not None or getattr(b, "ln2_post", None) is not None for b in model.blocks):
        raise ValueError(
            "edge attribution needs each head's output (hook_result) to be an additive term of the residual stream; "
            "with attention / MLP post-norms (Gemma 3's ln1_post / ln2_post) the heads are normalised together "
            "before they are added, so per-head edges are not defined. Use path patching (analyses.paths) or "
            "activation patching instead")


def node_names(model: "HookedVLM", *, image_path: bool = False) -> list[str]:
    c = model.cfg
    check_additive_heads(model)
    if image_path and deepstack_layers(model):  # the DeepStack mergers read inner tower blocks, which no receiver models
        raise NotImplementedError(
            f"image_path=True does not support DeepStack models yet ({c.family}: mergers read vision blocks "
            f"{c.family_options.get('deepstack_visual_indexes')} besides the last); use image_path=False, whose "
            "graph has the DeepStack additions as nodes DS{l}")
    vision = _vision_nodes(vision_depth(model)) if image_path else []
    return (vision + ["embed_image", "embed_text"] + [f"L{l}H{h}" for l in range(c.n_layers) for h in range(c.n_heads)]
            + [f"MLP{l}" for l in range(c.n_layers)] + [f"DS{l}" for l in deepstack_layers(model)])


def receiver_names(model: "HookedVLM", *, image_path: bool = False) -> list[str]:
    c = model.cfg
    check_additive_heads(model)
    out = _vision_receivers(vision_depth(model)) if image_path else []
    for l in range(c.n_layers):
        out += [f"L{l}H{h}.q" for h in range(c.n_heads)]
        out += [f"L{l}H{g}.{k}" for k in ("k", "v") for g in range(c.n_key_value_heads)]
        out.append(f"MLP{l}")
    return out + ["logits"]


def _parse_node(u: str) -> tuple[int, int]:
    """Write order: embed (-1, 0), head of layer l (l, 0), MLP l (l, 1), DeepStack addition after block l (l, 2)."""
    if u.startswith("embed"):
        return (-1, 0)
    if u.startswith("DS"):
        return (int(u[2:]), 2)
    if u.startswith("MLP"):
        return (int(u[3:]), 1)
    return (int(u[1:].split("H")[0]), 0)


def _parse_receiver(v: str, n_layers: int) -> tuple[int, int]:
    """Read order: attention receivers of layer l (l, 0), MLP l (l, 1), logits (n_layers, 0)."""
    if v == "logits":
        return (n_layers, 0)
    if v.startswith("MLP"):
        return (int(v[3:]), 1)
    return (int(v[1:].split("H")[0]), 0)


def _parse_vision(name: str) -> tuple[int | float, int]:
    """Vision write / read order: V.embed (-1, 0), V{k}.attn (k, 0), V{k}.mlp (k, 1), projector (inf, 0)."""
    if name == "V.embed":
        return (-1, 0)
    if name == "projector":
        return (math.inf, 0)
    k, kind = name[1:].split(".")
    return (int(k), 0 if kind == "attn" else 1)


def _is_edge(u: str, v: str, n_layers: int) -> bool:
    """u writes before v reads, within the tower or within the decoder (the tower reaches the decoder only
    through the projector -> embed_image)."""
    if _is_vision(u) or _is_vision(v):
        return _is_vision(u) and _is_vision(v) and _parse_vision(u) < _parse_vision(v)
    return _parse_node(u) < _parse_receiver(v, n_layers)


def valid_edges(model: "HookedVLM", *, image_path: bool = False) -> list[Edge]:
    n = model.cfg.n_layers
    return [(u, v) for v in receiver_names(model, image_path=image_path)
            for u in node_names(model, image_path=image_path) if _is_edge(u, v, n)]


def _node_hooks(model: "HookedVLM", depth: int | None = None) -> list[str]:
    check_additive_heads(model)
    n = model.cfg.n_layers
    vision = [] if depth is None else ["vision.blocks.0.hook_resid_pre"] + [
        f"vision.blocks.{k}.hook_{s}_out" for k in range(depth) for s in ("attn", "mlp")]
    return (vision + ["hook_embed"] + [act_name("result", l) for l in range(n)]
            + [act_name("mlp_out", l) for l in range(n)] + [f"blocks.{l}.hook_deepstack" for l in deepstack_layers(model)])


def _image_mask(model: "HookedVLM", inputs: dict[str, Any]) -> Tensor:
    return (inputs["input_ids"] == model.cfg.image_token_id)[:, :, None]


def _no_tower_run() -> ValueError:
    return ValueError("image_path=True: the vision tower did not run on these inputs (no pixel_values?)")


def _acts_from_cache(model: "HookedVLM", cache: Any, img: Tensor, depth: int | None = None) -> dict[str, Tensor]:
    acts = {}
    if depth is not None:
        try:
            acts["V.embed"] = cache["vision.blocks.0.hook_resid_pre"]
        except KeyError:
            raise _no_tower_run() from None
        for k in range(depth):
            acts[f"V{k}.attn"] = cache[f"vision.blocks.{k}.hook_attn_out"]
            acts[f"V{k}.mlp"] = cache[f"vision.blocks.{k}.hook_mlp_out"]
    e = cache["hook_embed"]
    img = img.to(e.device)
    acts.update({"embed_image": e * img, "embed_text": e * ~img})
    for l in range(model.cfg.n_layers):
        r = cache[act_name("result", l)]
        for h in range(model.cfg.n_heads):
            acts[f"L{l}H{h}"] = r[:, :, h]
        acts[f"MLP{l}"] = cache[act_name("mlp_out", l)]
    for l in deepstack_layers(model):
        name = f"blocks.{l}.hook_deepstack"
        acts[f"DS{l}"] = cache[name] if name in cache.cache_dict else torch.zeros_like(e)  # no image in the run: nothing added
    return acts


@torch.no_grad()
def node_activations(model: "HookedVLM", inputs: dict[str, Any], *, image_path: bool = False
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, {node: its additive term of the residual stream}): decoder nodes [batch, pos, d_model], vision
    nodes (``image_path=True``) [n_images_or_crops, patches, d_vision] (Qwen: [1, all patches, d_vision])."""
    depth = vision_depth(model, inputs) if image_path else None
    logits, cache = model.run_with_cache(**inputs, names_filter=_node_hooks(model, depth))
    return logits, _acts_from_cache(model, cache, _image_mask(model, inputs), depth)


@dataclass
class EdgeGraph:
    """Edge scores.

    scores: [n_nodes, n_receivers] (NaN where no edge exists); with ``per_prompt`` a trailing batch axis, with
    ``per_position`` then a trailing position axis ([n_nodes, n_receivers, (batch,) pos]).
    nodes, receivers: the axis labels. clean, corrupt: metric baselines. method: "EAP", "EAP-IG(m)" or
    "EAP-IG(adaptive, m points)".
    completeness: the input edges' scores summed against the exact total effect (`analyses.completeness`).
    steps: gradient points per prompt (None for EAP).
    `edges` / `node_scores` sum the position axis and average the prompt axis.
    """

    scores: Tensor
    nodes: list[str]
    receivers: list[str]
    clean: Tensor
    corrupt: Tensor
    method: str
    labels: dict[str, Any] = field(default_factory=dict)
    per_position: bool = False
    completeness: "Completeness | None" = None
    steps: int | None = None

    def score(self, u: str, v: str) -> Tensor:
        return self.scores[self.nodes.index(u), self.receivers.index(v)]

    def _totals(self) -> Tensor:
        s = self.scores.sum(-1) if self.per_position else self.scores
        return s if s.ndim == 2 else s.mean(-1)

    def edges(self) -> list[tuple[str, str, float]]:
        """Every existing edge (u, v, score) sorted by |score|, largest first (prompts averaged, positions
        summed)."""
        s = self._totals()
        out = [(u, v, float(s[i, j])) for i, u in enumerate(self.nodes) for j, v in enumerate(self.receivers)
               if not torch.isnan(s[i, j])]
        return sorted(out, key=lambda e: -abs(e[2]))

    def node_scores(self) -> dict[str, float]:
        """Sum of |score| over each node's outgoing edges (a quick importance ranking)."""
        s = self._totals()
        return {u: float(s[i].abs().nansum()) for i, u in enumerate(self.nodes)}
