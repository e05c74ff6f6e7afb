"""Where `compare`'s time goes per layer, before and after round 2 of issue 9, on one layer of
a pair, one thread.

python compare_profile.py MODEL_A MODEL_B [LAYER]   # prints JSON: seconds per stage per layer

"before" is what `compare` did per matrix after round 1 and the intruder check: ΔW's singular
values by float64 svdvals, the top-r directions of ΔW and of W_a each from a float32 Gram
eigendecomposition refined by a float64 Rayleigh-Ritz step, and for the intruders a float64
SVD with vectors of W_a and of W_b. "after" is today's `_matrix_change`: ΔW's values from
float64 eigvalsh of its Gram matrix; every set of top directions from a float32 Gram subset
eigendecomposition (syevr) refined by Rayleigh-Ritz; W_a's top 64 Ritz vectors serving the
intruder check too, where a |cos| bound shows they hold every maximum (on the bench pair they do
for every matrix: the script asserts it). Reading, the float64
conversion and the circuits are the same code in both and timed once; per-head norms and the
cheap products (milliseconds) are not timed.
"""

import json
import sys
import time

import scipy.linalg  # noqa: F401  (loaded before threadpool_limits, which sees loaded ones only)
import torch
from threadpoolctl import threadpool_limits

from toolkit import load_attention
from toolkit.analysis.compare import (
    _circuit_change,
    _circuit_factors,
    _double_layer,
    _torch,
    delta_singular_values,
    singular_directions,
    singular_values,
    top_singular_vectors,
)
from toolkit.analysis.intruders import DEFAULT_K, leading_rows_hold_the_maximum
from toolkit.attention import WEIGHT_ROLES

torch.set_num_threads(1)
threadpool_limits(1)  # scipy's BLAS too, as compare's workers
RANK = 8
stages: dict[str, dict[str, float]] = {"before": {}, "after": {}}


def timed(routes: tuple[str, ...], stage: str, function, *args):
    start = time.perf_counter()
    value = function(*args)
    for route in routes:
        stages[route][stage] = stages[route].get(stage, 0.0) + time.perf_counter() - start
    return value


def full_svd(matrix):
    return torch.linalg.svd(matrix, full_matrices=False)


def round_one_top_singular_vectors(matrix, count: int):
    """Round 1's route: all eigenvectors of the float32 Gram matrix (torch eigh), the top 64
    refined by a float64 Rayleigh-Ritz step."""
    single = matrix.float()
    _, eigenvectors = torch.linalg.eigh(single.T @ single)
    basis, _ = torch.linalg.qr(matrix @ eigenvectors[:, -64:].double())
    small_left, _, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_left[:, :count], right_t[:count].T


model_a, model_b = load_attention(sys.argv[1]), load_attention(sys.argv[2])
index = int(sys.argv[3]) if len(sys.argv) > 3 else 0
both = ("before", "after")
layer_a, layer_b = timed(
    both, "read both layers", lambda: (model_a.layer(index), model_b.layer(index))
)
a, b = timed(both, "float64 conversion", lambda: (_double_layer(layer_a), _double_layer(layer_b)))
for role in WEIGHT_ROLES:
    full_a, full_b = _torch(a.full(role)), _torch(b.full(role))
    delta = full_b - full_a
    timed(("before",), "ΔW: spectrum (svdvals f64)", singular_values, delta)
    timed(("before",), "ΔW: top directions", round_one_top_singular_vectors, delta, RANK)
    timed(("before",), "W_a: top directions", round_one_top_singular_vectors, full_a, RANK)
    timed(("before",), "intruders: SVD of W_a (f64)", full_svd, full_a)
    timed(("before",), "intruders: SVD of W_b (f64)", full_svd, full_b)
    timed(("after",), "ΔW: spectrum (Gram eigvalsh f64)", delta_singular_values, delta)
    timed(("after",), "ΔW: top directions", top_singular_vectors, delta, RANK)
    ritz_a, _, _ = timed(("after",), "W_a: top directions", singular_directions, full_a, RANK)
    _, top_b = timed(("after",), "intruders: W_b top-k", top_singular_vectors, full_b, DEFAULT_K)
    assert timed(
        ("after",),
        "intruders: W_a's top 64 suffice",
        leading_rows_hold_the_maximum,
        ritz_a,
        top_b.T,
    )
heads_a = {role: _torch(getattr(a, role)) for role in WEIGHT_ROLES}
heads_b = {role: _torch(getattr(b, role)) for role in WEIGHT_ROLES}
for name in ("qk", "ov"):
    timed(
        both,
        "circuits",
        _circuit_change,
        *_circuit_factors(heads_a, name),
        *_circuit_factors(heads_b, name),
    )
print(json.dumps(stages))
