"""Field declarations (families/base.py `FieldRules`) of the text decoders and ViT towers that several families
share: Llama, Mistral and Qwen2 decoders; CLIP and SigLIP vision towers. A family lists the ones it converts in
its `config_fields`; any other backbone is refused by model_type."""
from __future__ import annotations

from .base import FieldRules, ROPE_TYPES, only, rope_parameters_ok

# fields every HF decoder config has that cannot change the logits
DECODER_IGNORED = {
    "attention_dropout": "dropout: HookedVLM runs inference only (HF's eval mode uses none either)",
    "initializer_range": "initialisation only: the weights are loaded",
    "use_cache": "KV caching: HookedVLM recomputes the whole sequence, same result",
    "bos_token_id": "tokenizer / generation id",
    "eos_token_id": "tokenizer / generation id",
    "pad_token_id": "tokenizer / generation id (the embedding row is loaded like any other)",
}
# read by decoder_fields (families/base.py) and parity-tested
DECODER_IMPLEMENTED = (
    "hidden_act", "hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
)
ROPE_1D = rope_parameters_ok(tuple(ROPE_TYPES))

LLAMA = FieldRules(
    "LlamaConfig",
    implemented=DECODER_IMPLEMENTED + ("attention_bias", "head_dim", "mlp_bias"),
    ignored={**DECODER_IGNORED, "pretraining_tp": "not read by HF's Llama forward (a training-time split)"},
    refused={"rope_parameters": ROPE_1D},
)
MISTRAL = FieldRules(
    "MistralConfig",
    implemented=DECODER_IMPLEMENTED + ("head_dim", "sliding_window"),
    ignored=DECODER_IGNORED,
    refused={"rope_parameters": ROPE_1D},
)
QWEN2 = FieldRules(
    "Qwen2Config",
    implemented=DECODER_IMPLEMENTED + ("layer_types", "sliding_window"),
    ignored={**DECODER_IGNORED,
             "use_sliding_window": "read by HF only through layer_types (implemented)",
             "max_window_layers": "read by HF only through layer_types (implemented)"},
    refused={"rope_parameters": ROPE_1D},
)
TEXT_DECODERS = (LLAMA, MISTRAL, QWEN2)

VIT_IMPLEMENTED = ("hidden_act", "hidden_size", "image_size", "intermediate_size", "layer_norm_eps",
                   "num_attention_heads", "num_channels", "num_hidden_layers", "patch_size")
VIT_IGNORED = {
    "attention_dropout": "dropout: inference only",
    "initializer_range": "initialisation only: the weights are loaded",
}
CLIP_VISION = FieldRules(
    "CLIPVisionConfig",
    implemented=VIT_IMPLEMENTED,
    ignored={**VIT_IGNORED, "initializer_factor": "initialisation only",
             "projection_dim": "CLIP's contrastive projection: not part of the vision tower the VLM runs"},
)
SIGLIP_VISION = FieldRules(
    "SiglipVisionConfig",
    implemented=VIT_IMPLEMENTED,
    ignored={**VIT_IGNORED, "vision_use_head": "the pooling head's output is not used by the VLM (its weights are "
                                               "listed in the family's ignored_keys)"},
)

__all__ = ["LLAMA", "MISTRAL", "QWEN2", "TEXT_DECODERS", "CLIP_VISION", "SIGLIP_VISION", "DECODER_IGNORED",
           "DECODER_IMPLEMENTED", "only"]
