"""`inspect` and `extract`: shapes, norms and parameter counts, straight from the checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.attention import (
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
    model: str
    family: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    attention_parameters: int
    total_parameters: int | None
    layers: list[LayerSummary] = field(default_factory=list)

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
        "tensors": len(selected) * 8,
        "bytes": nbytes,
    }
