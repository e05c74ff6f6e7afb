"""`inspect` and `extract`: shapes, norms and parameter counts, straight from the checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.attention import (
    BIAS_ROLES,
    WEIGHT_ROLES,
    AttentionModel,
    frobenius,
    head_frobenius,
    load_attention,
    write_standard_file,
)
from toolkit.fileio import check_output_path


@dataclass
class MatrixSummary:
    shape: list[int]
    fro: float
    head_fro: list[float]


@dataclass
class LayerSummary:
    layer: int
    wq: MatrixSummary
    wk: MatrixSummary
    wv: MatrixSummary
    w0: MatrixSummary


@dataclass
class ModelSummary:
    """head_fro of wq and w0 has one entry per query head, of wk and wv one per key/value head.
    biases: the bias tensors the model has; absent_biases: those it has not (bias-free)."""

    model: str
    family: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    attention_parameters: int
    total_parameters: int | None
    layers: list[LayerSummary] = field(default_factory=list)
    n_kv_heads: int | None = None
    biases: list[str] = field(default_factory=list)
    absent_biases: list[str] = field(default_factory=list)
    positions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model: AttentionModel, layers: Sequence[int] | None = None) -> ModelSummary:
    """Per-layer shapes and Frobenius norms (whole matrix and per head) of wq/wk/wv/w0."""
    d = model.dims
    summary = ModelSummary(
        model=str(model.name),
        family=model.family.name,
        n_layers=d.n_layers,
        n_heads=d.n_heads,
        d_model=d.d_model,
        d_head=d.d_head,
        attention_parameters=model.attention_parameters(),
        total_parameters=model.total_parameters(),
        n_kv_heads=d.n_kv_heads,
        biases=list(model.bias_roles),
        absent_biases=[role for role in BIAS_ROLES if role not in model.bias_roles],
        positions=model.positions(),
    )
    for layer in model.layers(layers):
        matrices = {
            role: MatrixSummary(
                shape=list(getattr(layer, role).shape),
                fro=frobenius(getattr(layer, role)),
                head_fro=head_frobenius(getattr(layer, role)).tolist(),
            )
            for role in WEIGHT_ROLES
        }
        summary.layers.append(LayerSummary(layer=layer.index, **matrices))
    return summary


def inspect_model(
    model: str | None = None,
    layers: Sequence[int] | None = None,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> ModelSummary:
    """`toolkit inspect` as a function."""
    return summarize(load_attention(model, revision=revision, allow_pickle=allow_pickle), layers)


def extract(
    model: str | None,
    output: str | Path,
    layers: Sequence[int] | None = None,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Write the standard tensors of `model` to a safetensors file; return what was written."""
    output = check_output_path(output)
    attention = load_attention(model, revision=revision, allow_pickle=allow_pickle)
    selected = attention.select_layers(layers)
    nbytes = write_standard_file(output, attention, selected)
    return {
        "model": str(attention.name),
        "family": attention.family.name,
        "output": str(output),
        "layers": selected,
        "tensors": len(selected) * (len(WEIGHT_ROLES) + len(attention.bias_roles)),
        "bytes": nbytes,
    }
