"""Registry of model families: one line per architecture, naming the attention pattern it
follows (`toolkit.families.pattern`) and the config rules that differ."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from toolkit.errors import ToolkitError
from toolkit.families.base import ALL_BIASES, Dimensions, Family, RelativeBias
from toolkit.families.pattern import (
    FOUR_GROUPS_QVK,
    PER_GROUP,
    Architecture,
    Pattern,
    Projections,
    biases_always,
    biases_unless,
    biases_when,
    falcon_kv_heads,
    family,
)

# --- patterns: one per way of keeping and computing attention ------------------------------

ENCODER = Pattern(
    "separate query/key/value, bidirectional",
    Projections(
        "encoder.layer.{layer}.attention", "self.query", "self.key", "self.value", "output.dense"
    ),
    causal=False,
    positions="learned absolute",
)
DISTILBERT = Pattern(
    "separate q_lin/k_lin/v_lin, bidirectional",
    Projections("transformer.layer.{layer}.attention", "q_lin", "k_lin", "v_lin", "out_lin"),
    causal=False,
    positions="learned absolute",
)
CONV1D = Pattern(
    "fused Conv1D c_attn [q; k; v]",
    Projections("h.{layer}.attn", qkv="c_attn", o="c_proj", conv1d=True),
    positions="learned absolute",
)
FUSED_LINEAR_LEARNED = Pattern(
    "fused nn.Linear c_attn per key/value group, learned positions",
    # multi-query: [q (h*d_head); k; v]; multi-head: [h, 3, d_head]
    Projections("h.{layer}.attn", qkv="c_attn", o="c_proj", qkv_layout=PER_GROUP),
    positions="learned absolute",
)
ROTARY = Pattern("separate q/k/v/o_proj, rotary", Projections("layers.{layer}.self_attn"))
ROTARY_QK_NORM = Pattern(
    "separate q/k/v/o_proj, rotary, per-head q/k norms",
    Projections("layers.{layer}.self_attn"),
    qk_norm=("q_norm", "k_norm"),
)
ROTARY_QK_NORM_OVER_HEADS = Pattern(
    "separate q/k/v/o_proj, rotary, q/k norms over all heads",
    Projections("layers.{layer}.self_attn"),
    qk_norm=("q_norm", "k_norm"),
    qk_norm_over_heads=True,
)
ROTARY_INTERLEAVED = Pattern(
    "separate q/k/v/o_proj, interleaved rotary",
    Projections("layers.{layer}.self_attn"),
    rotary_interleaved=True,
)
ROTARY_DENSE = Pattern(
    "separate q/k/v_proj and dense, partial rotary, optional q/k norms",
    Projections("layers.{layer}.self_attn", o="dense"),
    qk_norm=("q_layernorm", "k_layernorm"),
)
ROTARY_NORM_PER_HEAD_MODULE = Pattern(
    "separate q/k/v/o_proj, partial rotary, optional q/k norms one module per head",
    Projections("layers.{layer}.self_attn"),
    qk_norm=("q_layernorm", "k_layernorm"),
    qk_norm_heads_first=True,
)
ROTARY_INTERLEAVED_QK_NORM = Pattern(
    "separate q/k/v/o_proj, interleaved rotary, optional per-head q/k norms",
    Projections("layers.{layer}.self_attn"),
    rotary_interleaved=True,
    qk_norm=("q_norm", "k_norm"),
)
ROTARY_FUSED = Pattern(
    "fused qkv_proj [q; k; v], rotary", Projections("layers.{layer}.self_attn", qkv="qkv_proj")
)
ROTARY_PER_HEAD = Pattern(
    "fused query_key_value per head [h, 3, d_head], partial rotary",
    Projections("layers.{layer}.attention", qkv="query_key_value", o="dense", qkv_layout=PER_GROUP),
)
ROTARY_GPTJ = Pattern(
    "separate q/k/v/out_proj, interleaved partial rotary",
    Projections("h.{layer}.attn", o="out_proj"),
    rotary_interleaved=True,
)
ROTARY_CODEGEN = Pattern(
    "fused qkv_proj in four groups [q; v; k], interleaved partial rotary",
    Projections("h.{layer}.attn", qkv="qkv_proj", o="out_proj", qkv_layout=FOUR_GROUPS_QVK),
    rotary_interleaved=True,
)
SHARED_ENCODER = Pattern(
    "separate query/key/value/dense shared by every layer, bidirectional",
    Projections(
        "encoder.albert_layer_groups.0.albert_layers.0.attention", "query", "key", "value", "dense"
    ),
    causal=False,
    positions="learned absolute",
)
ROTARY_FALCON = Pattern(
    "fused query_key_value per key/value group, rotary",
    Projections("h.{layer}.self_attention", qkv="query_key_value", o="dense", qkv_layout=PER_GROUP),
)
ALIBI_PER_HEAD = Pattern(
    "fused query_key_value per head [h, 3, d_head], ALiBi",
    Projections("h.{layer}.self_attention", qkv="query_key_value", o="dense", qkv_layout=PER_GROUP),
    positions="alibi",
)
ALIBI_FUSED = Pattern(
    "fused Wqkv [q; k; v], ALiBi",
    Projections("blocks.{layer}.attn", qkv="Wqkv", o="out_proj"),
    positions="alibi",
)
LEARNED_DECODER = Pattern(
    "separate q/k/v/out_proj, learned positions",
    Projections("layers.{layer}.self_attn", o="out_proj"),
    positions="learned absolute",
)
OPT = Pattern(
    "separate q/k/v/out_proj, learned positions (offset 2)",
    Projections("decoder.layers.{layer}.self_attn", o="out_proj"),
    positions="learned absolute",
)
SINUSOIDAL_DECODER = Pattern(
    "separate q/k/v/out_proj, sinusoidal positions",
    Projections("layers.{layer}.self_attn", o="out_proj"),
    positions="sinusoidal",
)
DISENTANGLED = Pattern(
    "disentangled relative attention",
    Projections(
        "encoder.layer.{layer}.attention",
        "self.query_proj",
        "self.key_proj",
        "self.value_proj",
        "output.dense",
    ),
    causal=False,
    positions="relative",
)
RELATIVE_BIAS = Pattern(
    "separate q/k/v/o with a learned relative-position bias",
    Projections("encoder.layer.{layer}.attention", "attn.q", "attn.k", "attn.v", "attn.o"),
    causal=False,
    positions="learned absolute + relative bias",
    # MPNet's encoder buckets with 32 and 128 whatever relative_attention_num_buckets says
    relative_bias=RelativeBias("encoder.relative_attention_bias.weight", 32, 128),
)

# --- architectures: one line each ----------------------------------------------------------

QKV_BIASES = ("bq", "bk", "bv")
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("bert", ("bert",), ENCODER, biases_always()),
    Architecture("gpt2", ("gpt2",), CONV1D, biases_always()),
    Architecture("llama", ("llama",), ROTARY),
    Architecture("mistral", ("mistral",), ROTARY),
    Architecture("qwen2", ("qwen2",), ROTARY, biases_always(*QKV_BIASES)),
    Architecture("roberta", ("roberta",), ENCODER, biases_always()),
    Architecture("distilbert", ("distilbert",), DISTILBERT, biases_always()),
    Architecture("mixtral", ("mixtral",), ROTARY),
    Architecture("qwen2_moe", ("qwen2_moe",), ROTARY, biases_when("qkv_bias", QKV_BIASES, True)),
    Architecture("gemma", ("gemma",), ROTARY),
    Architecture("gemma2", ("gemma2",), ROTARY),
    Architecture("granite", ("granite",), ROTARY),
    Architecture("helium", ("helium",), ROTARY_INTERLEAVED),
    Architecture("smollm3", ("smollm3",), ROTARY),
    Architecture("olmo", ("olmo",), ROTARY),
    Architecture("starcoder2", ("starcoder2",), ROTARY, biases_when("use_bias", default=True)),
    Architecture("qwen3", ("qwen3",), ROTARY_QK_NORM),
    Architecture("olmo2", ("olmo2",), ROTARY_QK_NORM_OVER_HEADS),
    Architecture("olmo3", ("olmo3",), ROTARY_QK_NORM_OVER_HEADS),
    Architecture("apertus", ("apertus",), ROTARY_QK_NORM),
    Architecture("cohere", ("cohere",), ROTARY_INTERLEAVED_QK_NORM),
    Architecture("glm", ("glm",), ROTARY_INTERLEAVED, biases_when("attention_bias", QKV_BIASES)),
    Architecture("phi3", ("phi3",), ROTARY_FUSED),
    Architecture("phi", ("phi",), ROTARY_DENSE, biases_always()),
    Architecture(
        "stablelm",
        ("stablelm",),
        ROTARY_NORM_PER_HEAD_MODULE,
        biases_when("use_qkv_bias", QKV_BIASES),
    ),
    Architecture(
        "gpt_neox", ("gpt_neox",), ROTARY_PER_HEAD, biases_when("attention_bias", default=True)
    ),
    Architecture("gptj", ("gptj",), ROTARY_GPTJ),
    Architecture("codegen", ("codegen",), ROTARY_CODEGEN),
    Architecture(
        "albert",
        ("albert",),
        SHARED_ENCODER,
        biases_always(),
        applies=lambda config: (
            config.get("num_hidden_groups", 1) == 1 and config.get("inner_group_num", 1) == 1
        ),
    ),
    Architecture(
        "albert",
        ("albert",),
        SHARED_ENCODER,
        refused="ALBERT with several layer groups (num_hidden_groups or inner_group_num > 1)",
    ),
    Architecture(
        "falcon",
        ("falcon",),
        ROTARY_FALCON,
        biases_when("bias"),
        falcon_kv_heads,
        applies=lambda config: not config.get("alibi"),
    ),
    Architecture(
        "falcon",
        ("falcon",),
        ROTARY_FALCON,
        refused="Falcon's ALiBi variant "
        "(alibi: true; its slopes are rounded to bfloat16 and scaled by 1/sqrt(d_head))",
    ),
    Architecture("opt", ("opt",), OPT, biases_when("enable_bias", default=True)),
    Architecture("bloom", ("bloom",), ALIBI_PER_HEAD, biases_always()),
    Architecture("gpt_bigcode", ("gpt_bigcode",), FUSED_LINEAR_LEARNED, biases_always()),
    Architecture("mpt", ("mpt",), ALIBI_FUSED, biases_unless("no_bias")),
    Architecture("biogpt", ("biogpt",), LEARNED_DECODER, biases_always()),
    Architecture("xglm", ("xglm",), SINUSOIDAL_DECODER, biases_always()),
    Architecture("electra", ("electra",), ENCODER, biases_always()),
    Architecture("xlm-roberta", ("xlm-roberta",), ENCODER, biases_always()),
    Architecture(
        "deberta-v2",
        ("deberta-v2",),
        DISENTANGLED,
        refused="DeBERTa's disentangled attention (content-to-position and position-to-content "
        "scores)",
    ),
    Architecture("mpnet", ("mpnet",), RELATIVE_BIAS, biases_always()),
)
FAMILIES: tuple[Family, ...] = tuple(family(architecture) for architecture in ARCHITECTURES)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES if not family.refused for t in family.model_types)


def family_for_config(config: dict) -> Family:
    """The adapter for a `config.json`, or a clear error naming the supported families."""
    model_type = config.get("model_type")
    for architecture, candidate in zip(ARCHITECTURES, FAMILIES, strict=True):
        if model_type in candidate.model_types and architecture.applies(config):
            if candidate.refused:
                raise ToolkitError(
                    f"model_type '{model_type}' is not supported: {candidate.refused} cannot "
                    "be recomputed from per-head q, k and v"
                )
            return candidate
    raise _unsupported(config)


def _unsupported(config: dict, why: str = "") -> ToolkitError:
    architectures = ", ".join(config.get("architectures") or []) or "unknown architecture"
    return ToolkitError(
        f"model_type '{config.get('model_type')}' ({architectures}) is not supported: "
        f"{why + '; ' if why else ''}supported families are {', '.join(supported_model_types())}"
    )


# Common names an unregistered model_type is tried with, in this order (`family_for_checkpoint`).
CONVENTIONS = (ROTARY, ENCODER, LEARNED_DECODER)


def family_for_checkpoint(config: dict, names: Iterable[str]) -> Family:
    """The registered family of the config's model_type; for an unregistered one, the first
    conventional pattern whose layer-0 tensors the checkpoint holds (`names`), with the biases
    it holds there. Such a family is marked `by_convention`: verify tells whether it matches."""
    model_type = config.get("model_type")
    if is_registered(config):
        return family_for_config(config)
    names = list(names)
    for pattern in CONVENTIONS:
        conventional = family(Architecture(str(model_type), (str(model_type),), pattern))
        probe = conventional.layer_names(0, {})  # weights only
        if all(any(_ends_with(name, wanted) for name in names) for wanted in probe.values()):
            biases = tuple(
                role
                for role, bias in layer_bias_names(pattern).items()
                if any(_ends_with(name, bias) for name in names)
            )
            architecture = Architecture(
                str(model_type), (str(model_type),), pattern, lambda config, found=biases: found
            )
            return dataclasses.replace(family(architecture), by_convention=True)
    tried = "; ".join(pattern.name for pattern in CONVENTIONS)
    raise _unsupported(config, f"its attention tensors follow none of the common names ({tried})")


def is_registered(config: dict) -> bool:
    """Whether the config's model_type has a registry line (supported or refused)."""
    return any(config.get("model_type") in candidate.model_types for candidate in FAMILIES)


def layer_bias_names(pattern: Pattern) -> dict[str, str]:
    """role -> layer 0's bias tensor name under `pattern`, for every role that may have one."""
    everything = family(Architecture("probe", (), pattern, lambda config: ALL_BIASES))
    names = everything.layer_names(0, {})
    return {role: name for role, name in names.items() if role.startswith("b")}


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def family_by_name(name: str, pattern: str | None = None) -> Family:
    """A registered family by name; an unregistered one (read by convention) by its `pattern`'s
    name, as a standard-tensor file's metadata records both."""
    for candidate in FAMILIES:
        if candidate.name == name and not candidate.refused:
            return candidate
    for convention in CONVENTIONS:
        if convention.name == pattern:
            conventional = family(Architecture(name, (name,), convention))
            return dataclasses.replace(conventional, by_convention=True)
    raise ToolkitError(
        f"unknown family '{name}': known families are {', '.join(f.name for f in FAMILIES)}"
    )


__all__ = [
    "FAMILIES",
    "Dimensions",
    "Family",
    "family_by_name",
    "family_for_checkpoint",
    "family_for_config",
    "is_registered",
]


def supported_patterns() -> list[dict]:
    """Each pattern with its architectures (registry order) and features: what `toolkit
    families` prints. Refused architectures come last, with the feature that stops them."""
    rows: dict[str, dict] = {}
    for architecture in ARCHITECTURES:
        pattern = architecture.pattern
        if pattern.name in rows and architecture.name in rows[pattern.name]["architectures"]:
            # a variant of a supported architecture that this toolkit refuses
            rows[pattern.name]["features"].append(f"refused: {architecture.refused}")
            continue
        row = rows.setdefault(
            pattern.name,
            {
                "pattern": pattern.name,
                "architectures": [],
                "features": pattern_features(pattern),
                "refused": architecture.refused,
            },
        )
        row["architectures"].append(architecture.name)
    return sorted(rows.values(), key=lambda row: row["refused"] is not None)


def pattern_features(pattern: Pattern) -> list[str]:
    """A pattern's description in words, from its data."""
    projections = pattern.projections
    if projections.qkv:
        storage = f"fused {projections.qkv} ({projections.qkv_layout})"
    else:
        storage = "separate q, k, v"
    features = [
        storage + (", Conv1D [in, out]" if projections.conv1d else ""),
        "causal" if pattern.causal else "bidirectional",
        pattern.positions + (" interleaved (GPT-J pairs)" if pattern.rotary_interleaved else ""),
    ]
    if pattern.qk_norm:
        features.append(
            "q/k norms " + ("over all heads" if pattern.qk_norm_over_heads else "per head")
        )
    return features
