"""Attention described by pattern: where a layer keeps its q/k/v/o projections, how they are
stored, and how its scores are computed, as data shared by every architecture that follows it.

A `Pattern` names the storage (separate q/k/v/o, one fused [q; k; v] block, fused per head
[h, 3, d_head], Conv1D or nn.Linear) and the score details (positions, a learned
relative-position bias, q/k norms); an architecture is a registry line: model types, a pattern,
and the config rules that differ (which biases exist, how many key/value heads). `family(...)`
turns that description into the `Family` contract of `toolkit.families.base`, so nothing
downstream knows about patterns.

Config rules read a `config.json` dict only: the names transformers' configs use for the same
quantity (`num_attention_heads`, `n_head`, `attention_heads`, ...) are tried in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.families.base import (
    ALL_BIASES,
    Dimensions,
    Family,
    NameMap,
    RelativeBias,
    split_bias,
    split_heads_in,
    split_heads_out,
)

BLOCKS = "blocks"  # fused rows [q (h*d_head); k (h_kv*d_head); v (h_kv*d_head)]
# fused rows per key/value group [h_kv, h/h_kv + 2 (the group's q heads, k, v), d_head]:
# [h, 3, d_head] when h_kv = h (GPT-NeoX, BLOOM), [1, h + 2, d_head] for multi-query (Falcon)
PER_GROUP = "per key/value group"
# CodeGen: rows [4 groups, 3 (q, v, k), h/4 heads, d_head], heads numbered group by group
FOUR_GROUPS_QVK = "four groups [q; v; k]"


@dataclass(frozen=True)
class Projections:
    """Where one layer's attention lives. `block` is the attention module's path (with a
    `{layer}` field), the same under the base model and in the checkpoint's tensor names; the
    projections are paths inside it. `qkv` replaces q, k and v when they are one fused module."""

    block: str
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    qkv_layout: str = BLOCKS
    conv1d: bool = (
        False  # weights stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in]
    )

    def modules(self) -> dict[str, str]:
        """role -> module path inside the block (fused roles share one path)."""
        if self.qkv:
            return {"wq": self.qkv, "wk": self.qkv, "wv": self.qkv, "w0": self.o}
        return {"wq": self.q, "wk": self.k, "wv": self.v, "w0": self.o}


@dataclass(frozen=True)
class Pattern:
    """One way of keeping and computing attention, shared by every architecture that uses it."""

    name: str
    projections: Projections
    causal: bool = True
    # "rotary", "learned absolute", "sinusoidal", "alibi", "learned absolute + relative bias"
    positions: str = "rotary"
    relative_bias: RelativeBias | None = None  # the table every layer's scores add (MPNet)
    rotary_interleaved: bool = False  # GPT-J: pairs (2j, 2j+1) instead of (j, j + r/2)
    qk_norm: tuple[str, str] | None = None  # q and k norm modules inside the block
    qk_norm_over_heads: bool = False  # OLMo 2: one norm over all heads' h*d_head values
    qk_norm_heads_first: bool = False  # StableLM: the norm sees [batch, heads, tokens, d_head]
    features: tuple[str, ...] = ()  # what a reader should know, for `toolkit families`


# --- config rules ---------------------------------------------------------------------------

N_LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
N_HEADS = ("num_attention_heads", "n_head", "n_heads", "attention_heads", "num_heads")
D_MODEL = ("hidden_size", "n_embd", "d_model", "dim")
N_KV_HEADS = ("num_key_value_heads",)


def first_of(config: dict, keys: tuple[str, ...], default=None):
    """The value of the first of `keys` the config sets (not None)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise KeyError(" or ".join(f"'{key}'" for key in keys))
    return default


def kv_heads_from_keys(config: dict, n_heads: int) -> int:
    """`num_key_value_heads` (grouped-query), 1 for `multi_query` models, else one per head."""
    if config.get("multi_query"):
        return 1
    return first_of(config, N_KV_HEADS, n_heads)


def falcon_kv_heads(config: dict, n_heads: int) -> int:
    """Falcon keeps `num_kv_heads` in every config but uses it only with the new decoder."""
    if config.get("new_decoder_architecture"):
        return config.get("num_kv_heads") or n_heads
    return 1 if config.get("multi_query") else n_heads


def dimensions_from(kv_heads: Callable[[dict, int], int]) -> Callable[[dict], Dimensions]:
    def dimensions(config: dict) -> Dimensions:
        n_heads, d_model = first_of(config, N_HEADS), first_of(config, D_MODEL)
        d_head = config.get("head_dim") or d_model // n_heads
        n_kv_heads = kv_heads(config, n_heads)
        return Dimensions(first_of(config, N_LAYERS), n_heads, d_model, d_head, n_kv_heads)

    return dimensions


def biases_always(*roles: str) -> Callable[[dict], tuple[str, ...]]:
    return lambda config: roles or ALL_BIASES


def biases_when(
    key: str, roles: tuple[str, ...] = ALL_BIASES, default: bool = False
) -> Callable[[dict], tuple[str, ...]]:
    """`roles` when the config's `key` is true (`default` when it is absent), else none."""
    return lambda config: roles if config.get(key, default) else ()


def biases_unless(key: str) -> Callable[[dict], tuple[str, ...]]:
    """Every bias unless the config's `key` (MPT's `no_bias`) is true."""
    return lambda config: () if config.get(key, True) else ALL_BIASES


def score_scale(config: dict, layer: int, dims: Dimensions) -> float:
    """The factor q . k is multiplied by: 1/sqrt(d_head) unless the config says otherwise
    (Gemma's `query_pre_attn_scalar`, Granite's `attention_multiplier`, GPT-2's switches)."""
    if config.get("attention_multiplier") is not None:
        return float(config["attention_multiplier"])
    if config.get("query_pre_attn_scalar") is not None:
        return float(config["query_pre_attn_scalar"]) ** -0.5
    softmax_scale = (config.get("attn_config") or {}).get("softmax_scale")  # MPT
    if softmax_scale is not None:
        return float(softmax_scale)
    scale = dims.d_head**-0.5 if config.get("scale_attn_weights", True) else 1.0
    if config.get("scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    return scale


def sliding_window(config: dict, layer: int) -> int | None:
    """The layer's window: per layer where `layer_types` marks "sliding_attention" layers,
    else the config's `sliding_window` on every layer (Mistral) unless switched off."""
    layer_types = config.get("layer_types")
    if layer_types:
        sliding = layer < len(layer_types) and layer_types[layer] == "sliding_attention"
        return config.get("sliding_window") if sliding else None
    if config.get("use_sliding_window") is False:
        return None
    return config.get("sliding_window")


def logit_softcap(config: dict) -> float | None:
    """Gemma 2's cap: scores become cap * tanh(scores / cap) before the mask."""
    return config.get("attn_logit_softcapping")


def rotary_on_every_layer(config: dict, layer: int) -> bool:
    """False on SmolLM3's NoPE layers (`no_rope_layers[layer] == 0`)."""
    no_rope = config.get("no_rope_layers")
    return not no_rope or layer >= len(no_rope) or bool(no_rope[layer])


# --- layouts: checkpoint tensors -> the standard per-head tensors ------------------------------


def layer_names_for(projections: Projections, biases: Callable[[dict], tuple[str, ...]]):
    def layer_names(layer: int, config: dict) -> NameMap:
        block = projections.block.format(layer=layer)
        if projections.qkv:
            names = {"w_qkv": f"{block}.{projections.qkv}.weight"}
            if set(biases(config)) & {"bq", "bk", "bv"}:
                names["b_qkv"] = f"{block}.{projections.qkv}.bias"
        else:
            names = {role: f"{block}.{path}.weight" for role, path in projections.modules().items()}
            for role in set(biases(config)) - {"b0"}:
                names[role] = f"{block}.{projections.modules()['w' + role[1:]]}.bias"
        names["w0"] = f"{block}.{projections.o}.weight"
        if "b0" in biases(config):
            names["b0"] = f"{block}.{projections.o}.bias"
        return names

    return layer_names


def convert_for(projections: Projections):
    def convert(tensors: dict[str, np.ndarray], dims: Dimensions) -> dict[str, np.ndarray]:
        # nn.Linear computes x @ weight.T, Conv1D x @ weight: `in_out` is the x @ W matrix.
        def in_out(weight: np.ndarray) -> np.ndarray:
            return weight if projections.conv1d else weight.T

        h, h_kv = dims.n_heads, dims.n_kv_heads
        heads = {"q": h, "k": h_kv, "v": h_kv}
        if "w_qkv" in tensors:
            standard = _split_fused(projections, tensors, in_out, dims)
        else:
            standard = {"w" + r: split_heads_in(in_out(tensors["w" + r]), heads[r]) for r in "qkv"}
            standard.update(
                {
                    "b" + r: split_bias(tensors["b" + r], heads[r])
                    for r in "qkv"
                    if "b" + r in tensors
                }
            )
        standard["w0"] = split_heads_out(in_out(tensors["w0"]), h)
        if "b0" in tensors:
            standard["b0"] = tensors["b0"]
        return standard

    return convert


def _split_fused(projections: Projections, tensors: dict, in_out, dims: Dimensions) -> dict:
    """wq/wk/wv [heads, d_model, d_head] and bq/bk/bv [heads, d_head] of a fused module, as
    views (reshapes, slices and transposes only)."""
    h, h_kv, d_head = dims.n_heads, dims.n_kv_heads, dims.d_head
    weight = in_out(tensors["w_qkv"])  # [d_model, width]
    bias = tensors.get("b_qkv")  # [width]
    if weight.shape[1] != (h + 2 * h_kv) * d_head:
        raise ToolkitError(
            f"the fused {projections.qkv} is {weight.shape[1]} wide, not the "
            f"(heads {h} + 2 x key/value heads {h_kv}) x d_head {d_head} its config says"
        )
    if projections.qkv_layout == PER_GROUP:
        # columns [h_kv, group + 2, d_head]: a group's query heads, then its key and value head
        d_model, group = weight.shape[0], h // h_kv
        grouped = weight.reshape(d_model, h_kv, group + 2, d_head)
        standard = {
            "wq": grouped[:, :, :group].reshape(d_model, h, d_head).transpose(1, 0, 2),
            "wk": grouped[:, :, group].transpose(1, 0, 2),
            "wv": grouped[:, :, group + 1].transpose(1, 0, 2),
        }
        if bias is not None:
            grouped_bias = bias.reshape(h_kv, group + 2, d_head)
            standard["bq"] = grouped_bias[:, :group].reshape(h, d_head)
            standard["bk"], standard["bv"] = grouped_bias[:, group], grouped_bias[:, group + 1]
        return standard
    if projections.qkv_layout == FOUR_GROUPS_QVK:
        d_model = weight.shape[0]
        grouped = weight.reshape(d_model, 4, 3, h // 4, d_head)
        standard = {
            "w" + r: grouped[:, :, i].reshape(d_model, h, d_head).transpose(1, 0, 2)
            for i, r in enumerate("qvk")
        }
        return standard  # CodeGen's fused projection has no bias
    heads = {"q": h, "k": h_kv, "v": h_kv}
    edges = np.cumsum([h * d_head, h_kv * d_head])
    columns = dict(zip("qkv", np.split(weight, edges, axis=1), strict=True))
    standard = {"w" + r: split_heads_in(columns[r], heads[r]) for r in "qkv"}
    if bias is not None:
        parts = dict(zip("qkv", np.split(bias, edges), strict=True))
        standard.update({"b" + r: split_bias(parts[r], heads[r]) for r in "qkv"})
    return standard


def module_at(model, path: str):
    """The module at `path` under the base model (AutoModel's model, or a task model's base)."""
    base = getattr(model, "base_model", model)
    return base.get_submodule(path)


def hook_modules_for(projections: Projections):
    def hook_modules(model, layer: int):
        block = module_at(model, projections.block.format(layer=layer))
        # the block receives its input as the first argument (or `hidden_states`); the output
        # projection produces Concat(z) @ W0 (+ b0) before dropout and the residual.
        return block, block.get_submodule(projections.o)

    return hook_modules


def qk_norms_for(pattern: Pattern):
    def qk_norms(model, layer: int):
        """The layer's (q norm, k norm) modules; None where the config switched them off
        (Phi's `qk_layernorm`, StableLM's, Cohere's `use_qk_norm`): the model has no module."""
        block = module_at(model, pattern.projections.block.format(layer=layer))
        norms = tuple(getattr(block, name, None) for name in pattern.qk_norm)
        return None if None in norms else norms

    return qk_norms


def lora_targets_for(projections: Projections) -> dict[str, str]:
    """role -> peft target name: the block's last path component and the projection's path."""
    block = projections.block.rsplit("}.", 1)[-1]
    return {role: f"{block}.{path}" for role, path in projections.modules().items()}


def positions_for(pattern: Pattern):
    def positions(config: dict) -> dict:
        if pattern.positions != "rotary":
            described = {"scheme": pattern.positions}
            if pattern.positions == "learned absolute" and config.get("model_type") == "opt":
                described["offset"] = 2  # OPT's position ids start at 2
            if pattern.relative_bias is not None:
                described["buckets"] = pattern.relative_bias.num_buckets
                described["max_distance"] = pattern.relative_bias.max_distance
            return described
        from toolkit.families.rotary import rope_settings

        settings = {"scheme": "rotary", **rope_settings(config)}
        if pattern.rotary_interleaved:
            settings["interleaved"] = True
        if config.get("no_rope_layers"):
            settings["layers_without_rotary"] = [
                i for i, on in enumerate(config["no_rope_layers"]) if not on
            ]
        return settings

    return positions


@dataclass(frozen=True)
class Architecture:
    """A registry line: model types that follow `pattern`, with the config rules that vary."""

    name: str
    model_types: tuple[str, ...]
    pattern: Pattern
    biases: Callable[[dict], tuple[str, ...]] = field(default=biases_when("attention_bias"))
    kv_heads: Callable[[dict, int], int] = kv_heads_from_keys
    refused: str | None = None  # a feature the recomputation cannot express faithfully
    applies: Callable[[dict], bool] = lambda config: True  # configs this line describes


def family(architecture: Architecture) -> Family:
    """The `Family` contract of one registry line."""
    from toolkit.families.rotary import rotary_from_config

    pattern = architecture.pattern
    projections = pattern.projections
    rotary = pattern.positions == "rotary"
    return Family(
        name=architecture.name,
        model_types=architecture.model_types,
        dimensions=dimensions_from(architecture.kv_heads),
        layer_names=layer_names_for(projections, architecture.biases),
        convert=convert_for(projections),
        score_scale=score_scale,
        causal=pattern.causal,
        hook_modules=hook_modules_for(projections),
        bias_roles=architecture.biases,
        sliding_window=sliding_window,
        rotary=(
            (lambda config: rotary_from_config(config, pattern.rotary_interleaved))
            if rotary
            else (lambda config: None)
        ),
        positions=positions_for(pattern),
        lora_targets=lora_targets_for(projections),
        conv1d=projections.conv1d,
        pattern=pattern.name,
        alibi=pattern.positions == "alibi",
        relative_bias=pattern.relative_bias,
        logit_softcap=logit_softcap,
        rotary_on_layer=rotary_on_every_layer,
        qk_norms=qk_norms_for(pattern) if pattern.qk_norm else None,
        qk_norm_over_heads=pattern.qk_norm_over_heads,
        qk_norm_heads_first=pattern.qk_norm_heads_first,
        refused=architecture.refused,
    )
