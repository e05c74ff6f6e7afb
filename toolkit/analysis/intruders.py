"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228): new high-ranking singular vectors after a fine-tune.

A fine-tuned matrix W_b's singular vector y_j is an intruder when it is unlike every singular
vector x_i of the matrix W_a it started from:

    max_i |cos(y_j, x_i)| < epsilon        checked for the top-k y_j (largest singular values)

The paper counts over the top k = 10 singular vectors and reports counts over a range of
epsilon; 0.5 is the default of peft's `reduce_intruder_dimension`, which implements the paper's
detector, and is the default here (`--intruder-epsilon`, `--intruder-k`). The vectors compared
live in the matrix's output space (the paper's U of an nn.Linear weight [out, in]): in this
toolkit's x @ W layout [d_in, d_out] they are the right singular vectors. The singular vectors
of W_a form an orthonormal basis of that space (or of W_a's row space), so a random direction in
d dimensions has max |cos| near sqrt(2 ln(2d) / d): about 0.18 for d = 384, 0.44 for d = 48,
where epsilon = 0.5 starts to call chance alignments "not intruders" less reliably.

`compare` does not decompose W_a in full: it takes W_a's top 32 right singular vectors from the
Rayleigh-Ritz step its LoRA measures already do (float64 accurate), and W_b's top-k the same
way; when `leading_rows_hold_the_maximum` (a |cos| bound on the vectors left out) says those 32
hold every maximum, that is exact. Otherwise the rest of the basis comes from a float32
eigendecomposition of W_a^T W_a: float32 is enough, because a |cos| moves by at most the error
of the vectors (~1e-6, against the float64 SVD's). tests/test_intruders.py checks both routes'
counts and max_similarity (to 1e-5 absolute) against float64 SVDs. A tracked run's snapshots
against step 0 (`trajectory_intruders`) go the same way, step 0 decomposed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError

DEFAULT_K = 10  # as the paper
DEFAULT_EPSILON = 0.5  # the paper's largest threshold; peft's default


@dataclass
class Intruders:
    """Intruder dimensions of one matrix W_a -> W_b.

    max_similarity[j]: max_i |cos(y_j, x_i)| for the j-th singular vector y_j of W_b (largest
    singular value first), over every singular vector x_i of W_a; `count` of them < epsilon.
    """

    k: int
    epsilon: float
    count: int
    max_similarity: list[float]
    intruder_ranks: list[int]  # j (0-based) of each intruder among W_b's singular vectors


def intruder_dimensions(
    full_a: np.ndarray, full_b: np.ndarray, k: int = DEFAULT_K, epsilon: float = DEFAULT_EPSILON
) -> Intruders:
    """Count W_b's top-k output-side singular vectors that are unlike all of W_a's.

    full_a, full_b: [d_in, d_out], the same matrix before and after (x @ W layout).
    """
    check_intruder_settings(k, epsilon)
    return count_intruders(_output_basis(full_a), _output_basis(full_b)[:k], epsilon)


def _output_basis(full: np.ndarray):
    """The right singular vectors of an x @ W matrix [d_in, d_out], as rows, largest first."""
    matrix = np.ascontiguousarray(full, dtype=np.float64)
    return np.linalg.svd(matrix, full_matrices=False)[2]  # [min(d_in, d_out), d_out]


def check_intruder_settings(k: int, epsilon: float) -> None:
    if k < 1 or not 0 < epsilon <= 1:
        raise ToolkitError(
            f"intruder k must be at least 1 and epsilon in (0, 1] (got k {k}, epsilon {epsilon})"
        )


def leading_rows_hold_the_maximum(leading, top_b) -> bool:
    """Whether W_a's leading right singular vectors `leading` [m, d_out] (orthonormal rows)
    already hold every max_i |cos(y_j, x_i)|, for top_b's rows y_j [k, d_out]: the vectors left
    out are orthonormal and orthogonal to these, so |cos(y_j, x)| <= sqrt(1 - sum over these of
    cos^2) for each of them. True for a W_b near W_a (its y_j close to one x_i each), and the
    rest of W_a's basis is then never needed."""
    cosines = top_b @ leading.T  # [k, m]
    left_out = np.sqrt(np.clip(1.0 - (cosines**2).sum(axis=1), 0.0, None))
    return bool((np.abs(cosines).max(axis=1) >= left_out).all())


def count_intruders(basis_a, top_b, epsilon: float) -> Intruders:
    """basis_a: every right singular vector of W_a as rows [n, d_out]; top_b: W_b's top-k right
    singular vectors y_j as rows [k, d_out], largest first (float64 arrays)."""
    similarity = np.abs(top_b @ basis_a.T).max(axis=1)  # [k]: unit vectors, so |dot| = |cos|
    ranks = [j for j, value in enumerate(similarity.tolist()) if value < epsilon]
    return Intruders(top_b.shape[0], epsilon, len(ranks), similarity.tolist(), ranks)


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
