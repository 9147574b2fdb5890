"""hooked_vlm: TransformerLens-style hooked re-implementations of vision-language models."""
from .config import HookedVLMConfig, VisionCfg
from .families import FAMILIES, get_family
from .model import HookedVLM
from .positions import TokenLayout

__all__ = ["HookedVLM", "HookedVLMConfig", "VisionCfg", "TokenLayout", "FAMILIES", "get_family"]
