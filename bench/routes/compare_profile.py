"""Where `compare`'s time goes, before and after issue 9, on one layer of a pair, one thread.

python compare_profile.py MODEL_A MODEL_B [LAYER]   # prints JSON: seconds per stage per layer

"before" is the computation `compare` did until issue 9 (two float64 conversions per weight, a
float64 SVD with vectors of ΔW and of W_a per matrix); "after" is today's `layer_change` split
into its stages. The circuits are the same code in both; the per-head norms (milliseconds) are
not timed.
"""

import json
import sys
import time

import numpy as np
import torch

from toolkit import load_attention
from toolkit.analysis.compare import (
    _circuit_change,
    _circuit_factors,
    _double_layer,
    _torch,
    singular_values,
    top_singular_vectors,
)
from toolkit.attention import WEIGHT_ROLES

torch.set_num_threads(1)
RANK = 8
stages: dict[str, dict[str, float]] = {"before": {}, "after": {}}


def timed(route: str, stage: str, function, *args):
    start = time.perf_counter()
    value = function(*args)
    stages[route][stage] = stages[route].get(stage, 0.0) + time.perf_counter() - start
    return value


model_a, model_b = load_attention(sys.argv[1]), load_attention(sys.argv[2])
index = int(sys.argv[3]) if len(sys.argv) > 3 else 0
for route in ("before", "after"):
    layer_a, layer_b = timed(
        route, "read both layers", lambda: (model_a.layer(index), model_b.layer(index))
    )
    if route == "before":

        def convert(layer):
            heads = {
                r: torch.tensor(np.ascontiguousarray(getattr(layer, r)), dtype=torch.float64)
                for r in WEIGHT_ROLES
            }
            full = {
                r: torch.tensor(np.ascontiguousarray(layer.full(r)), dtype=torch.float64)
                for r in WEIGHT_ROLES
            }
            return heads, full

    else:

        def convert(layer):
            double = _double_layer(layer)
            heads = {r: _torch(getattr(double, r)) for r in WEIGHT_ROLES}
            full = {r: _torch(double.full(r)) for r in WEIGHT_ROLES}
            return heads, full

    (heads_a, full_a), (heads_b, full_b) = timed(
        route, "float64 conversion", lambda a, b: (convert(a), convert(b)), layer_a, layer_b
    )
    for role in WEIGHT_ROLES:
        delta = full_b[role] - full_a[role]
        if route == "before":
            timed(route, "spectrum of ΔW", torch.linalg.svd, delta, full_matrices=False)
            timed(
                route, "top directions of W_a", torch.linalg.svd, full_a[role], full_matrices=False
            )
        else:
            timed(route, "spectrum of ΔW", singular_values, delta)
            timed(route, "top directions of ΔW", top_singular_vectors, delta, RANK)
            timed(route, "top directions of W_a", top_singular_vectors, full_a[role], RANK)
    for name in ("qk", "ov"):
        timed(
            route,
            "circuits",
            _circuit_change,
            *_circuit_factors(heads_a, name),
            *_circuit_factors(heads_b, name),
        )
print(json.dumps(stages))
