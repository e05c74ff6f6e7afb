"""`inspect` and `extract`: shapes, norms and parameter counts, straight from the checkpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from toolkit.attention import (
    BIAS_ROLES,
    READERS,
    WEIGHT_ROLES,
    AttentionModel,
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
    # Layers on READERS threads, as extract reads them: reading and numpy's reductions release
    # the GIL, so two layers use two cores.
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        summary.layers.extend(pool.map(partial(_layer_summary, model), model.select_layers(layers)))
    return summary


def _layer_summary(model: AttentionModel, index: int) -> LayerSummary:
    layer = model.layer(index, half=True)  # half storage as stored: widened head by head
    matrices = {role: _matrix_summary(getattr(layer, role)) for role in WEIGHT_ROLES}
    return LayerSummary(layer=index, **matrices)


def _matrix_summary(weight: np.ndarray) -> MatrixSummary:
    """Shape and norms of one weight; the whole norm from the heads' (one pass over the data)."""
    head_fro = head_frobenius(weight)
    return MatrixSummary(
        shape=list(weight.shape),
        fro=math.sqrt(float((head_fro**2).sum())),
        head_fro=head_fro.tolist(),
    )


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
    dtype: str = "source",
) -> dict:
    """Write the standard tensors of `model` to a safetensors file; return what was written.

    dtype "source" (default): a checkpoint stored in bfloat16 or float16 keeps that storage,
    bit for bit (half the bytes); float32 ones stay float32. "float32": always float32."""
    output = check_output_path(output)
    attention = load_attention(model, revision=revision, allow_pickle=allow_pickle)
    selected = attention.select_layers(layers)
    nbytes, storage = write_standard_file(output, attention, selected, dtype)
    return {
        "model": str(attention.name),
        "family": attention.family.name,
        "output": str(output),
        "layers": selected,
        "tensors": len(selected) * (len(WEIGHT_ROLES) + len(attention.bias_roles)),
        "bytes": nbytes,
        "dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[storage],
    }
