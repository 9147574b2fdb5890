"""The one caching path of the analyses: `run_cached` always goes through `HookedVLM.run_with_cache`, so the
model's cache-size guard (`max_cache_bytes`) applies to every analysis."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM


@torch.no_grad()
def run_cached(model: "HookedVLM", inputs: dict[str, Any], names: Sequence[str], *, device: Any = None,
               missing: str = "raise") -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, {hook name: activation}) for `names`, from one forward behind the cache-size guard.

    missing: "raise" (default) if a hook never ran (e.g. a vision block past the feature layer), "warn" to warn
    and leave it out of the dict, "ignore" to leave it out silently (the caller checks)."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("run_cached: no hook names given")
    logits, cache = model.run_with_cache(**inputs, names_filter=names, device=device)
    store = {n: cache[n] for n in names if n in cache.cache_dict}
    absent = sorted(set(names) - set(store))
    if absent:
        msg = f"hooks {absent} did not run in the forward pass"
        if missing == "raise":
            raise ValueError(msg)
        if missing == "warn":
            warnings.warn(msg + "; patching them has no effect", stacklevel=3)
    return logits, store
