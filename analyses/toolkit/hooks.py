"""Hook names and site masks: hook-name resolution (TransformerLens' `get_act_name` conventions), head / position
masks of a site, and patch hooks that give every slice of a repeated batch its own patch.

Conventions used by every analysis:

* A *hook* is given either as a short kind (``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``,
  ``"mlp_out"``, ``"z"``, ``"result"``, ``"q"``, ``"k"``, ``"v"``, ``"pattern"``, ``"attn_scores"``,
  ``"mlp_post"``), which names the decoder's ``blocks.{layer}.*`` hook, or as a template with ``{layer}``
  (``"vision.blocks.{layer}.hook_resid_post"``), or as a full hook name (``"projector.hook_out"``).
  The number of layers is read from the model's hook names, never assumed.
* A *position set* is read by `toolkit.positions.as_positions` (bool or 0/1 masks [pos] / [batch, pos],
  indices). For hooks whose leading dims are not [batch, pos] (vision hooks: [n_img, pos, ...]) a mask must
  match the activation's leading dims.
* Attention-pattern hooks (``hook_pattern``, ``hook_attn_scores``: [batch, head, query, key]) take the position
  mask over the *query* axis.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from transformer_lens.utilities import get_act_name

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

HEAD_FIRST = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]
HEAD_THIRD = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k")  # [batch, pos, head, d]
KV_HOOKS = ("hook_k", "hook_v", "hook_rot_k")



def hook_template(hook: str) -> str:
    """Short kind -> ``blocks.{layer}.*`` template by TransformerLens' `get_act_name` ("resid_pre",
    "attn_out", "z", "pattern", "mlp_post", "k", ...); ``{layer}`` templates and full names pass through."""
    if not isinstance(hook, str) or not hook:
        raise TypeError(f"a hook is a short kind, a {{layer}} template or a hook name; got {hook!r}")
    if "." in hook or hook.startswith("hook_"):
        return hook
    return get_act_name(hook, "{layer}")


def act_name(hook: str, layer: int | None = None) -> str:
    """The hook name of `hook` (short kind, template or full name) at `layer`: ``act_name("resid_pre", 3)`` ->
    ``"blocks.3.hook_resid_pre"``, as TransformerLens' ``get_act_name`` (and ``cache["resid_pre", 3]``)."""
    template = hook_template(hook)
    if "{layer}" in template:
        if layer is None:
            raise ValueError(f"hook {hook!r} needs a layer")
        return template.format(layer=int(layer))
    return template


def n_layers_of(model: "HookedVLM", template: str) -> int:
    """How many consecutive layers 0, 1, ... the model has a hook ``template.format(layer=l)`` for."""
    if "{layer}" not in template:
        raise ValueError(f"hook {template!r} has no {{layer}} placeholder")
    n = 0
    while template.format(layer=n) in model.hook_dict:
        n += 1
    if n == 0:
        raise ValueError(f"the model has no hook named {template.format(layer=0)!r} (from {template!r})")
    return n


def resolve_layers(model: "HookedVLM", template: str, layers: int | Sequence[int] | None) -> list[int]:
    """Layer indices (negatives counted from the end) for a ``{layer}`` template; None = every layer."""
    n = n_layers_of(model, template)
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        layer = int(layer)
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer {layer} is out of range for {template!r} ({n} layers)")
        out.append(idx)
    return out


def check_hook(model: "HookedVLM", name: str) -> str:
    if name not in model.hook_dict:
        close = [h for h in model.hook_dict if name.split(".")[-1] in h][:5]
        raise ValueError(f"the model has no hook {name!r}" + (f"; similar: {close}" if close else ""))
    return name


def n_heads_of(model: "HookedVLM", name: str) -> int:
    """Heads (or key/value heads for hook_k / hook_v) of the attention module owning hook `name`."""
    module = model.mod_dict[name.rsplit(".", 1)[0]]
    leaf = name.rsplit(".", 1)[-1]
    return int(module.n_kv_heads if leaf in KV_HOOKS else module.n_heads)


def site_mask(name: str, shape: Sequence[int], positions: Tensor | None, heads: Any = None) -> Tensor | None:
    """Bool mask broadcastable to an activation of `shape` (one copy of the batch) selecting what a site
    replaces; None means the whole activation.

    `positions`: bool [batch, pos] / [pos] (query axis for pattern hooks) or, for hooks without a [batch, pos]
    layout, a mask over the activation's leading dims. `heads`: int or ints on the head axis (pattern hooks:
    dim 1; q/k/v/z/result: dim 2).
    """
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    if positions is None and heads is None:
        return None
    mask = torch.ones((1,) * len(shape), dtype=torch.bool)
    if positions is not None:
        p = positions.bool().cpu()
        if leaf in HEAD_FIRST:
            if p.ndim == 1:
                p = p[None]
            if p.ndim != 2 or p.shape[0] not in (1, shape[0]) or p.shape[1] != shape[2]:
                raise ValueError(f"{name}: query mask {tuple(p.shape)} does not match [batch, query] = {(shape[0], shape[2])}")
            p = p[:, None, :, None]
        else:
            if p.ndim == 1 and len(shape) >= 3:
                p = p[None]  # the same positions for every prompt / image
            ok = p.ndim <= len(shape) and p.shape[0] in (1, shape[0]) and tuple(p.shape[1:]) == tuple(shape[1 : p.ndim])
            if not ok:
                raise ValueError(f"{name}: position mask {tuple(p.shape)} does not match the activation's leading dims "
                                 f"{tuple(shape[: max(p.ndim, 1)])}")
            p = p.reshape(tuple(p.shape) + (1,) * (len(shape) - p.ndim))
        mask = mask & p
    if heads is not None:
        if leaf in HEAD_FIRST:
            head_dim = 1
        elif leaf in HEAD_THIRD:
            head_dim = 2
        else:
            raise ValueError(f"{name} has no head axis: a head can only be chosen for {HEAD_FIRST + HEAD_THIRD}")
        hm = torch.zeros(shape[head_dim], dtype=torch.bool)
        hm[torch.as_tensor(heads).long()] = True
        view = [1] * len(shape)
        view[head_dim] = shape[head_dim]
        mask = mask & hm.view(view)
    return mask


def repeat_axis(src_shape: Sequence[int], act_shape: Sequence[int], n_slots: int) -> int:
    """The axis along which a run on n copies of a batch stacks the copies of an activation: 0 for [batch, ...]
    and [n_tokens, d] activations, 1 for towers that pack every image's patches into one row ([1, patches, d],
    Qwen2-VL). Raises if the shapes do not fit."""
    src_shape, act_shape = tuple(src_shape), tuple(act_shape)
    if len(src_shape) == len(act_shape):
        if n_slots == 1 and src_shape == act_shape:
            return 0
        for axis in range(len(src_shape)):
            others = src_shape[:axis] + src_shape[axis + 1 :] == act_shape[:axis] + act_shape[axis + 1 :]
            if others and act_shape[axis] == n_slots * src_shape[axis]:
                return axis
    raise ValueError(
        f"cannot patch an activation of shape {src_shape} into {n_slots} copies of one of shape {act_shape}; "
        "do the two runs have the same sequence length and images?"
    )


def slot_patch_hooks(
    sources: dict[str, Tensor],
    slots: Sequence[tuple[str | None, Tensor | None]],
    combine: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks for a batch that is n copies of one batch (`batching.repeat_inputs`): slot j (the j-th copy
    of every hooked activation along its `repeat_axis`) gets `slots[j]` = (hook name, mask) applied:
    ``where(mask, combine(source, act), act)`` (default combine: the source itself). A slot whose name is None
    is left unpatched (a reference run)."""
    by_name: dict[str, list[tuple[int, Tensor | None]]] = defaultdict(list)
    for j, (name, mask) in enumerate(slots):
        if name is not None:
            by_name[name].append((j, mask))
    n_slots = len(slots)

    def make(name: str, items: list[tuple[int, Tensor | None]]) -> Callable:
        src = sources[name]

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            try:
                axis = repeat_axis(src.shape, act.shape, n_slots)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            v = src.shape[axis]
            s = src.to(act.device, act.dtype)
            out = act.clone()
            for j, m in items:
                part = act.narrow(axis, j * v, v)
                new = s if combine is None else combine(s, part)
                out.narrow(axis, j * v, v).copy_(new if m is None else torch.where(m.to(act.device), new, part))
            return out

        return hook

    return [(name, make(name, items)) for name, items in by_name.items()]


@contextlib.contextmanager
def frozen_parameters(model: "HookedVLM") -> Iterator[None]:
    """Gradients w.r.t. activations only: parameters stop requiring grad inside (restored after, also on error).
    Autograd then keeps no inputs for weight gradients and builds no graph upstream of the first hooked
    activation (e.g. the whole vision tower when only decoder activations are asked for)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
