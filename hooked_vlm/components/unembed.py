"""The unembedding, with TransformerLens's `W_U` / `b_U` names. A `nn.Linear` underneath, so the state-dict key
stays `unembed.weight` (the organism checkpoints and the HF conversion map to it unchanged)."""
from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn


class Unembed(nn.Linear):
    """residual [..., d_model] -> logits [..., d_vocab]. ln_final's weight is folded into `weight` at conversion."""

    def __init__(self, d_model: int, d_vocab: int, bias: bool = False):
        super().__init__(d_model, d_vocab, bias=bias)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """[d_model, d_vocab] (a transposed view of `weight`: edits write through)."""
        return self.weight.T

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        """[d_vocab]; zeros for the decoders here, which have no unembedding bias."""
        return self.bias if self.bias is not None else self.weight.new_zeros(self.out_features)
