"""Qwen2 (Qwen1.5, Qwen2, Qwen2.5): Llama's attention layout with q/k/v biases (no o_proj bias),
and a sliding window on the layers `layer_types` marks "sliding_attention"."""

from __future__ import annotations

import dataclasses

from toolkit.families import llama


def bias_roles(config: dict) -> tuple[str, ...]:
    return ("bq", "bk", "bv")


def sliding_window(config: dict, layer: int) -> int | None:
    layer_types = config.get("layer_types") or []
    if layer < len(layer_types) and layer_types[layer] == "sliding_attention":
        return config.get("sliding_window")
    return None


FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="qwen2",
    model_types=("qwen2",),
    layer_names=llama.names_with(bias_roles),
    bias_roles=bias_roles,
    sliding_window=sliding_window,
)
