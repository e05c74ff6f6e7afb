"""Mistral: Llama's attention layout with a sliding window (a query sees the last
`sliding_window` positions, itself included) when the config sets one."""

from __future__ import annotations

import dataclasses

from toolkit.families import llama


def sliding_window(config: dict, layer: int) -> int | None:
    return config.get("sliding_window")


FAMILY = dataclasses.replace(
    llama.FAMILY, name="mistral", model_types=("mistral",), sliding_window=sliding_window
)
