"""The view's per-head "all four weights" change over the steps of a run, for grouped-query
attention: checked against a loop over query heads written out from the definition."""

from __future__ import annotations

import math

import numpy as np

from toolkit.analysis.view_data import ALL_ROLES, shift_over_steps
from toolkit.attention import load_attention, write_standard_file

ROLES = ("wq", "wk", "wv", "w0")


def test_all_four_change_of_a_query_head_uses_its_key_value_head(tiny_llama, tmp_path):
    # a step-0 snapshot as a run writes it: the standard tensors of a grouped-query model
    # (tiny_llama: 6 query heads in groups of 3 over 2 key/value heads), layer 0
    write_standard_file(tmp_path / "step0.safetensors", load_attention(tiny_llama), [0])
    layer = next(load_attention(tmp_path / "step0.safetensors").layers())
    start = {f"layers.0.{role}": getattr(layer, role) for role in ROLES}
    n_heads, n_kv_heads = layer.wq.shape[0], layer.wk.shape[0]
    assert n_kv_heads < n_heads  # the case under test
    rng = np.random.default_rng(0)
    heads = {"wq": n_heads, "wk": n_kv_heads, "wv": n_kv_heads, "w0": n_heads}
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
