"""Differences between the transformers releases we support (see pyproject.toml), in one place.

- 5.25: LLaVA-OneVision outputs no longer carry `image_hidden_states` (tests read the merged embeddings instead).
- 5.40 (announced): the KV cache argument and output field `past_key_values` become `cache`.
"""
from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(hf_model: Any) -> str:
    """The name under which this HF model's forward takes a KV cache: `cache` (5.40+) or `past_key_values`."""
    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache an HF forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
