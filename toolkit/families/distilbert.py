"""DistilBERT: separate `nn.Linear` q_lin/k_lin/v_lin/out_lin stored [out, in], under
`transformer.layer.{l}.attention`; bidirectional, learned absolute positions."""

from __future__ import annotations

import dataclasses

from toolkit.families import bert
from toolkit.families.base import Dimensions, NameMap


def dimensions(config: dict) -> Dimensions:
    n_heads, d_model = config["n_heads"], config["dim"]
    return Dimensions(config["n_layers"], n_heads, d_model, d_model // n_heads)


def layer_names(layer: int, config: dict) -> NameMap:
    block = f"transformer.layer.{layer}.attention"
    names = {"q": "wq", "k": "wk", "v": "wv", "out": "w0"}
    return {
        **{role: f"{block}.{lin}_lin.weight" for lin, role in names.items()},
        **{"b" + role[1:]: f"{block}.{lin}_lin.bias" for lin, role in names.items()},
    }


def hook_modules(model, layer: int):
    attention = model.transformer.layer[layer].attention
    # attention receives the block input (as query, key and value); out_lin produces
    # Concat(z) @ W0 + b0 before the residual and LayerNorm.
    return attention, attention.out_lin


# BERT's layout conversion, scale and bidirectional mask under other names
FAMILY = dataclasses.replace(
    bert.FAMILY,
    name="distilbert",
    model_types=("distilbert",),
    dimensions=dimensions,
    layer_names=layer_names,
    hook_modules=hook_modules,
    lora_targets={
        "wq": "attention.q_lin",
        "wk": "attention.k_lin",
        "wv": "attention.v_lin",
        "w0": "attention.out_lin",
    },
)
