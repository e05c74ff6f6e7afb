"""Registry of model families: adding one means one new module and one line in FAMILIES."""

from __future__ import annotations

from toolkit.errors import ToolkitError
from toolkit.families import bert, distilbert, gpt2, llama, mistral, qwen2, roberta
from toolkit.families.base import Dimensions, Family

FAMILIES: tuple[Family, ...] = (
    bert.FAMILY,
    gpt2.FAMILY,
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    roberta.FAMILY,
    distilbert.FAMILY,
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for_config(config: dict) -> Family:
    """The adapter for a `config.json`, or a clear error naming the supported families."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = ", ".join(config.get("architectures") or []) or "unknown architecture"
    raise ToolkitError(
        f"model_type '{model_type}' ({architectures}) is not supported: supported families are "
        f"{', '.join(supported_model_types())}"
    )


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ToolkitError(
        f"unknown family '{name}': known families are {', '.join(f.name for f in FAMILIES)}"
    )


__all__ = ["FAMILIES", "Dimensions", "Family", "family_by_name", "family_for_config"]
