"""The contract between model families and the rest of the toolkit.

A family adapter knows its checkpoint's tensor names and storage layout and turns one layer's
tensors into the standard per-head layout:

    wq, wk, wv : [n_heads, d_model, d_head]   head i's query is  x @ wq[i] + bq[i]
    w0         : [n_heads, d_head, d_model]   the block's output is  sum_i z_i @ w0[i] + b0
    bq, bk, bv : [n_heads, d_head]
    b0         : [d_model]

Everything downstream works on that layout only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

# role -> tensor name (without the model prefix) for one layer
NameMap = dict[str, str]


@dataclass(frozen=True)
class Dimensions:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int


@dataclass(frozen=True)
class Family:
    """One model family's adapter: names, layout conversion, and how to run it for `verify`.

    name: short family name shown to users.
    model_types: the `config.json` `model_type` values it handles.
    dimensions(config): the model's Dimensions.
    layer_names(layer): role -> checkpoint name for that layer's attention tensors.
    convert(tensors, dims): role -> array dict, into the standard layout (see module doc).
    score_scale(config, layer, dims): the factor the model multiplies q.k by.
    causal: whether a token attends only to itself and earlier tokens.
    hook_modules(model, layer): (module whose input is the attention block's input,
        module whose output is the block's output before dropout and residual).
    lora_targets: role (wq, wk, wv, w0) -> the name, as `peft` matches it (a suffix of the
        module's path), of the `nn.Linear`/`Conv1D` that holds the role's weight in every layer;
        roles stored fused in one module map to the same name. Empty: LoRA is not supported.
    """

    name: str
    model_types: tuple[str, ...]
    dimensions: Callable[[dict], Dimensions]
    layer_names: Callable[[int], NameMap]
    convert: Callable[[dict[str, np.ndarray], Dimensions], dict[str, np.ndarray]]
    score_scale: Callable[[dict, int, Dimensions], float]
    causal: bool
    hook_modules: Callable[[object, int], tuple[object, object]]
    lora_targets: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # the functions' addresses say nothing to a reader
        return f"Family({self.name!r}, model_types={self.model_types}, causal={self.causal})"


def split_heads_in(weight_in_out: np.ndarray, n_heads: int) -> np.ndarray:
    """[d_model, n_heads*d_head] (x @ W layout) -> [n_heads, d_model, d_head], as a view."""
    d_model, width = weight_in_out.shape
    return weight_in_out.reshape(d_model, n_heads, width // n_heads).transpose(1, 0, 2)


def split_heads_out(weight_in_out: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*d_head, d_model] (z @ W layout) -> [n_heads, d_head, d_model], as a view."""
    width, d_model = weight_in_out.shape
    return weight_in_out.reshape(n_heads, width // n_heads, d_model)


def split_bias(bias: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*d_head] -> [n_heads, d_head]."""
    return bias.reshape(n_heads, -1)
