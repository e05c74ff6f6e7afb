"""BERT: separate `nn.Linear` query/key/value and `attention.output.dense`, stored [out, in]."""

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
    n_heads = config["num_attention_heads"]
    d_model = config["hidden_size"]
    return Dimensions(config["num_hidden_layers"], n_heads, d_model, d_model // n_heads)


def layer_names(layer: int, config: dict) -> NameMap:
    block = f"encoder.layer.{layer}.attention"
    return {
        "wq": f"{block}.self.query.weight",
        "wk": f"{block}.self.key.weight",
        "wv": f"{block}.self.value.weight",
        "w0": f"{block}.output.dense.weight",
        "bq": f"{block}.self.query.bias",
        "bk": f"{block}.self.key.bias",
        "bv": f"{block}.self.value.bias",
        "b0": f"{block}.output.dense.bias",
    }


def convert(tensors: dict[str, np.ndarray], dims: Dimensions) -> dict[str, np.ndarray]:
    h = dims.n_heads
    # nn.Linear computes x @ weight.T, so weight.T is the x @ W matrix.
    return {
        "wq": split_heads_in(tensors["wq"].T, h),
        "wk": split_heads_in(tensors["wk"].T, h),
        "wv": split_heads_in(tensors["wv"].T, h),
        "w0": split_heads_out(tensors["w0"].T, h),
        "bq": split_bias(tensors["bq"], h),
        "bk": split_bias(tensors["bk"], h),
        "bv": split_bias(tensors["bv"], h),
        "b0": tensors["b0"],
    }


def score_scale(config: dict, layer: int, dims: Dimensions) -> float:
    return 1.0 / math.sqrt(dims.d_head)


def hook_modules(model, layer: int):
    attention = model.encoder.layer[layer].attention
    # attention.self receives the block input; output.dense produces Concat(z) @ W0 + b0,
    # before dropout, the residual and LayerNorm.
    return attention.self, attention.output.dense


FAMILY = Family(
    name="bert",
    model_types=("bert",),
    dimensions=dimensions,
    layer_names=layer_names,
    convert=convert,
    score_scale=score_scale,
    causal=False,
    hook_modules=hook_modules,
    lora_targets={
        "wq": "attention.self.query",
        "wk": "attention.self.key",
        "wv": "attention.self.value",
        "w0": "attention.output.dense",
    },
)
