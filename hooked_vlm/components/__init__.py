from .attention import Attention
from .block import TransformerBlock
from .mlp import MLP, GatedMLP
from .norms import NORMS, LayerNorm, RMSNorm
from .rotary import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "TransformerBlock", "MLP", "GatedMLP", "NORMS", "LayerNorm", "RMSNorm", "RotaryEmbedding", "apply_rotary"]
