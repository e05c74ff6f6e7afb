"""The view's per-head "all four weights" change over the steps of a run, for grouped-query
attention: checked against a loop over query heads written out from the definition."""

from __future__ import annotations

import math

import numpy as np
from safetensors.numpy import save_file

from toolkit.analysis.view_data import ALL_ROLES, shift_over_steps

ROLES = ("wq", "wk", "wv", "w0")


def test_all_four_change_of_a_query_head_uses_its_key_value_head(tmp_path):
    rng = np.random.default_rng(0)
    n_heads, n_kv_heads, d_model, d_head = 4, 2, 6, 3  # query heads 0,1 read kv head 0; 2,3 kv 1
    heads = {"wq": n_heads, "wk": n_kv_heads, "wv": n_kv_heads, "w0": n_heads}
    start = {
        f"layers.0.{role}": rng.normal(size=(count, d_model, d_head)).astype(np.float32)
        for role, count in heads.items()
    }
    save_file(start, tmp_path / "step0.safetensors")
    # two steps; each weight's relative change per head of its own
    change = {role: rng.uniform(0, 1, size=(2, 1, count)).tolist() for role, count in heads.items()}
    trajectory = {
        "n_layers": 1,
        "shift": [
            {
                "step": step,
                "snapshot": "step0.safetensors",
                "head_change": {role: change[role][i] for role in ROLES},
            }
            for i, step in enumerate((5, 10))
        ],
    }
    result = shift_over_steps(trajectory, tmp_path)

    assert result["steps"] == [5, 10]
    for i in range(2):
        for head in range(n_heads):
            moved = total = 0.0
            for role in ROLES:
                own = head if heads[role] == n_heads else head // (n_heads // n_kv_heads)
                norm = float(np.linalg.norm(start[f"layers.0.{role}"][own].astype(np.float64)))
                moved += (change[role][i][0][own] * norm) ** 2
                total += norm**2
            # float64 on both sides, summed in another order: equal to rounding
            assert math.isclose(
                result["head_change"][ALL_ROLES][i][0][head],
                math.sqrt(moved / total),
                rel_tol=1e-12,
            )
