"""Where `compare`'s time goes per layer, in the three rounds of issue 9, on one layer of a pair,
one thread.

python compare_profile.py MODEL_A MODEL_B [LAYER]   # prints JSON: round -> stage -> seconds

Round 1 (what `compare` did per matrix after the first speed-up and the intruder check): ΔW's
singular values by float64 svdvals; the top-r directions of ΔW and of W_a each from all
eigenvectors of a float32 Gram matrix refined by a float64 Rayleigh-Ritz step; for the intruders
a float64 SVD with vectors of W_a and of W_b.
Round 2: ΔW's values from float64 eigvalsh of its Gram matrix; every set of top directions from a
float32 subset eigendecomposition (syevr, top 64) refined by Rayleigh-Ritz; W_a's 64 Ritz vectors
serving the intruder check.
Round 3 (today's `_matrix_change`): ΔW's values and top directions from one float64 tridiagonal
reduction of its Gram matrix (`delta_spectrum`); Gram matrices by syrk (half the product);
W_a's directions from a 32-vector float32 subspace, W_b's top-k from a 2k one; the circuits' norms
sharing their d_head x d_head products.
Rounds 1 and 2 ran on torch tensors, round 3 on numpy arrays (`compare` no longer imports
torch: 2.5 s of start-up). Reading, the float64 conversion and the intruder bound are timed
once and shared; per-head
norms and the cheap products (milliseconds) are not timed.
"""

import json
import sys
import time

import numpy as np
import scipy.linalg  # noqa: F401  (loaded before threadpool_limits, which sees loaded ones only)
import torch
from threadpoolctl import threadpool_limits

from toolkit import load_attention
from toolkit.analysis.intruders import DEFAULT_K, leading_rows_hold_the_maximum
from toolkit.analysis.spectra import (
    _circuit_change,
    _circuit_factors,
    _double_layer,
    delta_spectrum,
    singular_directions,
    top_singular_vectors,
)
from toolkit.attention import WEIGHT_ROLES

torch.set_num_threads(1)
threadpool_limits(1)  # scipy's BLAS too, as compare's workers
RANK = 8
ROUNDS = ("round 1", "round 2", "round 3")
stages: dict[str, dict[str, float]] = {name: {} for name in ROUNDS}


def timed(routes: tuple[str, ...], stage: str, function, *args):
    start = time.perf_counter()
    value = function(*args)
    for route in routes:
        stages[route][stage] = stages[route].get(stage, 0.0) + time.perf_counter() - start
    return value


def full_svd(matrix):
    return torch.linalg.svd(matrix, full_matrices=False)


def rayleigh_ritz(matrix, subspace, count: int):
    basis, _ = torch.linalg.qr(matrix @ subspace)
    small_left, _, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return right_t, basis @ small_left[:, :count], right_t[:count].T


def round_one_directions(matrix, count: int):
    """All eigenvectors of the float32 Gram matrix (torch eigh), the top 64 refined."""
    single = matrix.float()
    _, eigenvectors = torch.linalg.eigh(single.T @ single)
    return rayleigh_ritz(matrix, eigenvectors[:, -64:].double(), count)


def round_two_values(matrix):
    """ΔW's values from float64 eigvalsh of the full Gram product."""
    array = matrix.numpy()
    return np.sqrt(np.clip(scipy.linalg.eigvalsh(array.T @ array, check_finite=False), 0, None))


def round_two_directions(matrix, count: int):
    """The float32 Gram product's top 64 eigenvectors (syevr), refined."""
    single = matrix.float()
    n = matrix.shape[1]
    _, vectors = scipy.linalg.eigh(
        (single.T @ single).numpy(), subset_by_index=[n - 64, n - 1], check_finite=False
    )
    return rayleigh_ritz(
        matrix, torch.from_numpy(np.ascontiguousarray(vectors).astype(float)), count
    )


def round_two_circuit(left_a, right_a, left_b, right_b):
    """Four separate inner products, the change's over [ΔL, L_a] and [R_b, ΔR] whole."""

    def inner(l1, r1, l2, r2):
        return (l1.transpose(1, 2) @ l2 * (r1.transpose(1, 2) @ r2)).sum(dim=(1, 2))

    left = torch.cat([left_b - left_a, left_a], dim=2)
    right = torch.cat([right_b, right_b - right_a], dim=2)
    return [
        inner(left_a, right_a, left_a, right_a),
        inner(left_b, right_b, left_b, right_b),
        inner(left_a, right_a, left_b, right_b),
        inner(left, right, left, right),
    ]


model_a, model_b = load_attention(sys.argv[1]), load_attention(sys.argv[2])
index = int(sys.argv[3]) if len(sys.argv) > 3 else 0
layer_a, layer_b = timed(
    ROUNDS, "read both layers", lambda: (model_a.layer(index), model_b.layer(index))
)
a, b = timed(ROUNDS, "float64 conversion", lambda: (_double_layer(layer_a), _double_layer(layer_b)))
for role in WEIGHT_ROLES:
    full_a, full_b = np.ascontiguousarray(a.full(role)), np.ascontiguousarray(b.full(role))
    delta = full_b - full_a
    tensors = [torch.from_numpy(m) for m in (full_a, full_b, delta)]  # rounds 1, 2 ran on torch
    one, two, three = ("round 1",), ("round 2",), ("round 3",)
    timed(one, "ΔW: spectrum", torch.linalg.svdvals, tensors[2])
    timed(one, "ΔW: top directions", round_one_directions, tensors[2], RANK)
    timed(one, "W_a: top directions", round_one_directions, tensors[0], RANK)
    timed(one, "intruders: W_a basis", full_svd, tensors[0])
    timed(one, "intruders: W_b top-k", full_svd, tensors[1])
    timed(two, "ΔW: spectrum", round_two_values, tensors[2])
    timed(two, "ΔW: top directions", round_two_directions, tensors[2], RANK)
    timed(two, "W_a: top directions", round_two_directions, tensors[0], RANK)
    timed(two, "intruders: W_b top-k", round_two_directions, tensors[1], DEFAULT_K)
    timed(three, "ΔW: spectrum and top directions", delta_spectrum, delta, RANK)
    ritz_a, _, _ = timed(three, "W_a: top directions", singular_directions, full_a, RANK)
    _, top_b = timed(
        three, "intruders: W_b top-k", top_singular_vectors, full_b, DEFAULT_K, 2 * DEFAULT_K
    )
    assert leading_rows_hold_the_maximum(ritz_a, top_b.T)  # W_a's leading vectors suffice
heads_a = {role: getattr(a, role) for role in WEIGHT_ROLES}  # contiguous float64
heads_b = {role: getattr(b, role) for role in WEIGHT_ROLES}
for name in ("qk", "ov"):
    factors = (*_circuit_factors(heads_a, name), *_circuit_factors(heads_b, name))
    tensors = [torch.from_numpy(np.ascontiguousarray(f)) for f in factors]
    timed(("round 1", "round 2"), "circuits", round_two_circuit, *tensors)
    timed(("round 3",), "circuits", _circuit_change, *factors)
print(json.dumps(stages))
