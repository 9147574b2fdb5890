"""Loading checkpoints with Hugging Face (safetensors only, never pickle) and converting them to a HookedVLM.

Loading is strict: a checkpoint whose tensors do not match what its config describes (a missing tensor, a tensor
of another shape, a config with more or fewer layers than the weights hold, no vision tower) is a ValueError naming
the keys. HF's own loader would initialise missing tensors randomly and print a table; we never let that through.
Tensors the model does not use (unexpected keys) are refused too unless `strict=False`, which warns listing them.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .model import HookedVLM


def _names(keys: list[Any], limit: int = 12) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_loading_info(info: Mapping[str, Any], source: str, strict: bool = True) -> None:
    """Raise on what HF's `output_loading_info` reports as missing or mismatched (HF would have initialised those
    tensors randomly); refuse unexpected keys when `strict`, else warn listing them."""
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    problems = [str(m) for m in info.get("error_msgs") or []]
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config needs are missing from the checkpoint: {_names(missing)}")
    if mismatched:
        shapes = [f"{k} (checkpoint {tuple(a)}, config {tuple(b)})" for k, a, b in mismatched]
        problems.append(f"{len(mismatched)} tensor(s) have another shape than the config gives: {_names(shapes)}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} tensor(s) in the checkpoint are not used by the model the config describes: "
                        f"{_names(unexpected)} (pass strict=False to load anyway, ignoring them)")
    if problems:
        raise ValueError(
            f"{source}: the checkpoint does not match its config.json, so the model would be partly random. "
            + "; ".join(problems) + ". Check num_hidden_layers / depth in config.json against the weights, and "
            "that every .safetensors shard is present."
        )
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} tensor(s) the model does not use (strict=False): "
                      f"{_names(unexpected)}", stacklevel=3)


def load_hf(name_or_dir: str, dtype: torch.dtype | None = None, device: Any = None, device_map: Any = None,
            processor: Any = "auto", strict: bool = True) -> tuple[Any, Any]:
    """(HF model in eval mode, processor) from a local directory or hub name, strictly (see the module docstring)."""
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
    family = get_family(config.model_type)  # unsupported families fail before any weight is read
    family.check_config(config)  # so do unsupported backbones and config values
    kwargs: dict[str, Any] = dict(use_safetensors=True, attn_implementation="sdpa", output_loading_info=True,
                                  ignore_mismatched_sizes=True)  # mismatches are reported below, by name
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model, info = AutoModelForImageTextToText.from_pretrained(name_or_dir, **kwargs)
    check_loading_info(info, str(name_or_dir), strict=strict)
    if device is not None and device_map is None:
        hf_model = hf_model.to(device)
    if processor == "auto":
        try:
            processor = AutoProcessor.from_pretrained(name_or_dir)
        except (OSError, ValueError, ImportError) as err:  # e.g. no processor files, or one that needs torchvision
            warnings.warn(f"no processor could be loaded from {name_or_dir} ({err}); pass processor= yourself")
            processor = None
    return hf_model.eval(), processor


def from_pretrained(cls: type["HookedVLM"], name_or_dir: str, dtype: torch.dtype | None = None, device: Any = None,
                    device_map: Any = None, processor: Any = "auto", strict: bool = True) -> "HookedVLM":
    """`HookedVLM.from_pretrained`: load with HF (strictly, safetensors only) and convert sharing the weights."""
    hf_model, proc = load_hf(name_or_dir, dtype=dtype, device=device, device_map=device_map, processor=processor,
                             strict=strict)
    return from_hf(cls, hf_model, proc, copy_weights=False)


def from_hf(cls: type["HookedVLM"], hf_model: nn.Module, processor: Any = None, copy_weights: bool = True) -> "HookedVLM":
    """`HookedVLM.from_hf`: convert an in-memory HF model (never modified). The config is checked field by field
    (families/base.py `FieldRules`) and every HF tensor must be converted (`KeyMapper.finish`)."""
    from .families import get_family

    family = get_family(hf_model.config.model_type)
    family.check_config(hf_model.config)
    cfg = family.config_from_hf(hf_model.config)
    param = next(hf_model.parameters())
    cfg.dtype, cfg.device, cfg.model_name = param.dtype, param.device, getattr(hf_model, "name_or_path", "")
    with torch.device("meta"):
        model = cls(cfg, processor)
    sd = family.convert_state_dict(hf_model.state_dict(), cfg)
    rotaries = family.rotary_from_hf(hf_model)  # {our rotary module: (inv_freq, attention_scaling)}
    for name, (inv_freq, _) in rotaries.items():
        sd[f"{name}.inv_freq"] = inv_freq
    if copy_weights:
        sd = {k: v.detach().clone() for k, v in sd.items()}
    fold_final_norm(sd, cfg.norm_offset)
    model.load_state_dict(sd, strict=True, assign=True)
    for name, (_, scaling) in rotaries.items():
        getattr(model, name).attention_scaling = float(scaling)
    return model.eval()


def fold_final_norm(sd: dict[str, Tensor], offset: float = 0.0) -> None:
    """unembed <- unembed * (offset + ln_final.w) (computed in float32); ln_final.w <- 1 - offset, so that the
    norm's multiplier is exactly 1 (Gemma's norms multiply by 1 + w). New tensors: the HF model's weights are
    untouched even when others are shared."""
    w = sd["ln_final.w"]
    sd["unembed.weight"] = (sd["unembed.weight"].float() * (offset + w.float())[None, :]).to(sd["unembed.weight"].dtype)
    sd["ln_final.w"] = torch.full_like(w, 1.0 - offset)
