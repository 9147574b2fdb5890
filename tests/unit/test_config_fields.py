"""Every field of every HF config class a family converts is implemented, ignored with a reason, or refused by
name (families/base.py `FieldRules`). The walk runs over the installed transformers, so a field a new release
adds fails here, in CI, instead of silently changing a user's logits. Unsupported backbones and refused values
raise at conversion, naming them."""
from __future__ import annotations

import dataclasses

import pytest
import transformers
from tiny import tiny_llava, tiny_qwen_vl

from hooked_vlm import HookedVLM
from hooked_vlm.families import FAMILIES, Family, get_family
from hooked_vlm.families.base import COMMON_FIELDS, FieldRules


def class_fields(cls) -> set[str]:
    cfg = cls()
    names = set(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        names |= {f.name for f in dataclasses.fields(cfg)}
    return {n for n in names if not n.startswith("__")}


def undeclared(family: Family) -> list[str]:
    """Problems with a family's declarations, each naming the family (empty: complete)."""
    name = type(family).__name__
    if not family.config_fields:
        return [f"family {family.model_type!r} ({name}) declares no config_fields (families/base.py FieldRules)"]
    problems = []
    by_class = {r.config_class: r for r in family.config_fields}
    top = transformers.CONFIG_MAPPING[family.model_type].__name__
    if top not in by_class:
        problems.append(f"{family.model_type}: its HF config class {top} has no FieldRules")
    for rules in family.config_fields:
        cls = getattr(transformers, rules.config_class, None)
        if cls is None:
            problems.append(f"{family.model_type}: transformers {transformers.__version__} has no {rules.config_class}")
            continue
        for sub, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
            if sub_cls is not transformers.AutoConfig and sub_cls.__name__ not in by_class:
                problems.append(f"{family.model_type}: {rules.config_class}.{sub} ({sub_cls.__name__}) has no FieldRules")
        lists = [set(rules.implemented), set(rules.ignored), set(rules.refused)]
        twice = (lists[0] & lists[1]) | (lists[0] & lists[2]) | (lists[1] & lists[2])
        if twice:
            problems.append(f"{family.model_type}: {rules.config_class} declares {sorted(twice)} in two lists")
        missing = class_fields(cls) - rules.declared() - COMMON_FIELDS.declared()
        if missing:
            problems.append(f"{family.model_type}: {rules.config_class} fields {sorted(missing)} are neither "
                            "implemented, ignored with a reason nor refused")
    return problems


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_config_field_is_declared(model_type):
    assert undeclared(get_family(model_type)) == []


def test_common_fields_are_declared():
    assert class_fields(transformers.PreTrainedConfig) - COMMON_FIELDS.declared() == set()


def test_the_walk_catches_a_family_without_declarations_and_a_new_field():
    class Bare(Family):
        model_type = "llava"

    assert "declares no config_fields" in undeclared(Bare())[0] and "Bare" in undeclared(Bare())[0]
    llava = get_family("llava")

    class Partial(type(llava)):
        config_fields = tuple(r if r.config_class != "LlamaConfig" else
                              FieldRules("LlamaConfig", implemented=tuple(f for f in r.implemented if f != "head_dim"),
                                         ignored=r.ignored, refused=r.refused) for r in llava.config_fields)

    assert any("LlamaConfig fields ['head_dim']" in p for p in undeclared(Partial()))


def test_ignored_fields_give_a_reason():
    for family in FAMILIES.values():
        for rules in family.config_fields:
            for key, why in rules.ignored.items():
                assert isinstance(why, str) and len(why) > 10, (family.model_type, rules.config_class, key)


# --------------------------------------------------------------------------------------- refused at conversion
def tiny_llava_with_text(text_config):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=text_config, image_token_id=63))


@pytest.mark.parametrize("name", ["GemmaConfig", "GraniteConfig", "Phi3Config", "Qwen3Config"])
def test_unsupported_text_backbones_are_refused_by_model_type(name):
    cls = getattr(transformers, name)
    tc = cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, pad_token_id=0)
    hf = tiny_llava_with_text(tc)
    with pytest.raises(ValueError, match=rf"model_type {tc.model_type!r} \({name}\), which is not supported"):
        HookedVLM.from_hf(hf)
    for model_type in ("llava_onevision",):
        with pytest.raises(ValueError, match=rf"model_type {tc.model_type!r}"):
            get_family(model_type).check_config(transformers.LlavaOnevisionConfig(text_config=tc))


def test_llava_next_is_refused_by_name():
    """llava-v1.6 (llava_next) is not a supported family: refused naming it, before any weight is read."""
    with pytest.raises(ValueError, match=r"unsupported model_type 'llava_next'"):
        get_family(transformers.LlavaNextConfig().model_type)


def test_onevision_refuses_a_clip_tower():
    cfg = transformers.LlavaOnevisionConfig(vision_config=transformers.CLIPVisionConfig())
    with pytest.raises(ValueError, match=r"config\.vision_config has model_type 'clip_vision_model'"):
        get_family("llava_onevision").check_config(cfg)


@pytest.mark.parametrize("rope,match", [
    (dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_refused_rope_values_are_named(rope, match):
    hf = tiny_llava(rope_parameters=rope)
    with pytest.raises(ValueError, match=rf"config\.text_config\.rope_parameters = .*{match}.* is not supported"):
        HookedVLM.from_hf(hf)


def test_qwen_refuses_sliding_layers_and_scaled_rope():
    hf = tiny_qwen_vl()
    tc = hf.config.text_config
    tc.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=r"config\.text_config\.layer_types = \['full_attention', 'sliding_attention'"):
        HookedVLM.from_hf(hf)
    tc.layer_types = ["full_attention"] * 3
    tc.rope_parameters = dict(tc.rope_parameters, rope_type="linear", factor=2.0)
    with pytest.raises(ValueError, match=r"config\.text_config\.rope_parameters = .*'linear'.* is not supported"):
        HookedVLM.from_hf(hf)
    tc.rope_parameters = dict(tc.rope_parameters, rope_type="default")
    assert isinstance(HookedVLM.from_hf(hf), HookedVLM)  # back to a supported config: converts


def test_refusal_happens_before_weights_are_read(tmp_path):
    """from_pretrained checks the config first: an unsupported backbone fails without loading the weights."""
    from transformers import GemmaConfig

    hf = tiny_llava_with_text(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    hf.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")  # would fail to load if it were read
    with pytest.raises(ValueError, match=r"'gemma'"):
        HookedVLM.from_pretrained(str(tmp_path), processor=None)


def test_supported_configurations_page_is_current():
    """docs/supported_configurations.md's generated part equals the declarations (every refused field listed)."""
    from hooked_vlm.families.declarations_doc import PAGE, render

    page = PAGE.read_text()
    assert render() in page, "run `python -m hooked_vlm.families.declarations_doc` to regenerate the page"
    for family in FAMILIES.values():
        for rules in family.config_fields:
            for key in rules.refused:
                assert f"`{key}`" in page and rules.config_class in page
