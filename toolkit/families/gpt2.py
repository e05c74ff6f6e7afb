"""GPT-2: one fused `Conv1D` `c_attn` stored [in, 3*d_model] (q|k|v), and `c_proj` [in, out]."""

from __future__ import annotations

import math

import numpy as np

from toolkit.families.base import (
    Dimensions,
    Family,
    NameMap,
    split_bias,
    split_heads_in,
    split_heads_out,
)


def dimensions(config: dict) -> Dimensions:
    n_heads = config.get("n_head", config.get("num_attention_heads"))
    d_model = config.get("n_embd", config.get("hidden_size"))
    n_layers = config.get("n_layer", config.get("num_hidden_layers"))
    return Dimensions(n_layers, n_heads, d_model, d_model // n_heads)


def layer_names(layer: int, config: dict) -> NameMap:
    block = f"h.{layer}.attn"
    return {
        "w_qkv": f"{block}.c_attn.weight",
        "b_qkv": f"{block}.c_attn.bias",
        "w0": f"{block}.c_proj.weight",
        "b0": f"{block}.c_proj.bias",
    }


def convert(tensors: dict[str, np.ndarray], dims: Dimensions) -> dict[str, np.ndarray]:
    h = dims.n_heads
    # Conv1D computes x @ weight + bias, so the stored weight is already the x @ W matrix;
    # its columns are q | k | v, each d_model wide.
    wq, wk, wv = np.split(tensors["w_qkv"], 3, axis=1)
    bq, bk, bv = np.split(tensors["b_qkv"], 3)
    return {
        "wq": split_heads_in(wq, h),
        "wk": split_heads_in(wk, h),
        "wv": split_heads_in(wv, h),
        "w0": split_heads_out(tensors["w0"], h),
        "bq": split_bias(bq, h),
        "bk": split_bias(bk, h),
        "bv": split_bias(bv, h),
        "b0": tensors["b0"],
    }


def score_scale(config: dict, layer: int, dims: Dimensions) -> float:
    scale = 1.0 / math.sqrt(dims.d_head) if config.get("scale_attn_weights", True) else 1.0
    if config.get("scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    return scale


def hook_modules(model, layer: int):
    attention = model.h[layer].attn
    # attn receives ln_1(x); c_proj produces Concat(z) @ W0 + b0 before resid_dropout.
    return attention, attention.c_proj


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    dimensions=dimensions,
    layer_names=layer_names,
    convert=convert,
    score_scale=score_scale,
    causal=True,
    hook_modules=hook_modules,
    # q, k and v share one fused Conv1D: LoRA adapts them together or not at all
    lora_targets={
        "wq": "attn.c_attn",
        "wk": "attn.c_attn",
        "wv": "attn.c_attn",
        "w0": "attn.c_proj",
    },
)
