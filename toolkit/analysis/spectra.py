"""The linear algebra of `compare`: one layer's change W_a -> W_b (norms, cosines, ΔW's spectrum,
the LoRA measures, QK/OV circuit changes, intruders) and one layer's profile on its own, from
float64 copies of the weights; numpy and scipy only.

Circuits are never built as d_model x d_model products: a head's QK = wq[i] @ wk[i].T is L @ R.T
with thin factors L, R [d_model, d_head], and ||L R^T||_F^2 = sum((L^T L) * (R^T R)), its
singular values those of the d_head x d_head core of the factors' QR decompositions. Whole
matrices are decomposed in one place (`delta_spectrum`, `singular_directions`): ΔW's spectrum and
top directions from one float64 eigendecomposition of its Gram matrix, and only the top
directions of W_a and W_b, where the LoRA measures and the intruder check need them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from toolkit.analysis.comparison import (
    CIRCUITS,
    CircuitProfile,
    HeadChange,
    LayerChange,
    LayerProfile,
    MatrixChange,
    MatrixProfile,
    _relative,
)
from toolkit.analysis.intruders import (
    DEFAULT_EPSILON,
    DEFAULT_K,
    count_intruders,
    leading_rows_hold_the_maximum,
)
from toolkit.attention import WEIGHT_ROLES, AttentionLayer
from toolkit.errors import ToolkitError


def layer_change(
    layer_a: AttentionLayer,
    layer_b: AttentionLayer,
    rank: int,
    top_k: int,
    intruder_k: int = DEFAULT_K,
    intruder_epsilon: float = DEFAULT_EPSILON,
) -> LayerChange:
    """Every elementwise measure of one layer, W_a -> W_b (same shapes), intruders included."""
    a, b = _double_layer(layer_a), _double_layer(layer_b)
    heads_a = {role: getattr(a, role) for role in WEIGHT_ROLES}  # contiguous float64
    heads_b = {role: getattr(b, role) for role in WEIGHT_ROLES}
    matrices = {
        role: _matrix_change(
            heads_a[role],
            heads_b[role],
            np.ascontiguousarray(a.full(role)),  # a copy where full() transposes (wq, wk, wv)
            np.ascontiguousarray(b.full(role)),
            (rank, top_k, intruder_k, intruder_epsilon),
        )
        for role in WEIGHT_ROLES
    }
    circuits = {
        name: _circuit_change(*_circuit_factors(heads_a, name), *_circuit_factors(heads_b, name))
        for name in CIRCUITS
    }
    return LayerChange(layer=layer_a.index, matrices=matrices, circuits=circuits)


def _double_layer(layer: AttentionLayer) -> AttentionLayer:
    """The layer's weights as contiguous float64 arrays, converted once: norms and spectra
    accumulate without float32 round-off, and in the same order whatever the checkpoint's
    storage layout (so a folder and an extracted file give identical numbers)."""
    return replace(
        layer,
        **{
            role: np.ascontiguousarray(getattr(layer, role), dtype=np.float64)
            for role in WEIGHT_ROLES
        },
    )


def _matrix_change(
    heads_a, heads_b, full_a, full_b, settings: tuple[int, int, int, float]
) -> MatrixChange:
    """heads_*: [h, d_in, d_out] per-head blocks; full_*: the same weights as one matrix
    [d_in, d_out]; all float64. settings: rank, top_k, intruder_k, intruder_epsilon.

    Three decompositions per matrix: ΔW (every ΔW measure), W_a (its top directions for the
    LoRA measures and all its right singular vectors for the intruders), W_b (its top
    intruder_k right singular vectors)."""
    rank, top_k, intruder_k, intruder_epsilon = settings
    ritz_a, left_a, right_a = singular_directions(full_a, rank)
    # y_j as rows [k, d_out]; a subspace of 2k float32 directions holds them to ~1e-9 in
    # |cos| (the bench pair), as 64 did
    top_b = top_singular_vectors(full_b, intruder_k, 2 * intruder_k)[1].T
    if not leading_rows_hold_the_maximum(ritz_a, top_b):
        ritz_a = right_singular_basis(full_a, ritz_a)

    head_squared_a = (heads_a * heads_a).sum(axis=(1, 2))  # [h]
    head_squared_b = (heads_b * heads_b).sum(axis=(1, 2))
    head_dot = (heads_a * heads_b).sum(axis=(1, 2))
    head_fro_delta = np.linalg.norm(heads_b - heads_a, axis=(1, 2))
    heads = [
        _head_change(
            h,
            float(head_squared_a[h]),
            float(head_squared_b[h]),
            float(head_dot[h]),
            float(head_fro_delta[h]),
        )
        for h in range(heads_a.shape[0])
    ]

    delta = full_b - full_a  # [d_in, d_out]
    squared_a, squared_b = float((full_a * full_a).sum()), float((full_b * full_b).sum())
    fro_a, fro_delta = math.sqrt(squared_a), float(np.linalg.norm(delta))
    if fro_delta == 0.0:  # no change: no directions to compare
        s_delta = np.zeros(min(delta.shape))
        similarity_in = similarity_out = amplification = 0.0
    else:
        r = min(rank, min(delta.shape))
        s_delta, u_delta, v_delta = delta_spectrum(delta, r)
        similarity_in = _subspace_similarity(left_a[:, :r], u_delta)
        similarity_out = _subspace_similarity(right_a[:, :r], v_delta)
        projected = float(np.linalg.norm(u_delta.T @ full_a @ v_delta))
        amplification = _relative(fro_delta, projected)
    return MatrixChange(
        fro_a=fro_a,
        fro_b=math.sqrt(squared_b),
        fro_delta=fro_delta,
        relative_change=_relative(fro_delta, fro_a),
        cosine=_cosine(float((full_a * full_b).sum()), squared_a, squared_b),
        stable_rank_delta=stable_rank(s_delta),
        effective_rank_delta=effective_rank(s_delta),
        top_k_energy_delta=top_k_energy(s_delta, top_k),
        subspace_similarity_input=similarity_in,
        subspace_similarity_output=similarity_out,
        amplification=amplification,
        delta_singular_values=s_delta.tolist(),
        heads=heads,
        intruders=count_intruders(ritz_a, top_b, intruder_epsilon),
    )


def _head_change(
    head: int, squared_a: float, squared_b: float, dot: float, fro_delta: float
) -> HeadChange:
    fro_a = math.sqrt(squared_a)
    return HeadChange(
        head, fro_a, fro_delta, _relative(fro_delta, fro_a), _cosine(dot, squared_a, squared_b)
    )


def _circuit_factors(weights: dict, circuit: str):
    """Thin factors (L, R), each [h, d_model, d_head], of the circuit L @ R^T of every query
    head i, with g = i // (h / h_kv) its key/value head:
    QK = wq[i] @ wk[g]^T, OV = wv[g] @ w0[i] = wv[g] @ (w0[i]^T)^T."""
    group = weights["wq"].shape[0] // weights["wk"].shape[0]
    if circuit == "qk":
        return weights["wq"], np.repeat(weights["wk"], group, axis=0)
    return np.repeat(weights["wv"], group, axis=0), weights["w0"].transpose(0, 2, 1)


def _cross(factor_1, factor_2):
    """factor_1^T factor_2 per head: [h, d, r1] x [h, d, r2] -> [h, r1, r2]."""
    return factor_1.transpose(0, 2, 1) @ factor_2


def _gram_inner(left_gram, right_gram):
    return (left_gram * right_gram).sum(axis=(1, 2))


def _circuit_change(left_a, right_a, left_b, right_b) -> list[HeadChange]:
    """Per head: ||C_a||, ||C_b||, <C_a, C_b> and ||C_b - C_a|| of C = L R^T, from d_head x d_head
    products of the thin factors (never the d_model x d_model circuits).

    C_b - C_a = ΔL R_b^T + L_a ΔR^T = [ΔL, L_a] @ [R_b, ΔR]^T: rank <= 2 d_head, and its norm
    has no cancellation between the two large products when the change is small. Its squared
    norm sum(([ΔL, L_a]^T [ΔL, L_a]) * ([R_b, ΔR]^T [R_b, ΔR])) is summed by blocks, so that
    L_a^T L_a and R_b^T R_b, already formed for the norms, are not formed twice."""
    left_delta, right_delta = left_b - left_a, right_b - right_a
    left_aa, right_aa = _cross(left_a, left_a), _cross(right_a, right_a)
    left_bb, right_bb = _cross(left_b, left_b), _cross(right_b, right_b)
    squared_a = _gram_inner(left_aa, right_aa)  # [h]
    squared_b = _gram_inner(left_bb, right_bb)
    dot = _gram_inner(_cross(left_a, left_b), _cross(right_a, right_b))
    squared_delta = (
        _gram_inner(_cross(left_delta, left_delta), right_bb)
        + 2 * _gram_inner(_cross(left_delta, left_a), _cross(right_b, right_delta))
        + _gram_inner(left_aa, _cross(right_delta, right_delta))
    ).clip(min=0)
    # A head whose factors are unchanged has C_b = C_a: its norms and <C_a, C_b> are set to the
    # same number, so that its cosine is exactly 1 (BLAS forms L^T L and L_a^T L_b by different
    # routines, syrk and gemm, whose roundings differ in the last bit).
    unchanged = _unchanged_heads(left_a, left_b) & _unchanged_heads(right_a, right_b)
    squared_b = np.where(unchanged, squared_a, squared_b)
    dot = np.where(unchanged, squared_a, dot)
    return [
        _head_change(
            h, float(squared_a[h]), float(squared_b[h]), float(dot[h]), math.sqrt(squared_delta[h])
        )
        for h in range(left_a.shape[0])
    ]


def _unchanged_heads(factor_a, factor_b):
    """[h] bool: True where head h's factor [d, r] is the same in both models, bit for bit."""
    return (factor_a == factor_b).all(axis=(1, 2))


def circuit_singular_values(left, right):
    """Singular values of every head's L @ R^T, [h, d_head], from the QR cores of the factors:
    L = Q_l R_l, R = Q_r R_r  =>  L R^T = Q_l (R_l R_r^T) Q_r^T, whose singular values are the
    d_head x d_head core's."""
    core_left = np.linalg.qr(left, mode="r")  # [h, d_head, d_head]
    core_right = np.linalg.qr(right, mode="r")
    return np.linalg.svd(core_left @ core_right.transpose(0, 2, 1), compute_uv=False)


def layer_profile(layer: AttentionLayer, relative_depth: float) -> LayerProfile:
    """One model's layer described on its own (structural mode)."""
    layer = _double_layer(layer)
    weights = {role: getattr(layer, role) for role in WEIGHT_ROLES}  # contiguous float64
    matrices = {}
    for role in WEIGHT_ROLES:
        values = singular_values(np.ascontiguousarray(layer.full(role)))
        head_fro = np.linalg.norm(weights[role], axis=(1, 2))
        mean = float(head_fro.mean())
        matrices[role] = MatrixProfile(
            fro=float(np.linalg.norm(values)),
            stable_rank=stable_rank(values),
            effective_rank=effective_rank(values),
            spectrum=_normalised(values).tolist(),
            head_fro=head_fro.tolist(),
            head_fro_spread=float(head_fro.std()) / mean if mean > 0 else 0.0,
        )
    circuits = {}
    for name in CIRCUITS:
        values = circuit_singular_values(*_circuit_factors(weights, name))  # [h, d_head]
        circuits[name] = CircuitProfile(
            head_fro=np.linalg.norm(values, axis=1).tolist(),
            head_stable_rank=[stable_rank(s) for s in values],
            head_spectra=[_normalised(s).tolist() for s in values],
        )
    return LayerProfile(layer.index, relative_depth, matrices, circuits)


# ---------------------------------------------------------------------------------------------
# Full-matrix spectra: the one place that decomposes a whole [d_in, d_out] weight (or change).
#
# Measured on the bench pair (gpt2-medium and a copy with 1% noise, see bench/RESULTS.md §2),
# float32 is not enough for ΔW's singular values: a float32 SVD of ΔW is off by ~3e-6 * s_1 in
# every value, so its small singular values (s_1 / s_min up to 2.4e5 there) come out up to 1e-2
# wrong. The top singular *directions* only need a float32 start: a float64 Rayleigh-Ritz step
# on a float32 subspace makes them exact to ~1e-7.


def singular_values(matrix):
    """All singular values of a float64 matrix, largest first, without vectors (svdvals)."""
    return np.linalg.svd(matrix, compute_uv=False)


GRAM_TOLERANCE = 1e-5  # the relative error allowed in a singular value taken from a Gram matrix
EPS64 = 2.0**-52


def delta_spectrum(matrix, count: int):
    """(values, left [d_in, count], right [d_out, count]) of a float64 matrix (ΔW): all its
    singular values, largest first, and its top-`count` (>= 1) singular directions, orthonormal
    columns, from one float64 eigendecomposition of its smaller Gram matrix (M^T M or M M^T).

    The values are the square roots of the Gram matrix's eigenvalues. eigh is backward stable:
    each eigenvalue of G is off by about eps64 * lambda_1, so s_i = sqrt(lambda_i) by about
    eps64 / 2 * (s_1 / s_i)^2 relative (the bench pair, s_1 / s_min up to 2.4e5: 1.7e-6 measured
    against svdvals, bound 6.2e-6). Where that bound passes GRAM_TOLERANCE for the smallest
    value (a low-rank change, LoRA's for one) the values come from svdvals instead. The
    directions: the Gram matrix's top 2 count eigenvectors, from the same tridiagonal
    reduction (`_top_eigen`), and a Rayleigh-Ritz step on the subspace they span (as in
    `singular_directions`; float64 vectors are accurate to eps64 * s_1^2 / gap, so twice the
    count suffices where float32 ones need a wider one). One reduction serves both the values
    and the directions (bench/RESULTS.md §2 times the rounds).
    """
    if matrix.shape[0] < matrix.shape[1]:  # work on the side whose Gram matrix is smaller
        values, left, right = delta_spectrum(matrix.T, count)
        return values, right, left
    size = matrix.shape[1]
    k = 2 * count  # float64 eigenvectors need no wide subspace (see the docstring)
    if k >= size:  # small matrices: the full SVD is as cheap
        left, values, right_t = np.linalg.svd(matrix, full_matrices=False)
        return values, left[:, :count], right_t[:count].T
    eigenvalues, eigenvectors = _top_eigen(_gram_lower(matrix), k)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    if eigenvalues[-1] < eigenvalues[0] * EPS64 / (2 * GRAM_TOLERANCE):
        values = singular_values(matrix)
    else:
        values = np.sqrt(eigenvalues)
    basis, _ = np.linalg.qr(matrix @ eigenvectors)  # [d_in, k], orthonormal
    small_left, _, right_t = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return values, basis @ small_left[:, :count], right_t[:count].T


def _gram_lower(array: np.ndarray) -> np.ndarray:
    """M^T M of a matrix [d_in, d_out] (float32 or float64), Fortran-ordered [d_out, d_out],
    its lower triangle only (BLAS syrk: half a matrix product's work; the eigensolvers here read
    the lower triangle, and take Fortran order without a copy)."""
    import scipy.linalg.blas

    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (array,))
    return syrk(1.0, array.T, trans=0, lower=1)  # (M^T)(M^T)^T; M^T is Fortran-ordered


def _top_eigen(gram: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(every eigenvalue, largest first; the eigenvectors of the `count` >= 1 largest as columns
    [n, count], largest first) of a symmetric float64 matrix, from one
    tridiagonal reduction G = Q T Q^T (LAPACK sytrd): the values by sterf, the top vectors of T
    by stemr (MRRR), and Q applied to them through its Householder reflectors (ormqr), never
    formed. Only the lower triangle of `gram` is read. sytrd is nearly all of the cost; scipy's
    eigh can give all values or some vectors, not both from one reduction."""
    import scipy.linalg.lapack as lapack

    n = gram.shape[0]
    lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
    reduced, diagonal, off, tau, info = lapack.dsytrd(gram, lower=1, lwork=lwork)
    values, info_values = lapack.dsterf(diagonal, off)  # copies diagonal and off
    if info or info_values:
        raise ToolkitError(f"the eigendecomposition of a {n} x {n} Gram matrix failed (LAPACK)")
    found, _, tridiagonal_vectors, info = lapack.dstemr(
        diagonal, np.append(off, 0.0), 2, 0.0, 0.0, n - count + 1, n
    )
    if info or found != count:
        raise ToolkitError(f"the eigenvectors of a {n} x {n} Gram matrix failed (LAPACK)")
    z = np.ascontiguousarray(tridiagonal_vectors[:, count - 1 :: -1][:, :count])
    # Q = H(1) ... H(n-1), H(i) = I - tau_i v v^T with v(i+1) = 1 and v(i+2:) below the
    # subdiagonal of column i: Q = diag(1, Q'), Q' the reflectors of a QR factorisation stored
    # in reduced[1:, :n-1], which ormqr applies.
    vectors = np.empty_like(z)
    vectors[0] = z[0]
    vectors[1:], _, info = lapack.dormqr(
        "L", "N", reduced[1:, : n - 1], tau, z[1:], lwork=max(1, 64 * count)
    )
    if info:
        raise ToolkitError(f"the eigenvectors of a {n} x {n} Gram matrix failed (LAPACK)")
    return values[::-1].copy(), vectors


# The float32 subspace that holds the top singular directions. 32 (was 64): the same Ritz
# vectors to ~1e-9 on the bench pair, and W_a's 32 leading vectors hold every intruder maximum
# there (`leading_rows_hold_the_maximum`) as 16 already do.
RITZ_DIRECTIONS = 32


def top_singular_vectors(matrix, count: int, directions: int = RITZ_DIRECTIONS):
    """The top-`count` singular directions of a float64 matrix [d_in, d_out]: left [d_in,
    count] and right [d_out, count], orthonormal columns, largest first."""
    _, left, right = singular_directions(matrix, count, directions)
    return left, right


def singular_directions(matrix, count: int, directions: int = RITZ_DIRECTIONS):
    """(ritz [k, d_out], left [d_in, count], right [d_out, count]) of a float64 matrix [d_in,
    d_out]: its top k >= max(`directions`, 2 count) right singular vectors as rows (every one
    of them for small matrices), and the top-`count` left and right ones as columns, largest
    first.

    The top eigenvectors of the float32 Gram matrix M^T M (only those: LAPACK's syevr computes
    a subset) span a subspace V [d_out, k] that holds the top directions up to float32
    round-off; Q = orth(M V) and the float64 SVD of the small Q^T M [k, d_out] (a Rayleigh-Ritz
    step) then give them to float64 accuracy (~1e-9 on the bench pair). About 15x less than a
    float64 SVD with vectors of 1024 x 1024.
    """
    import scipy.linalg

    k = max(directions, 2 * count)
    size = min(matrix.shape)
    if k >= size:  # small matrices: the full SVD is as cheap
        left, _, right_t = np.linalg.svd(matrix, full_matrices=False)
        return right_t, left[:, :count], right_t[:count].T
    n = matrix.shape[1]
    _, eigenvectors = scipy.linalg.eigh(
        _gram_lower(matrix.astype(np.float32)), subset_by_index=[n - k, n - 1], check_finite=False
    )  # the lower triangle, which eigh reads by default
    subspace = eigenvectors[:, ::-1].astype(np.float64)
    basis, _ = np.linalg.qr(matrix @ subspace)  # [d_in, k], orthonormal
    small_left, _, right_t = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return right_t, basis @ small_left[:, :count], right_t[:count].T


def right_singular_basis(matrix, ritz):
    """Every right singular vector of a float64 matrix [d_in, d_out] as rows [min(d_in, d_out),
    d_out], largest first: the float64 Ritz vectors `ritz` [k, d_out] from `singular_directions`
    first, then the float32 Gram eigenvectors after them (enough for the intruder check, see
    toolkit.analysis.intruders)."""
    single = matrix.astype(np.float32)
    _, eigenvectors = np.linalg.eigh(single.T @ single)  # ascending eigenvalues
    rest = eigenvectors[:, ::-1][:, ritz.shape[0] : min(matrix.shape)].astype(np.float64)
    return np.concatenate([ritz, rest.T])


# ---------------------------------------------------------------------------------------------
# Spectral measures, all zero-safe (a zero matrix has rank measures 0).


def stable_rank(singular_values) -> float:
    """||W||_F^2 / ||W||_2^2 = sum s_i^2 / s_1^2: how many directions carry the energy."""
    top = float(singular_values.max()) if singular_values.size else 0.0
    return float((singular_values**2).sum()) / top**2 if top > 0 else 0.0


def effective_rank(singular_values) -> float:
    """Roy & Vetterli (2007): exp of the entropy of p_i = s_i / sum s_j."""
    total = float(singular_values.sum())
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def top_k_energy(singular_values, k: int) -> float:
    """Share of ||W||_F^2 in the k largest singular values (singular_values sorted descending)."""
    energy = singular_values**2
    total = float(energy.sum())
    return float(energy[:k].sum()) / total if total > 0 else 0.0


def _subspace_similarity(basis_1, basis_2) -> float:
    """LoRA's phi: ||B1^T B2||_F^2 / r for two orthonormal bases [d, r]; 1 = same subspace."""
    return float(np.linalg.norm(basis_1.T @ basis_2) ** 2) / basis_1.shape[1]


def _normalised(singular_values):
    """s_i / rms(s): a flat spectrum is all ones, whatever the matrix's size and scale."""
    rms = float((singular_values**2).mean()) ** 0.5
    return singular_values / rms if rms > 0 else singular_values


def _cosine(dot: float, squared_1: float, squared_2: float) -> float:
    """<A, B> / (||A|| ||B||) from the inner product and the squared norms (so that A = B gives
    exactly 1); two zero matrices are equal (1), a zero and a non-zero one orthogonal (0)."""
    if squared_1 == 0.0 or squared_2 == 0.0:
        return 1.0 if squared_1 == squared_2 else 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(squared_1 * squared_2)))
