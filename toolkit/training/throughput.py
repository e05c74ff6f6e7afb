"""Model FLOP utilisation: the share of a GPU's peak bf16 FLOP/s a training run achieves.

    model FLOP/s = 6 x parameters x tokens/s     (forward 2, backward 4 FLOPs per weight per token)
    MFU          = model FLOP/s / peak bf16 FLOP/s of the device

Tokens are the text tokens of the batches (padding excluded), so less padding shows as more
useful work, not as the same.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity); the
# longest name contained in the device's name wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "H100": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.4,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The device's peak dense bf16 TFLOP/s, or None for a device not in the table."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def model_flops_utilisation(
    parameters: int, tokens_per_second: float, device_name: str
) -> float | None:
    """6 x parameters x tokens/s over the device's peak bf16 FLOP/s; None if the peak is unknown."""
    peak = peak_bf16_tflops(device_name)
    if peak is None:
        return None
    return 6 * parameters * tokens_per_second / (peak * 1e12)
