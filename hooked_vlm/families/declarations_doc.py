"""Renders the families' `config_fields` declarations (families/base.py `FieldRules`) as the generated part of
docs/supported_configurations.md. tests/unit/test_config_fields.py checks the page is current; after changing a
declaration, rewrite it with `python -m hooked_vlm.families.declarations_doc`."""
from __future__ import annotations

from pathlib import Path

from . import FAMILIES
from .base import COMMON_FIELDS, ROPE_TYPES, FieldRules

BEGIN = "<!-- generated from the declarations: python -m hooked_vlm.families.declarations_doc -->"
END = "<!-- end of generated part -->"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "supported_configurations.md"


def _rules(r: FieldRules) -> list[str]:
    lines = [f"**{r.config_class}**", ""]
    if r.implemented:
        lines.append("- implemented: " + ", ".join(f"`{k}`" for k in sorted(r.implemented)))
    for key, why in sorted(r.ignored.items()):
        lines.append(f"- ignored: `{key}`: {why}")
    for key, accept in sorted(r.refused.items()):
        lines.append(f"- **refused** unless {accept.describe}: `{key}`")
    return lines + [""]


def render() -> str:
    """The generated part of the page, markers included."""
    out = [BEGIN, "", "### Rope types (`rope_parameters[\"rope_type\"]`) of Llama / Mistral / Qwen2 decoders", "",
           "| rope_type | how |", "|---|---|"]
    out += [f"| `{kind}` | {how} |" for kind, how in ROPE_TYPES.items()]
    out += ["", "Any other rope type, and `partial_rotary_factor` other than 1.0, is refused by name. The Qwen-VL "
            "decoders (M-RoPE) take `default` only.", "", "### Fields every HF config has", ""]
    out += _rules(COMMON_FIELDS)
    for model_type, family in sorted(FAMILIES.items()):
        classes = ", ".join(r.config_class for r in family.config_fields)
        out += [f"### `{model_type}`", "", f"Config classes converted: {classes}. Any other class in their place (a "
                "text backbone or vision tower of another model_type) is refused by model_type.", ""]
        for rules in family.config_fields:
            out += _rules(rules)
    return "\n".join(out + [END])


def write(page: Path = PAGE) -> None:
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(head + render() + tail)


if __name__ == "__main__":
    write()
