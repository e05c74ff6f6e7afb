"""Intruder dimensions (Shuttleworth et al. 2024): none between a model and itself, exactly the
planted ones for large orthogonal rank-one additions, and the same counts as a plain numpy SVD."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.analysis.compare import compare
from toolkit.analysis.intruders import intruder_dimensions
from toolkit.cli import main

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels


def _orthonormal(rng, d: int, n: int) -> np.ndarray:
    """n orthonormal columns in R^d, drawn at random: [d, n]."""
    return np.linalg.qr(rng.standard_normal((d, n)))[0]


def _pretrained_like(rng, d_in: int, d_out: int) -> np.ndarray:
    """A matrix with distinct, well-separated singular values 1 .. 10: [d_in, d_out]."""
    n = min(d_in, d_out)
    spectrum = np.geomspace(10.0, 1.0, n)
    return _orthonormal(rng, d_in, n) @ np.diag(spectrum) @ _orthonormal(rng, d_out, n).T


def _numpy_count(a: np.ndarray, b: np.ndarray, k: int, epsilon: float) -> int:
    """The definition, written the long way: for each of b's top-k right singular vectors, the
    largest |cosine| with any of a's, one pair at a time."""
    _, _, vh_a = np.linalg.svd(a)
    _, _, vh_b = np.linalg.svd(b)
    count = 0
    for y in vh_b[:k]:
        best = max(abs(y @ x) / (np.linalg.norm(x) * np.linalg.norm(y)) for x in vh_a)
        count += best < epsilon
    return count


@pytest.mark.parametrize("planted", [1, 3, 6])
def test_counts_exactly_the_planted_directions(planted):
    """W + sum_j s_j u_j v_j^T with orthonormal random u, v and s_j far above ||W||_2: the top
    `planted` singular vectors are the new v_j (intruders); the rest of the top 10 are W's own."""
    rng = np.random.default_rng(planted)
    d = 256
    a = _pretrained_like(rng, d, d)
    inputs, outputs = _orthonormal(rng, d, planted), _orthonormal(rng, d, planted)
    strengths = 100.0 * np.arange(planted, 0, -1)  # 100, 200, ...: distinct, >> 10
    b = a + inputs @ np.diag(strengths) @ outputs.T
    found = intruder_dimensions(a, b)
    assert found.count == planted
    assert found.intruder_ranks == list(range(planted))
    assert found.count == _numpy_count(a, b, 10, 0.5)


@pytest.mark.parametrize("planted", [0, 2])
def test_compares_route_gives_the_float64_counts_and_similarities(planted):
    """compare's route against the float64 SVDs: the same count and every max_similarity within
    1e-5. d = 256, so the float32-subspace route is taken. Without intruders W_a's top 32 Ritz
    vectors hold every maximum; with them the rest of the basis comes from float32."""
    from toolkit.analysis.compare import (
        right_singular_basis,
        singular_directions,
        top_singular_vectors,
    )
    from toolkit.analysis.intruders import count_intruders, leading_rows_hold_the_maximum

    rng = np.random.default_rng(10 + planted)
    d = 256
    a = _pretrained_like(rng, d, d) + 0.01 * rng.standard_normal((d, d))
    b = a + 0.01 * rng.standard_normal((d, d))
    b += (
        _orthonormal(rng, d, planted)
        @ np.diag([30.0, 20.0][:planted])
        @ _orthonormal(rng, d, planted).T
    )
    expected = intruder_dimensions(a, b)
    ritz_a, _, _ = singular_directions(a, 8)
    top_b = top_singular_vectors(b, 10, 20)[1].T  # as compare: a 2k-vector subspace
    assert leading_rows_hold_the_maximum(ritz_a, top_b) == (planted == 0)
    basis_a = right_singular_basis(a, ritz_a) if planted else ritz_a
    found = count_intruders(basis_a, top_b, 0.5)
    assert found.count == expected.count == planted
    # |cos| of unit vectors, the tail of the basis from float32 Gram eigenvectors: abs 1e-5
    assert found.max_similarity == pytest.approx(expected.max_similarity, abs=1e-5)


def test_identical_matrices_have_no_intruders():
    a = _pretrained_like(np.random.default_rng(0), 64, 96)
    found = intruder_dimensions(a, a.copy())
    assert found.count == 0 and min(found.max_similarity) > 0.999


def test_threshold_below_one_over_sqrt_d_finds_none():
    """a's singular vectors are a complete orthonormal basis: some |cos| >= 1/sqrt(d) always."""
    rng = np.random.default_rng(1)
    d = 100
    a = _pretrained_like(rng, d, d)
    b = a + 100 * _orthonormal(rng, d, 1) @ _orthonormal(rng, d, 1).T
    assert intruder_dimensions(a, b, epsilon=0.99 / np.sqrt(d)).count == 0
    assert intruder_dimensions(a, b, epsilon=0.5).count == 1


def test_compare_of_a_model_with_itself_has_no_intruders(tiny_bert):
    result = compare(tiny_bert, tiny_bert)
    for layer in result.layers:
        for matrix in layer.matrices.values():
            assert matrix.intruders.count == 0 and matrix.intruders.k == 10


def test_cli_options_reach_the_json(tiny_bert):
    result = CliRunner().invoke(
        main,
        ["compare", str(tiny_bert), str(tiny_bert), "--json"]
        + ["--intruder-k", "4", "--intruder-epsilon", "0.3"],
    )
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)["layers"][0]["matrices"]["wv"]["intruders"]
    assert (found["k"], found["epsilon"], found["count"]) == (4, 0.3, 0)
    assert len(found["max_similarity"]) == 4
    bad = CliRunner().invoke(main, ["compare", str(tiny_bert), str(tiny_bert), "--intruder-k", "0"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_training_report_counts_intruders_over_the_snapshots(tiny_bert, tmp_path):
    """Step 0: a model's standard tensors; step 5: the same with one large rank-one addition to
    layer 0's wv. The report's section counts what a plain numpy SVD counts, by step."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from toolkit.analysis.snapshot_intruders import run_intruders
    from toolkit.analysis.summary import extract
    from toolkit.render.training_report import _intruder_section

    shift = tmp_path / "shift"
    shift.mkdir()
    extract(str(tiny_bert), str(shift / "step_000000.safetensors"))
    with safe_open(str(shift / "step_000000.safetensors"), "np") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    heads, d_model, d_head = tensors["layers.0.wv"].shape
    full = tensors["layers.0.wv"].transpose(1, 0, 2).reshape(d_model, heads * d_head)
    rng = np.random.default_rng(4)
    moved = full + 50.0 * np.outer(
        rng.standard_normal(d_model), rng.standard_normal(heads * d_head)
    )
    tensors["layers.0.wv"] = np.ascontiguousarray(
        moved.reshape(d_model, heads, d_head).transpose(1, 0, 2), dtype=np.float32
    )
    save_file(tensors, str(shift / "step_000005.safetensors"), metadata=metadata)
    snapshots = [(step, f"step_{step:06d}.safetensors") for step in (0, 5)]
    expected = _numpy_count(
        full.astype(np.float64), moved.astype(np.float32).astype(np.float64), 10, 0.5
    )
    assert expected >= 1
    lines = _intruder_section(tmp_path, run_intruders(shift, snapshots))
    assert "| 5 | 0 | 0 | " + str(expected) + " | 0 |" in lines
    assert (tmp_path / "intruders_by_step.png").read_bytes()[:4] == b"\x89PNG"


def test_snapshot_counts_match_numpy_whether_or_not_step_0s_leading_vectors_suffice(
    tiny_bert, tmp_path
):
    """Step 0 decomposed once, to its leading Ritz vectors (32 of d_model 48): a snapshot near
    it (small noise) is checked against those alone; one whose layer-1 wq is replaced by a
    random matrix has top vectors unlike them, so its check needs step 0's whole basis. Every
    count, both layers and roles, equals the long-way numpy count of the same files."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from toolkit.analysis.snapshot_intruders import trajectory_intruders
    from toolkit.analysis.spectra import singular_directions
    from toolkit.analysis.summary import extract
    from toolkit.attention import WEIGHT_ROLES, load_attention

    shift = tmp_path / "shift"
    shift.mkdir()
    extract(str(tiny_bert), str(shift / "step_000000.safetensors"))
    with safe_open(str(shift / "step_000000.safetensors"), "np") as f:
        metadata, start = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    rng = np.random.default_rng(7)
    near = {n: t + 1e-3 * rng.standard_normal(t.shape).astype(np.float32) for n, t in start.items()}
    far = dict(near)
    far["layers.1.wq"] = rng.standard_normal(start["layers.1.wq"].shape).astype(np.float32)
    save_file(near, str(shift / "step_000004.safetensors"), metadata=metadata)
    save_file(far, str(shift / "step_000008.safetensors"), metadata=metadata)
    snapshots = [(step, f"step_{step:06d}.safetensors") for step in (0, 4, 8)]
    a = load_attention(shift / snapshots[0][1])
    leading = singular_directions(a.layer(1).full("wq").astype(np.float64), 10)[0]
    assert leading.shape[0] < 48  # the Ritz route, not a full SVD

    found = trajectory_intruders(shift, snapshots)
    assert found[1].counts["wq"][1] >= 1  # the random matrix brings intruders
    for point, (_, name) in zip(found, snapshots[1:], strict=True):
        b = load_attention(shift / name)
        for layer in range(2):
            for role in WEIGHT_ROLES:
                expected = _numpy_count(
                    a.layer(layer).full(role).astype(np.float64),
                    b.layer(layer).full(role).astype(np.float64),
                    10,
                    0.5,
                )
                assert point.counts[role][layer] == expected, (point.step, layer, role)
