"""Shared helpers of the spatial-binding modules (2603.22278): the sequence view of image-token activations,
activations at a position set, and the linear probe type. `analyses.spatial` re-exports all of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .toolkit import run_cached

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


# --------------------------------------------------------------------------------------- sequence view
def as_sequence(act: Tensor, layout: Any) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(activation as [batch, pos, ...], function mapping an edited sequence view back to the hook's shape).
    [batch, pos, ...] activations pass through; others are taken as image-token rows in reading order."""
    shape = tuple(layout.shape)
    if tuple(act.shape[:2]) == shape:
        return act, lambda x: x
    rows = act.reshape(-1, *act.shape[2:]) if act.ndim >= 3 else act
    img = layout.is_image.to(act.device)
    if rows.shape[0] != int(img.sum()):
        raise ValueError(f"activation {tuple(act.shape)} is neither [batch, pos, ...] = {shape} nor one row per "
                         f"image token ({int(img.sum())}); use a [batch, pos, d] hook such as hook_embed")
    seq = rows.new_zeros(*shape, *rows.shape[1:])
    seq[img] = rows
    return seq, lambda x: x[img].reshape(act.shape)


def activations_at(
    model: "HookedVLM", inputs: dict[str, Any], hook_names: Sequence[str], positions: Bool[Tensor, "batch pos"],
    layout: Any = None,
) -> tuple[dict[str, Float[Tensor, "n d"]], Int[Tensor, "n"]]:
    """({hook: rows at the masked positions, prompt-major}, prompt index of each row), one forward pass."""
    if layout is not None:
        layout.check_inputs(inputs["input_ids"])  # a layout of other prompts would select wrong tokens silently
    layout = layout or model.layout(inputs)
    _, cache = run_cached(model, inputs, list(hook_names))
    out = {}
    for n in hook_names:
        seq, _ = as_sequence(cache[n], layout)
        out[n] = seq[positions.to(seq.device)].float().cpu()
    prompt = torch.arange(positions.shape[0])[:, None].expand(positions.shape)[positions.cpu()]
    return out, prompt


# ---------------------------------------------------------------------------------------------- probes
@dataclass
class Probe:
    """Multinomial logistic regression on standardised features: logits = ((x - mean) / std) @ W + b."""

    W: Float[Tensor, "d classes"]
    b: Float[Tensor, "classes"]
    mean: Float[Tensor, "d"]
    std: Float[Tensor, "d"]

    def logits(self, x: Float[Tensor, "n d"]) -> Tensor:
        return ((x.float() - self.mean) / self.std) @ self.W + self.b

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(-1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y.long()).float().mean()) if len(y) else float("nan")

    def directions(self) -> Float[Tensor, "k d"]:
        """Unit directions in the raw activation space: class weights minus their mean (softmax ignores a
        shared part); one direction (class 1 - class 0) for a binary probe."""
        w = (self.W / self.std[:, None]).T  # [classes, d] in raw space
        w = w[1:2] - w[0:1] if w.shape[0] == 2 else w - w.mean(0, keepdim=True)
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def columns(self) -> Float[Tensor, "classes d"]:
        """Every class column in the raw activation space (both columns of a binary probe): what the paper's
        amplification projects on (`spatial_amplify.amplification_protocol`)."""
        return (self.W / self.std[:, None]).T.clone()


def fit_probe(
    x: Float[Tensor, "n d"], y: Int[Tensor, "n"], n_classes: int | None = None, l2: float | int = 1e-3, steps: int = 200
) -> Probe:
    """Logistic regression (cross-entropy + l2 * |W|^2) fitted with LBFGS on standardised x."""
    x, y = x.float().cpu(), y.long().cpu()
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ W + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(W.detach(), b.detach(), mean, std)


def split_prompts(n_prompts: int, test_frac: float | int = 0.25, seed: int = 0) -> Bool[Tensor, "n_prompts"]:
    """True for test prompts (a seeded random subset; at least one of each when n_prompts >= 2)."""
    n_test = min(max(1, round(n_prompts * test_frac)), n_prompts - 1) if n_prompts >= 2 else 0
    test = torch.zeros(n_prompts, dtype=torch.bool)
    test[torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed))[:n_test]] = True
    return test
