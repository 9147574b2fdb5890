"""What a family module provides, and the weight-conversion helpers they share.

A family is a stateless object registered under an HF `config.model_type`. It resolves the HF config into a
`HookedVLMConfig`, builds the family's vision tower and projector, turns image inputs into features in
reading order, computes position ids, describes image tokens for `TokenLayout`, and maps HF weights. Shared
components never ask which family they are in.

Image inputs are parsed and checked ONCE per forward: `Family.plan` turns the keywords into an `ImageInputs`
(frozen), and the tower / projector (`image_features`), the positions (`position_ids`), the attention groups and
TokenLayout (`image_coords`) all read that one plan instead of re-reading the keywords.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import HookedVLMConfig


@dataclass
class ImageCoords:
    """Per image token of one image, in feature order: crop (0 = base grid; family-defined beyond), row, col
    (-1 for separator tokens such as LLaVA-OV's image_newline) and temporal index t. `grids[crop]` is that
    crop's (rows, cols) so pixel boxes can be mapped to tokens."""

    crop: Tensor
    row: Tensor
    col: Tensor
    t: Tensor
    grids: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class ImageInputs:
    """One forward's image inputs, parsed and checked once by `Family.plan` (loud errors there), then read by
    everything that needs them: tower, projector / merger, merge, positions, attention groups, TokenLayout.
    Frozen: a plan is built per call and never updated. `geometry` is the family's parsed view (None where the
    family needs none beyond the keywords): LLaVA's feature layers and selection, LLaVA-OneVision's crop plans,
    Qwen's checked grid with its attention segments / window partition, Gemma 3's image groups."""

    pixel_values: Tensor | None
    options: Mapping[str, Any]  # the other image keywords as given (read-only)
    geometry: Any = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


def make_plan(pixel_values: Tensor | None, options: Mapping[str, Any], geometry: Any = None) -> ImageInputs:
    """An `ImageInputs` with a read-only copy of `options`."""
    return ImageInputs(pixel_values, MappingProxyType(dict(options)), geometry)


@dataclass(frozen=True)
class Accept:
    """The values of a refused field that we reproduce; any other value raises at conversion, naming the field."""

    describe: str  # for errors and docs/supported_configurations.md, e.g. "1.0 (no partial rotary)"
    check: Callable[[Any], bool]


def only(*values: Any) -> Accept:
    """Accept exactly these values (None included if listed)."""
    return Accept(" or ".join(repr(v) for v in values), lambda v: any(v == ok for ok in values))


@dataclass(frozen=True)
class FieldRules:
    """How a family treats every field of one HF config class (matched by class name). Every field the class
    has must be in exactly one of the three (tests/unit/test_config_fields.py walks the installed transformers):

    - implemented: read at conversion and reproduced (parity-tested);
    - ignored: {field: why it cannot change the logits} (tokenizer ids, init, dropout, output flags, videos...);
    - refused: {field: Accept}: only the accepted values are reproduced; any other raises a ValueError naming
      the field and its value when the model is converted.

    Fields of HF's base `PreTrainedConfig` are declared once, in `COMMON_FIELDS`."""

    config_class: str
    implemented: tuple[str, ...] = ()
    ignored: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, Accept] = field(default_factory=dict)

    def declared(self) -> set[str]:
        return set(self.implemented) | set(self.ignored) | set(self.refused)


COMMON_FIELDS = FieldRules(
    "PreTrainedConfig",
    implemented=("model_type",),
    ignored={
        "_name_or_path": "where the config was read from",
        "architectures": "HF class names; the family comes from model_type",
        "transformers_version": "the version that wrote the file",
        "dtype": "the weights' dtype: the converted model takes the HF model's parameter dtype",
        "chunk_size_feed_forward": "feed-forward chunking changes memory use, not the result",
        "id2label": "classification heads: no VLM here has one",
        "label2id": "classification heads: no VLM here has one",
        "problem_type": "classification heads: no VLM here has one",
        "is_encoder_decoder": "generation bookkeeping; every family here is decoder-only",
        "output_attentions": "output format only (HookedVLM exposes patterns through hooks)",
        "output_hidden_states": "output format only (HookedVLM exposes activations through hooks)",
        "return_dict": "output format only",
    },
)


class Family:
    model_type: ClassVar[str]
    # how every field of the HF config classes this family converts is treated (see FieldRules); config classes
    # not listed here (e.g. a Gemma text config inside a LLaVA config) are refused by model_type at conversion
    config_fields: ClassVar[tuple[FieldRules, ...]] = ()
    # keywords the HF forward takes for these inputs, beyond input_ids / attention_mask / position_ids
    image_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # HF keys deliberately not converted, as (prefix, why)
    ignored_keys: ClassVar[tuple[tuple[str, str], ...]] = ()

    def config_from_hf(self, hf_config: Any) -> HookedVLMConfig:
        raise NotImplementedError

    def check_config(self, hf_config: Any) -> None:
        """Refuse, by name, a config this family would not reproduce exactly: a config class (e.g. the text
        backbone) it has no `config_fields` for, or a refused field set to a value other than the accepted ones."""
        check_config_fields(hf_config, self.model_type, self.config_fields)

    def build_vision(self, cfg: HookedVLMConfig) -> nn.Module:
        raise NotImplementedError

    def build_projector(self, cfg: HookedVLMConfig) -> nn.Module:
        raise NotImplementedError

    def plan(self, model: nn.Module, input_ids: Tensor, **image_inputs: Any) -> ImageInputs:
        """Parse and check the image keywords of one call, once (default: keep them as given)."""
        pixel_values = image_inputs.pop("pixel_values", None)
        return make_plan(pixel_values, image_inputs)

    def image_features(self, model: nn.Module, plan: ImageInputs) -> Tensor:
        """[n_image_tokens, d_model] (= `projector.hook_out`), in the reading order of the image tokens."""
        raise NotImplementedError

    def position_ids(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, plan: ImageInputs) -> Tensor:
        """Default: HF's plain 0..S-1 (left pads counted), [batch, pos]."""
        b, s = input_ids.shape
        return torch.arange(s, device=input_ids.device).expand(b, s)

    def image_coords(self, model: nn.Module, plan: ImageInputs) -> list[ImageCoords]:
        """Per image, in reading order: the (crop, row, col, t) of each of its image tokens."""
        raise NotImplementedError

    # True where the tokenizer has an end-of-image marker after the image tokens (Qwen's <|vision_end|>, Gemma 3's
    # <end_of_image>); LLaVA and LLaVA-OneVision have none
    has_end_of_image_token: ClassVar[bool] = False

    def end_of_image_offset(self) -> int:
        """Where the 'end-of-image' position sits relative to the last image token. Never the last image token
        itself (an image patch): with a marker, the marker; without one (LLaVA), the first text position after the
        image, as the narrow-gate paper (2412.06646) uses for LLaVA-1.5. Both are the next position: 1."""
        return 1

    def convert_state_dict(self, hf_sd: dict[str, Tensor], cfg: HookedVLMConfig) -> dict[str, Tensor]:
        raise NotImplementedError

    def check_processor(self, processor: Any) -> None:
        """Raise if the processor would make inputs this family cannot describe (default: accept any)."""

    def attention_groups(self, model: nn.Module, input_ids: Tensor, plan: ImageInputs) -> Tensor | None:
        """[batch, pos] group ids (-1 = none): positions of one group attend to each other in both directions on
        top of the causal mask (Gemma 3: the tokens of one image). Default None: purely causal."""
        return None

    def rotary_from_hf(self, hf_model: nn.Module) -> dict[str, tuple[Tensor, float]]:
        """{our rotary module: (inv_freq, attention_scaling)} copied from the HF decoder's rotary embedding, so any
        rope_type HF supports is honoured. Default: the single `language_model.rotary_emb`."""
        rot = hf_rotary(hf_model)
        # dynamic rope types overwrite `inv_freq` after a long input; `original_inv_freq` is the one for short inputs
        inv_freq = getattr(rot, "original_inv_freq", rot.inv_freq)
        return {"rotary": (inv_freq.detach().float().clone(), getattr(rot, "attention_scaling", 1.0))}


def hf_rotary(hf_model: nn.Module) -> nn.Module:
    """The HF decoder's rotary embedding module (`...language_model.rotary_emb`)."""
    for name, mod in hf_model.named_modules():
        if name.endswith("language_model.rotary_emb"):
            return mod
    raise ValueError("could not find the decoder's rotary embedding (language_model.rotary_emb) in the HF model")


class KeyMapper:
    """Takes HF tensors by name and records which were used, so that conversion can insist every key is used."""

    def __init__(self, hf_sd: dict[str, Tensor], ignored: tuple[tuple[str, str], ...] = ()):
        self.hf_sd, self.ignored, self.used, self.out = hf_sd, ignored, set(), {}

    def take(self, hf_key: str) -> Tensor:
        if hf_key not in self.hf_sd:
            raise KeyError(f"the HF checkpoint has no weight {hf_key!r}")
        self.used.add(hf_key)
        return self.hf_sd[hf_key]

    def has(self, hf_key: str) -> bool:
        return hf_key in self.hf_sd

    def put(self, ours: str, tensor: Tensor) -> None:
        self.out[ours] = tensor

    def map(self, ours: str, hf_key: str) -> None:
        self.put(ours, self.take(hf_key))

    def linear(self, ours: str, hf_prefix: str) -> None:
        self.map(f"{ours}.weight", f"{hf_prefix}.weight")
        if self.has(f"{hf_prefix}.bias"):
            self.map(f"{ours}.bias", f"{hf_prefix}.bias")

    def norm(self, ours: str, hf_prefix: str) -> None:
        self.map(f"{ours}.w", f"{hf_prefix}.weight")
        if self.has(f"{hf_prefix}.bias"):
            self.map(f"{ours}.b", f"{hf_prefix}.bias")

    def finish(self) -> dict[str, Tensor]:
        left = [k for k in self.hf_sd if k not in self.used and not any(k.startswith(p) for p, _ in self.ignored)]
        if left:
            raise ValueError(f"{len(left)} HF weights were not converted (a conversion bug): {left[:8]}")
        return self.out


LLAMA_NORMS = (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"))


def map_decoder(km: KeyMapper, cfg: HookedVLMConfig, prefix: str, lm_head: str,
                norms: tuple[tuple[str, str], ...] = LLAMA_NORMS) -> None:
    """Llama / Qwen2 / Gemma decoders share HF key names: embed_tokens, layers.{l}.self_attn/mlp, norm; `norms`
    maps each block's norms (ours, HF's) (Gemma 3 adds post-norms and qk-norms). The unembedding is lm_head, or the
    embedding where they are tied."""
    km.map("embed.weight", f"{prefix}.embed_tokens.weight")
    for l in range(cfg.n_layers):
        p, o = f"{prefix}.layers.{l}", f"blocks.{l}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            km.linear(f"{o}.attn.{proj}", f"{p}.self_attn.{proj}")
        km.linear(f"{o}.mlp.gate", f"{p}.mlp.gate_proj")
        km.linear(f"{o}.mlp.up", f"{p}.mlp.up_proj")
        km.linear(f"{o}.mlp.down", f"{p}.mlp.down_proj")
        for ours, theirs in norms:
            km.norm(f"{o}.{ours}", f"{p}.{theirs}")
    km.norm("ln_final", f"{prefix}.norm")
    km.map("unembed.weight", lm_head if km.has(lm_head) else f"{prefix}.embed_tokens.weight")


def map_vit_blocks(km: KeyMapper, n_layers: int, prefix: str) -> None:
    """CLIP / SigLIP encoder layers -> vision.blocks."""
    for i in range(n_layers):
        p, o = f"{prefix}.layers.{i}", f"vision.blocks.{i}"
        for proj, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            km.linear(f"{o}.attn.{ours}", f"{p}.self_attn.{proj}")
        km.linear(f"{o}.mlp.fc_in", f"{p}.mlp.fc1")
        km.linear(f"{o}.mlp.fc_out", f"{p}.mlp.fc2")
        km.norm(f"{o}.ln1", f"{p}.layer_norm1")
        km.norm(f"{o}.ln2", f"{p}.layer_norm2")


def decoder_fields(tc: Any) -> dict[str, Any]:
    """HookedVLMConfig fields of a Llama / Qwen2 text config."""
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None) or {}
    return dict(rope_scaling=rope_scaling(tc), 
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=tc.num_attention_heads,
        n_key_value_heads=tc.num_key_value_heads or tc.num_attention_heads, d_head=d_head, d_mlp=tc.intermediate_size,
        d_vocab=tc.vocab_size, act_fn=tc.hidden_act, eps=tc.rms_norm_eps, rope_theta=rope.get("rope_theta", 10000.0),
        n_ctx=tc.max_position_embeddings, mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)), layer_windows=layer_windows(tc),
    )


def layer_windows(tc: Any) -> list[int | None] | None:
    """Per-layer sliding windows of a text config, as HF applies them: Mistral slides in every layer when
    `sliding_window` is set; Qwen2 (`use_sliding_window`) from layer `max_window_layers` on, which its config
    spells out in `layer_types`. None when every layer attends to all earlier positions."""
    window = getattr(tc, "sliding_window", None)
    if window is None:
        return None
    types = getattr(tc, "layer_types", None) or ["sliding_attention"] * tc.num_hidden_layers
    windows = [int(window) if kind == "sliding_attention" else None for kind in types]
    return windows if any(w is not None for w in windows) else None


def check_config_fields(hf_config: Any, family: str, rules: tuple[FieldRules, ...], where: str = "config") -> None:
    """`Family.check_config` for one config and its sub-configs (text_config, vision_config, ...)."""
    by_class = {r.config_class: r for r in rules}
    name = type(hf_config).__name__
    if name not in by_class:
        supported = sorted({r.config_class for r in rules})
        raise ValueError(
            f"{family}: {where} has model_type {getattr(hf_config, 'model_type', '?')!r} ({name}), which is not "
            f"supported by this family (supported config classes: {supported}); see docs/supported_configurations.md"
        )
    for key, accept in by_class[name].refused.items():
        value = getattr(hf_config, key, None)
        if not accept.check(value):
            raise ValueError(f"{family}: {where}.{key} = {value!r} is not supported (supported: {accept.describe}); "
                             "see docs/supported_configurations.md")
    for sub in getattr(hf_config, "sub_configs", None) or {}:
        if getattr(hf_config, sub, None) is not None:
            check_config_fields(getattr(hf_config, sub), family, rules, f"{where}.{sub}")


# rope_parameters["rope_type"] -> how we reproduce it. Static types: HF's inv_freq and attention_scaling are copied
# at conversion (exact). Dynamic types: components/rotary.py recomputes the frequencies per call as HF does.
ROPE_TYPES = {"default": "static", "linear": "static", "yarn": "static", "llama3": "static",
              "dynamic": "recomputed beyond max_position_embeddings", "longrope": "long factors beyond "
              "original_max_position_embeddings"}


def rope_parameters_ok(types: tuple[str, ...]) -> Accept:
    """Accept rope_parameters with one of these rope types and the whole head rotated (partial_rotary_factor 1)."""

    def check(rope: Any) -> bool:
        rope = rope or {}
        return rope.get("rope_type", "default") in types and rope.get("partial_rotary_factor", 1.0) in (None, 1.0) \
            and not rope.get("mrope_interleaved", False)

    return Accept(f"rope_type in {list(types)}, partial_rotary_factor 1.0", check)


def rope_scaling(tc: Any) -> dict[str, Any] | None:
    """What components/rotary.py needs for a rope type that depends on the input length (None: static)."""
    rope = getattr(tc, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported; supported: {sorted(ROPE_TYPES)}")
    if kind == "dynamic":
        return dict(rope_type=kind, factor=rope["factor"], max_position_embeddings=tc.max_position_embeddings)
    if kind == "longrope":
        return dict(rope_type=kind, long_factor=list(rope["long_factor"]),
                    original_max_position_embeddings=rope["original_max_position_embeddings"])
    return None
