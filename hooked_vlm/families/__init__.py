"""Registry: HF `config.model_type` -> family. Adding a family = one module in this folder that calls
`register(...)` at import, plus its parity tests; modules here are discovered automatically."""
from __future__ import annotations

import importlib
import pkgutil

from .base import Family, ImageCoords

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "backbones", "declarations_doc"):  # helpers, not families
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Family", "ImageCoords", "FAMILIES", "register", "get_family"]
