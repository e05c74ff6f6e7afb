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
against step 0 go the same way (`toolkit.analysis.snapshot_intruders`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
