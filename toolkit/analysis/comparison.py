"""The results of `compare`: plain dataclasses keyed by layer, head and matrix, their summaries
(top heads, top layers, depth profile) and their JSON form (`Comparison.to_dict`, `from_dict`)."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass

from toolkit.analysis.intruders import Intruders
from toolkit.attention import WEIGHT_ROLES

CIRCUITS = ("qk", "ov")
ELEMENTWISE = "elementwise"
STRUCTURAL = "structural"


@dataclass
class HeadChange:
    """One head's change in one matrix (or circuit). `relative_change` is None when W_a is zero."""

    head: int
    fro_a: float
    fro_delta: float
    relative_change: float | None
    cosine: float


@dataclass
class MatrixChange:
    """One full matrix (x @ W layout, e.g. wq [d_model, h*d_head]) of one layer, W_a -> W_b.

    subspace_similarity_*: LoRA's phi = ||U_a^T U_delta||_F^2 / r between the top-`rank` singular
    directions of W_a and of ΔW, on the input (left) and output (right) side.
    amplification: ||ΔW||_F / ||U^T W_a V||_F, U and V the top-`rank` singular vectors of ΔW
    (None when that projection of W_a is zero).
    delta_singular_values: all singular values of ΔW, largest first.
    All ΔW measures are 0 when ΔW = 0.
    """

    fro_a: float
    fro_b: float
    fro_delta: float
    relative_change: float | None
    cosine: float
    stable_rank_delta: float
    effective_rank_delta: float
    top_k_energy_delta: float
    subspace_similarity_input: float
    subspace_similarity_output: float
    amplification: float | None
    delta_singular_values: list[float]
    heads: list[HeadChange]
    intruders: Intruders | None = None  # W_b's singular vectors unlike all of W_a's (intruders.py)


@dataclass
class LayerChange:
    layer: int
    matrices: dict[str, MatrixChange]  # wq, w0: one head per query head; wk, wv: per kv head
    circuits: dict[str, list[HeadChange]]  # qk, ov: one entry per query head

    def head_change(self, role: str, head: int) -> HeadChange:
        """Query head `head`'s change in `role`: for wk and wv, that of the key/value head it
        reads (head // (h / h_kv)), shared with the other query heads of its group."""
        heads = self.matrices[role].heads
        group = len(self.matrices["wq"].heads) // len(heads)
        return heads[head // group]

    def head_relative_change(self) -> list[float | None]:
        """Per query head, all four matrices together (wk, wv: its key/value head's):
        sqrt(sum ||ΔW_m[h]||^2 / sum ||W_a,m[h]||^2)."""
        heads = [
            [self.head_change(role, head) for role in WEIGHT_ROLES]
            for head in range(len(self.matrices["wq"].heads))
        ]
        return [
            _relative(
                _root_sum_square(h.fro_delta for h in per_role),
                _root_sum_square(h.fro_a for h in per_role),
            )
            for per_role in heads
        ]

    def relative_change(self) -> float | None:
        """The whole layer, all four matrices together."""
        return _relative(
            _root_sum_square(m.fro_delta for m in self.matrices.values()),
            _root_sum_square(m.fro_a for m in self.matrices.values()),
        )


@dataclass
class MatrixProfile:
    """One model's full matrix, described on its own (structural mode).

    spectrum: singular values divided by their root mean square (||W||_F / sqrt(n)), largest
    first, so that spectra of matrices of different sizes and scales overlay.
    head_fro_spread: standard deviation / mean of the per-head norms.
    """

    fro: float
    stable_rank: float
    effective_rank: float
    spectrum: list[float]
    head_fro: list[float]
    head_fro_spread: float

    @property
    def stable_rank_share(self) -> float:
        """Stable rank / number of singular values: comparable across sizes."""
        return self.stable_rank / len(self.spectrum)

    @property
    def effective_rank_share(self) -> float:
        return self.effective_rank / len(self.spectrum)


@dataclass
class CircuitProfile:
    """One model's QK or OV circuits of one layer, one entry per head (spectra normalised as
    in MatrixProfile)."""

    head_fro: list[float]
    head_stable_rank: list[float]
    head_spectra: list[list[float]]


@dataclass
class LayerProfile:
    layer: int
    relative_depth: float  # layer / (n_layers - 1); 0 for a one-layer model
    matrices: dict[str, MatrixProfile]
    circuits: dict[str, CircuitProfile]


@dataclass
class LayerPair:
    """Model a's layer beside model b's layer at the nearest relative depth."""

    a: LayerProfile
    b: LayerProfile


@dataclass
class ModelInfo:
    name: str
    family: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    n_kv_heads: int | None = None  # None in results saved before grouped-query attention


@dataclass
class Comparison:
    """The result of `compare(a, b)`: `layers` in elementwise mode, `pairs` in structural mode."""

    a: ModelInfo
    b: ModelInfo
    mode: str
    note: str | None
    rank: int
    top_k: int
    layers: list[LayerChange] = field(default_factory=list)
    pairs: list[LayerPair] = field(default_factory=list)

    def top_heads(self) -> list[dict]:
        """The `top_k` heads that moved most (all four matrices together), largest first."""
        ranked = [
            {"layer": layer.layer, "head": head, "relative_change": change}
            for layer in self.layers
            for head, change in enumerate(layer.head_relative_change())
        ]
        return sorted(
            ranked,
            key=lambda h: -math.inf if h["relative_change"] is None else h["relative_change"],
            reverse=True,
        )[: self.top_k]

    def depth_profile(self) -> list[dict]:
        """Per layer: the mean over heads of each matrix's relative change, and of all together."""
        profile = []
        for layer in self.layers:
            point = {"layer": layer.layer, "all": mean_defined(layer.head_relative_change())}
            for role in WEIGHT_ROLES:
                point[role] = mean_defined([h.relative_change for h in layer.matrices[role].heads])
            profile.append(point)
        return profile

    def top_layers(self) -> list[dict]:
        """All layers, the one that moved most first."""
        ranked = [
            {"layer": layer.layer, "relative_change": layer.relative_change()}
            for layer in self.layers
        ]
        return sorted(
            ranked,
            key=lambda entry: (
                -math.inf if entry["relative_change"] is None else entry["relative_change"]
            ),
            reverse=True,
        )

    def to_dict(self) -> dict:
        data = _plain(self)
        if self.mode == ELEMENTWISE:
            data["summary"] = {
                "top_heads": self.top_heads(),
                "top_layers": self.top_layers(),
                "depth_profile": self.depth_profile(),
            }
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Comparison:
        """Rebuild a Comparison from `to_dict()` output (the derived `summary` is recomputed)."""
        return _build(cls, {key: value for key, value in data.items() if key != "summary"})


def _plain(value):
    """`dataclasses.asdict` without its deep copies of every leaf (a gpt2-medium comparison holds
    ~10^5 numbers: 1 s against 0.2 s). Lists and dicts are rebuilt; numbers are immutable."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        if value and all(type(item) is float for item in value):
            return list(value)
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _build(kind, value):
    """Turn JSON data back into the (nested) dataclass or container `kind` describes."""
    origin = typing.get_origin(kind)
    if is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        present = [f for f in fields(kind) if f.name in value]  # newer fields have defaults
        return kind(**{f.name: _build(hints[f.name], value[f.name]) for f in present})
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_build(item, v) for v in value]
    if origin is dict:
        _, item = typing.get_args(kind)
        return {k: _build(item, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return _build(inner, value)
    return kind(value)


def _relative(numerator: float, denominator: float) -> float | None:
    """numerator / denominator; 0 when both are 0; None (undefined) for x / 0 with x > 0."""
    if numerator == 0.0:
        return 0.0
    return numerator / denominator if denominator > 0 else None


def _root_sum_square(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def mean_defined(values: list[float | None]) -> float | None:
    """The mean of the values that are defined (not None); None when none is."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
