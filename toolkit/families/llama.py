"""Llama (Llama 2/3, TinyLlama, SmolLM2): separate bias-free `nn.Linear` q/k/v/o_proj stored
[out, in], grouped-query attention (`num_key_value_heads`), rotary positions, causal.

Mistral and Qwen2 store their attention the same way; their adapters reuse these functions.
"""

from __future__ import annotations

from collections.abc import Callable

from toolkit.families.base import (
    ALL_BIASES,
    Dimensions,
    Family,
    NameMap,
    split_bias,
    split_heads_in,
    split_heads_out,
)
from toolkit.families.rotary import rope_settings, rotary_from_config


def dimensions(config: dict) -> Dimensions:
    n_heads = config["num_attention_heads"]
    d_model = config["hidden_size"]
    d_head = config.get("head_dim") or d_model // n_heads
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    return Dimensions(config["num_hidden_layers"], n_heads, d_model, d_head, n_kv_heads)


def bias_roles(config: dict) -> tuple[str, ...]:
    return ALL_BIASES if config.get("attention_bias") else ()


_PROJECTIONS = {"wq": "q", "wk": "k", "wv": "v", "w0": "o"}


def names_with(biases: Callable[[dict], tuple[str, ...]]) -> Callable[[int, dict], NameMap]:
    """`layer_names` for q/k/v/o_proj with the biases that `biases(config)` says exist."""

    def layer_names(layer: int, config: dict) -> NameMap:
        block = f"layers.{layer}.self_attn"
        names = {role: f"{block}.{proj}_proj.weight" for role, proj in _PROJECTIONS.items()}
        for role in biases(config):
            names[role] = f"{block}.{_PROJECTIONS['w' + role[1:]]}_proj.bias"
        return names

    return layer_names


def convert(tensors: dict, dims: Dimensions) -> dict:
    h, h_kv = dims.n_heads, dims.n_kv_heads
    heads = {"wq": h, "wk": h_kv, "wv": h_kv}
    # nn.Linear computes x @ weight.T, so weight.T is the x @ W matrix.
    standard = {role: split_heads_in(tensors[role].T, n) for role, n in heads.items()}
    standard["w0"] = split_heads_out(tensors["w0"].T, h)
    for role, n in {"bq": h, "bk": h_kv, "bv": h_kv}.items():
        if role in tensors:
            standard[role] = split_bias(tensors[role], n)
    if "b0" in tensors:
        standard["b0"] = tensors["b0"]
    return standard


def score_scale(config: dict, layer: int, dims: Dimensions) -> float:
    return dims.d_head**-0.5


def positions(config: dict) -> dict:
    return {"scheme": "rotary", **rope_settings(config)}


def hook_modules(model, layer: int):
    attention = _decoder(model).layers[layer].self_attn
    # self_attn receives the normed block input; o_proj produces Concat(z) @ W0 (+ b0).
    return attention, attention.o_proj


def _decoder(model):
    """The decoder stack: the model itself (LlamaModel) or its `.model` (LlamaForCausalLM)."""
    return model if hasattr(model, "layers") else model.model


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    dimensions=dimensions,
    layer_names=names_with(bias_roles),
    convert=convert,
    score_scale=score_scale,
    causal=True,
    hook_modules=hook_modules,
    bias_roles=bias_roles,
    rotary=rotary_from_config,
    positions=positions,
    lora_targets={
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "w0": "self_attn.o_proj",
    },
)
