"""Intruder dimensions over a tracked run: each snapshot against step 0 (see
`toolkit.analysis.intruders` for the definition), decomposed as `compare` decomposes (the
Rayleigh-Ritz route of `toolkit.analysis.spectra`), step 0 once for the whole trajectory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.analysis.intruders import (
    DEFAULT_EPSILON,
    DEFAULT_K,
    check_intruder_settings,
    count_intruders,
    leading_rows_hold_the_maximum,
)


@dataclass
class SnapshotIntruders:
    """Intruder counts of one tracked step against step 0: role -> [n_layers]."""

    step: int
    counts: dict[str, list[int]]

    @property
    def total(self) -> int:
        return sum(sum(per_layer) for per_layer in self.counts.values())


def trajectory_intruders(
    shift_dir: str | Path,
    snapshots: list[tuple[int, str]],
    k: int = DEFAULT_K,
    epsilon: float = DEFAULT_EPSILON,
) -> list[SnapshotIntruders]:
    """Intruders of every tracked snapshot against the first one (step 0), per layer and matrix.

    snapshots: (step, file name in `shift_dir`) in step order, the first being step 0, as a
    trajectory's shift points list them.
    """
    check_intruder_settings(k, epsilon)
    start = _StartBases(Path(shift_dir), snapshots[0][1], k)
    return [start.intruders(step, name, epsilon) for step, name in snapshots[1:]]


class _StartBases:
    """Step 0's right singular vectors per matrix, decomposed as `compare` does (see the module
    docstring): its 32 leading ones (float64 Ritz vectors) for every matrix, all of them only
    for a matrix whose check needs more; each snapshot's top-k the same way. A bert-base run's
    7 snapshots took 45 s as float64 SVDs of every matrix, 8.3 s this way; its first and last
    (`run_intruders` when the last has none) 12.6 s, 2.5 s."""

    def __init__(self, shift_dir: Path, start_name: str, k: int):
        from toolkit.attention import load_attention

        self.shift_dir, self.k = shift_dir, k
        self.start = load_attention(shift_dir / start_name)
        self._bases: dict[tuple[int, str], np.ndarray] = {}  # (layer, role) -> rows [m, d_out]

    def intruders(self, step: int, name: str, epsilon: float) -> SnapshotIntruders:
        """The intruder counts of snapshot `name` (file in the shift folder) against step 0."""
        import scipy.linalg  # noqa: F401  (loaded first: threadpool_limits sees loaded libraries only)
        from threadpoolctl import threadpool_limits

        from toolkit.attention import WEIGHT_ROLES, load_attention

        # one BLAS thread, as compare's workers: numpy and scipy each bring an OpenBLAS whose
        # threads spin after every call, and alternating the two (scipy's eigh, numpy's qr)
        # made a 768 x 32 qr 23 ms instead of 0.4 on 2 cores
        with threadpool_limits(1):
            counts = {role: [] for role in WEIGHT_ROLES}
            for layer in load_attention(self.shift_dir / name).layers():
                start_layer = None
                for role in WEIGHT_ROLES:
                    start_layer = self._count(layer, role, start_layer, counts, epsilon)
        return SnapshotIntruders(step, counts)

    def _count(self, layer, role: str, start_layer, counts: dict, epsilon: float):
        """Append `layer`'s `role` count to `counts`; returns step 0's layer if it was read."""
        from toolkit.analysis.spectra import (
            right_singular_basis,
            singular_directions,
            top_singular_vectors,
        )

        key = (layer.index, role)
        if key not in self._bases:
            start_layer = start_layer or self.start.layer(layer.index)
            self._bases[key] = singular_directions(
                start_layer.full(role).astype(np.float64), self.k
            )[0]
        top = top_singular_vectors(layer.full(role).astype(np.float64), self.k, 2 * self.k)[1].T
        if not leading_rows_hold_the_maximum(self._bases[key], top):  # [k, d_out] rows
            start_layer = start_layer or self.start.layer(layer.index)
            full = start_layer.full(role).astype(np.float64)
            self._bases[key] = right_singular_basis(full, self._bases[key])
        counts[role].append(count_intruders(self._bases[key], top, epsilon).count)
        return start_layer


def run_intruders(
    shift_dir: str | Path, snapshots: list[tuple[int, str]]
) -> list[SnapshotIntruders]:
    """`trajectory_intruders` over a run's snapshots when its last one has intruders, else [].

    The last snapshot is checked first: a run that ends without intruders costs one snapshot's
    decompositions, not one per snapshot.
    """
    if len(snapshots) < 2:
        return []
    start = _StartBases(Path(shift_dir), snapshots[0][1], DEFAULT_K)
    last = start.intruders(*snapshots[-1], DEFAULT_EPSILON)
    if not last.total:
        return []
    return [start.intruders(*point, DEFAULT_EPSILON) for point in snapshots[1:-1]] + [last]
