"""Colour scales that do not stretch float noise into colour: the noise floor and its test.

The heatmaps colour ratios to the weights' own size: cosines and relative changes
||W_b - W_a|| / ||W_a||. float32 weights carry about 6e-8 relative rounding (half of float32's
machine epsilon, 1.2e-7) and the sums behind each ratio add a few times that, so a spread of
values below 1e-6 of the larger of 1 and their size cannot be told from rounding: such a scale
is shown as "no change" in one flat colour instead of being stretched over the colour map.
"""

from __future__ import annotations

NOISE_FLOOR = 1e-6


def within_noise(low: float, high: float) -> bool:
    """Whether the values in [low, high] differ by no more than float rounding (see above)."""
    return high - low <= NOISE_FLOOR * max(1.0, abs(low), abs(high))
