"""Loading checkpoints with Hugging Face: safetensors only (never pickle), local directories or hub names."""
from __future__ import annotations

import os
from typing import Any

import torch


def load_hf(name_or_dir: str, dtype: torch.dtype | None = None, device: Any = None, device_map: Any = None,
            processor: Any = "auto") -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .families import get_family

    if os.path.isdir(name_or_dir):
        files = os.listdir(name_or_dir)
        if not any(f.endswith(".safetensors") for f in files):
            bins = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            raise ValueError(
                f"{name_or_dir} has no .safetensors weights{' (found pickle-based ' + str(bins) + ')' if bins else ''}; "
                "HookedVLM loads safetensors only (pickle files can run code when loaded). Convert with "
                "model.save_pretrained(dir, safe_serialization=True) in a trusted environment."
            )
    config = AutoConfig.from_pretrained(name_or_dir)
    get_family(config.model_type)  # unsupported families fail before any weight is read
    kwargs: dict[str, Any] = dict(use_safetensors=True, attn_implementation="sdpa")
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = AutoModelForImageTextToText.from_pretrained(name_or_dir, **kwargs)
    if device is not None and device_map is None:
        hf_model = hf_model.to(device)
    if processor == "auto":
        try:
            processor = AutoProcessor.from_pretrained(name_or_dir)
        except (OSError, ValueError, ImportError) as err:  # e.g. no processor files, or one that needs torchvision
            import warnings

            warnings.warn(f"no processor could be loaded from {name_or_dir} ({err}); pass processor= yourself")
            processor = None
    return hf_model.eval(), processor
