"""`compare`: every number checked against numpy on weights read straight from the torch models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolkit import Comparison, compare, load_attention
from toolkit.cli import main

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels

D_HEAD = 16  # both tiny fixtures


def modified_copy(source, folder, edit):
    """Load `source` with transformers, apply `edit(model)` in place and save_pretrained it."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_one_head_moved(tiny_bert, tmp_path_factory):
    """tiny_bert with noise added to the query weights of head 2 of layer 1 only."""
    generator = torch.Generator().manual_seed(7)
    noise = 0.05 * torch.randn(D_HEAD, 48, generator=generator)  # [head's out rows, in]

    def edit(model):
        model.encoder.layer[1].attention.self.query.weight[2 * D_HEAD : 3 * D_HEAD] += noise

    folder = modified_copy(tiny_bert, tmp_path_factory.mktemp("bert_moved"), edit)
    return folder, noise.numpy().astype(np.float64)


@pytest.fixture(scope="module")
def gpt2_all_moved(tiny_gpt2, tmp_path_factory):
    """tiny_gpt2 with every attention weight perturbed (q, k, v in the fused c_attn; c_proj)."""
    generator = torch.Generator().manual_seed(8)

    def edit(model):
        for block in model.h:
            for linear in (block.attn.c_attn, block.attn.c_proj):
                linear.weight += 0.02 * torch.randn(linear.weight.shape, generator=generator)

    return modified_copy(tiny_gpt2, tmp_path_factory.mktemp("gpt2_moved"), edit)


def _heads(layer, role):
    """[h, d_in, d_out] float64 per-head blocks of a toolkit layer."""
    return getattr(layer, role).astype(np.float64)


def _changes(comparison):
    """Every (layer, matrix/circuit, head) change record and every whole-matrix record."""
    for layer in comparison.layers:
        for role, matrix in layer.matrices.items():
            yield matrix
            yield from ((role, h) for h in matrix.heads)
        for heads in layer.circuits.values():
            yield from (("circuit", h) for h in heads)


# --- elementwise -----------------------------------------------------------------------------


def test_identical_models_show_exactly_zero_change(tiny_bert):
    result = compare(tiny_bert, tiny_bert)
    assert result.mode == "elementwise" and result.note is None
    assert len(result.layers) == 2
    # Exact by construction: equal weights subtract to exactly 0, ΔW = 0 takes compare's no-change
    # branch, and an unchanged head's circuit gets <C_a, C_b> = ||C_a||^2 (docs/numerics.md).
    for layer in result.layers:
        assert layer.relative_change() == 0.0
        assert layer.head_relative_change() == [0.0, 0.0, 0.0]
        for matrix in layer.matrices.values():
            assert (
                matrix.fro_delta,
                matrix.relative_change,
                matrix.stable_rank_delta,
                matrix.effective_rank_delta,
                matrix.top_k_energy_delta,
                matrix.subspace_similarity_input,
                matrix.subspace_similarity_output,
                matrix.amplification,
            ) == (0.0,) * 8
            assert matrix.cosine == 1.0
            assert set(matrix.delta_singular_values) == {0.0}
            for head in matrix.heads:
                assert (head.fro_delta, head.relative_change, head.cosine) == (0.0, 0.0, 1.0)
        for heads in layer.circuits.values():
            for head in heads:
                assert (head.fro_delta, head.relative_change, head.cosine) == (0.0, 0.0, 1.0)
    assert all(p["all"] == 0.0 for p in result.depth_profile())


def test_one_moved_head_is_the_top_head_with_the_expected_change(tiny_bert, bert_one_head_moved):
    from transformers import AutoModel

    folder, noise = bert_one_head_moved
    original = AutoModel.from_pretrained(tiny_bert).encoder.layer[1].attention.self.query.weight
    rows = original[2 * D_HEAD : 3 * D_HEAD].detach().numpy().astype(np.float64)
    expected = np.linalg.norm(noise) / np.linalg.norm(rows)

    result = compare(tiny_bert, folder, top_k=3)
    top = result.top_heads()
    assert (top[0]["layer"], top[0]["head"]) == (1, 2)
    assert top[1]["relative_change"] == 0.0  # nothing else moved: exactly 0 (w - w)
    assert result.top_layers()[0]["layer"] == 1
    head = result.layers[1].matrices["wq"].heads[2]
    # rel 1e-5: the copy stores float32(w + noise), off the float64 noise by up to 6e-8 |w|
    # per entry, and |w| / |noise| is about 20 here (~1e-6 relative)
    assert head.relative_change == pytest.approx(expected, rel=1e-5)
    assert head.fro_delta == pytest.approx(np.linalg.norm(noise), rel=1e-5)
    whole_query = np.linalg.norm(original.detach().numpy().astype(np.float64))
    assert result.layers[1].matrices["wq"].relative_change == pytest.approx(
        np.linalg.norm(noise) / whole_query, rel=1e-5
    )
    # the head's QK circuit moved, its OV circuit and every other head did not
    assert result.layers[1].circuits["qk"][2].fro_delta > 0
    assert result.layers[1].circuits["ov"][2].fro_delta == 0.0  # exact: its factors are unchanged
    moved = [
        (layer.layer, role, h.head)
        for layer in result.layers
        for role in ("wq", "wk", "wv", "w0")
        for h in layer.matrices[role].heads
        if h.fro_delta > 0
    ]
    assert moved == [(1, "wq", 2)]


def test_rank_one_change_has_stable_rank_one(tiny_bert, tmp_path):
    generator = torch.Generator().manual_seed(9)
    u, v = torch.randn(48, generator=generator), torch.randn(48, generator=generator)

    def edit(model):  # nn.Linear weight is [out, in]: x @ W gains in_vector ⊗ out_vector
        model.encoder.layer[0].attention.self.value.weight += 0.1 * torch.outer(v, u)

    result = compare(tiny_bert, modified_copy(tiny_bert, tmp_path / "rank1", edit), top_k=1)
    value = result.layers[0].matrices["wv"]
    # storing W + 0.1 u v^T in float32 adds a full-rank rounding part to ΔW, ~1e-6 of it in norm:
    # the rank-one measures are 1 up to that, the norm to 1e-4 relative with a wide margin
    assert value.stable_rank_delta == pytest.approx(1.0, abs=1e-4)
    assert value.top_k_energy_delta == pytest.approx(1.0, abs=1e-6)
    assert value.fro_delta == pytest.approx(0.1 * np.linalg.norm(u) * np.linalg.norm(v), rel=1e-4)
    assert result.layers[0].matrices["wq"].fro_delta == 0.0  # nothing else moved: exactly w - w


def test_lora_measures_match_numpy(tiny_gpt2, gpt2_all_moved):
    rank = 4
    result = compare(tiny_gpt2, gpt2_all_moved, rank=rank, top_k=5)
    a, b = load_attention(tiny_gpt2).layer(1), load_attention(gpt2_all_moved).layer(1)
    for role in ("wq", "w0"):
        w_a, w_b = a.full(role).astype(np.float64), b.full(role).astype(np.float64)
        delta = w_b - w_a
        u, s, vt = np.linalg.svd(delta)
        u_a, _, vt_a = np.linalg.svd(w_a)
        got = result.layers[1].matrices[role]
        # float64 on both sides from the same float32 weights; the routes differ (Gram matrix
        # eigenvalues against an SVD), by ~eps64 times the conditioning: rel 1e-9 holds, and
        # directions-based measures (phi, amplification) to 1e-6 (Ritz vectors ~1e-9, squared)
        assert got.stable_rank_delta == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
        p = s / s.sum()
        assert got.effective_rank_delta == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
        assert got.top_k_energy_delta == pytest.approx((s[:5] ** 2).sum() / (s**2).sum(), rel=1e-9)
        phi_in = np.linalg.norm(u_a[:, :rank].T @ u[:, :rank]) ** 2 / rank
        phi_out = np.linalg.norm(vt_a[:rank] @ vt[:rank].T) ** 2 / rank
        assert got.subspace_similarity_input == pytest.approx(phi_in, rel=1e-6)
        assert got.subspace_similarity_output == pytest.approx(phi_out, rel=1e-6)
        projected = np.linalg.norm(u[:, :rank].T @ w_a @ vt[:rank].T)
        assert got.amplification == pytest.approx(np.linalg.norm(delta) / projected, rel=1e-6)
        flat_a, flat_b = w_a.ravel(), w_b.ravel()
        assert got.cosine == pytest.approx(
            flat_a @ flat_b / np.linalg.norm(flat_a) / np.linalg.norm(flat_b), rel=1e-12
        )


def test_circuit_changes_equal_the_explicit_products(tiny_gpt2, gpt2_all_moved):
    result = compare(tiny_gpt2, gpt2_all_moved)
    model_a, model_b = load_attention(tiny_gpt2), load_attention(gpt2_all_moved)
    for index in (0, 1):
        a, b = model_a.layer(index), model_b.layer(index)
        for h in range(4):
            circuits = {  # the d_model x d_model products the toolkit avoids building
                "qk": (
                    _heads(a, "wq")[h] @ _heads(a, "wk")[h].T,
                    _heads(b, "wq")[h] @ _heads(b, "wk")[h].T,
                ),
                "ov": (
                    _heads(a, "wv")[h] @ _heads(a, "w0")[h],
                    _heads(b, "wv")[h] @ _heads(b, "w0")[h],
                ),
            }
            for name, (product_a, product_b) in circuits.items():
                got = result.layers[index].circuits[name][h]
                # float64 both ways (thin-factor Gram products against the explicit d_model x
                # d_model product): they differ by rounding, ~1e-15 relative; 1e-9 is a margin
                assert got.fro_a == pytest.approx(np.linalg.norm(product_a), rel=1e-9)
                assert got.fro_delta == pytest.approx(
                    np.linalg.norm(product_b - product_a), rel=1e-9
                )
                assert got.relative_change == pytest.approx(
                    np.linalg.norm(product_b - product_a) / np.linalg.norm(product_a), rel=1e-9
                )
                cosine = (product_a * product_b).sum() / (
                    np.linalg.norm(product_a) * np.linalg.norm(product_b)
                )
                assert got.cosine == pytest.approx(cosine, rel=1e-9)


@pytest.fixture(scope="module")
def gpt2_wide_pair(tmp_path_factory):
    """A GPT-2 wide enough (d_model 256, d_head 64) that compare takes its float32-subspace
    route to the top singular directions, and a copy with 1% noise in the attention weights,
    as the bench pair: ΔW is small against W, and ill-conditioned."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(11)
    config = GPT2Config(n_embd=256, n_head=4, n_layer=2, n_positions=32, vocab_size=64)
    parent = GPT2Model(config)
    parent_folder = tmp_path_factory.mktemp("gpt2_wide")
    parent.save_pretrained(parent_folder)

    def edit(model):
        for name, weight in model.named_parameters():
            if ".attn." in name:
                weight += 0.01 * weight.std() * torch.randn_like(weight)

    return parent_folder, modified_copy(parent_folder, tmp_path_factory.mktemp("child"), edit)


def _reference_matrix_change(w_a, w_b, rank, top_k):
    """Every whole-matrix measure, straight from the definitions: numpy float64, full SVDs."""
    delta = w_b - w_a
    u, s, vt = np.linalg.svd(delta)
    u_a, _, vt_a = np.linalg.svd(w_a)
    p = s / s.sum()
    return {
        "fro_a": np.linalg.norm(w_a),
        "fro_b": np.linalg.norm(w_b),
        "fro_delta": np.linalg.norm(delta),
        "relative_change": np.linalg.norm(delta) / np.linalg.norm(w_a),
        "cosine": (w_a * w_b).sum() / np.linalg.norm(w_a) / np.linalg.norm(w_b),
        "stable_rank_delta": (s**2).sum() / s[0] ** 2,
        "effective_rank_delta": np.exp(-(p * np.log(p)).sum()),
        "top_k_energy_delta": (s[:top_k] ** 2).sum() / (s**2).sum(),
        "subspace_similarity_input": np.linalg.norm(u_a[:, :rank].T @ u[:, :rank]) ** 2 / rank,
        "subspace_similarity_output": np.linalg.norm(vt_a[:rank] @ vt[:rank].T) ** 2 / rank,
        "amplification": np.linalg.norm(delta) / np.linalg.norm(u[:, :rank].T @ w_a @ vt[:rank].T),
        "delta_singular_values": s,
    }


def _reference_intruders(w_a, w_b, k, epsilon):
    """max_i |cos(y_j, x_i)| over W_a's right singular vectors x_i for W_b's top-k y_j, and how
    many are below epsilon: numpy float64, full SVDs."""
    similarity = np.abs(np.linalg.svd(w_b)[2][:k] @ np.linalg.svd(w_a)[2].T).max(axis=1)
    return similarity, int((similarity < epsilon).sum())


def test_low_rank_change_takes_its_singular_values_from_svdvals():
    """A rank-3 ΔW plus 1e-6 noise (s_1 / s_min ~ 8e7, as a LoRA change in float32 weights): the
    Gram matrix's eigenvalues are off by ~eps64 * s_1^2, more than the small ones; every value
    must still match the SVD's to 1e-5 relative, and the top directions (from the same
    reduction, as compare takes them) the SVD's."""
    from toolkit.analysis.compare import delta_spectrum

    rng = np.random.default_rng(3)
    delta = rng.standard_normal((128, 3)) @ rng.standard_normal((3, 96))
    delta += 1e-6 * rng.standard_normal(delta.shape)
    expected = np.linalg.svd(delta, compute_uv=False)
    values, left, right = delta_spectrum(delta, 2)
    assert values == pytest.approx(expected, rel=1e-5)  # GRAM_TOLERANCE, compare's bound
    # |cos| between unit float64 vectors: 1 to ~1e-12 when they agree

    u, _, vt = np.linalg.svd(delta)
    assert np.abs(left.T @ u[:, :2]) == pytest.approx(np.eye(2), abs=1e-9)
    assert np.abs(right.T @ vt[:2].T) == pytest.approx(np.eye(2), abs=1e-9)


def test_every_number_equals_a_float64_reference_on_a_nearly_equal_pair(gpt2_wide_pair):
    parent, child = gpt2_wide_pair
    rank, top_k = 8, 8
    result = compare(parent, child, rank=rank, top_k=top_k)
    model_a, model_b = load_attention(parent), load_attention(child)
    for layer in result.layers:
        a, b = model_a.layer(layer.layer), model_b.layer(layer.layer)
        for role, got in layer.matrices.items():
            expected = _reference_matrix_change(
                a.full(role).astype(np.float64), b.full(role).astype(np.float64), rank, top_k
            )
            assert expected["delta_singular_values"][-1] < 1e-3 * expected["fro_delta"]
            # rel 1e-5: GRAM_TOLERANCE, the bound compare keeps on singular values taken from a
            # Gram matrix; every singular value relative, the smallest too
            for name, value in expected.items():
                assert getattr(got, name) == pytest.approx(value, rel=1e-5), (role, name)
            similarity, count = _reference_intruders(
                a.full(role).astype(np.float64), b.full(role).astype(np.float64), k=10, epsilon=0.5
            )
            assert got.intruders.count == count
            # |cos| of unit vectors, partly from float32 Gram eigenvectors: abs 1e-5
            assert got.intruders.max_similarity == pytest.approx(similarity, abs=1e-5)
            for h, head in enumerate(got.heads):
                head_a, head_b = _heads(a, role)[h], _heads(b, role)[h]
                assert head.fro_delta == pytest.approx(np.linalg.norm(head_b - head_a), rel=1e-5)
                assert head.cosine == pytest.approx(
                    (head_a * head_b).sum() / np.linalg.norm(head_a) / np.linalg.norm(head_b),
                    rel=1e-5,
                )


def _noisy_attention_copy(source, folder, seed: int):
    """`source` with 1% noise (of each weight's mean |value|) in every attention projection
    weight: q, k, v and the output projection, as BERT and Llama name them."""
    generator = torch.Generator().manual_seed(seed)

    def edit(model):
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and ("attention." in name or ".self_attn." in name):
                noise = torch.randn(weight.shape, generator=generator)
                weight += 0.01 * weight.abs().mean() * noise

    return modified_copy(source, folder, edit)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fixture", "layers"), [("minilm", [5]), ("tiny_llama", [0, 1])], ids=["minilm", "gqa"]
)
def test_json_of_a_noisy_copy_equals_numpy_svd_references(
    request, fixture, layers, tmp_path_factory
):
    """The JSON `compare` writes for a model and a noisy copy of it (MiniLM: 12 heads; a tiny
    Llama: 6 query heads sharing 2 key/value heads), every number against numpy float64 SVDs
    and explicit circuit products of the weights. rel 1e-5: the bound compare keeps on
    singular values from a Gram matrix (GRAM_TOLERANCE); norms, cosines and directions are
    float64 throughout and far closer."""
    parent = request.getfixturevalue(fixture)
    child = _noisy_attention_copy(parent, tmp_path_factory.mktemp(f"{fixture}_noisy"), seed=5)
    rank, top_k, intruder_k, intruder_epsilon = 8, 8, 10, 0.5
    data = json.loads(json.dumps(compare(parent, child, layers=layers).to_dict()))
    model_a, model_b = load_attention(parent), load_attention(child)
    group = model_a.dims.n_heads // model_a.dims.n_kv_heads
    assert [layer["layer"] for layer in data["layers"]] == layers
    for layer in data["layers"]:
        a, b = model_a.layer(layer["layer"]), model_b.layer(layer["layer"])
        for role, got in layer["matrices"].items():
            w_a, w_b = a.full(role).astype(np.float64), b.full(role).astype(np.float64)
            expected = _reference_matrix_change(w_a, w_b, rank, top_k)
            for name, value in expected.items():
                assert got[name] == pytest.approx(value, rel=1e-5), (role, name)
            similarity, count = _reference_intruders(w_a, w_b, intruder_k, intruder_epsilon)
            assert got["intruders"]["count"] == count
            # |cos| of unit vectors: an absolute 1e-5, as the intruder tests allow
            assert got["intruders"]["max_similarity"] == pytest.approx(similarity, abs=1e-5)
            heads_a, heads_b = _heads(a, role), _heads(b, role)
            assert len(got["heads"]) == len(heads_a)  # wk, wv: one entry per key/value head
            for head, head_a, head_b in zip(got["heads"], heads_a, heads_b, strict=True):
                assert head["fro_a"] == pytest.approx(np.linalg.norm(head_a), rel=1e-12)
                assert head["fro_delta"] == pytest.approx(np.linalg.norm(head_b - head_a), rel=1e-9)
        for h in range(model_a.dims.n_heads):  # query head h reads key/value head h // group
            products = {
                "qk": [_heads(m, "wq")[h] @ _heads(m, "wk")[h // group].T for m in (a, b)],
                "ov": [_heads(m, "wv")[h // group] @ _heads(m, "w0")[h] for m in (a, b)],
            }
            for name, (product_a, product_b) in products.items():
                got = layer["circuits"][name][h]
                assert got["fro_a"] == pytest.approx(np.linalg.norm(product_a), rel=1e-9)
                assert got["fro_delta"] == pytest.approx(
                    np.linalg.norm(product_b - product_a), rel=1e-9
                )
                cosine = (product_a * product_b).sum() / (
                    np.linalg.norm(product_a) * np.linalg.norm(product_b)
                )
                assert got["cosine"] == pytest.approx(cosine, rel=1e-9)


def test_symmetric_measures_are_symmetric(tiny_gpt2, gpt2_all_moved):
    forward, backward = compare(tiny_gpt2, gpt2_all_moved), compare(gpt2_all_moved, tiny_gpt2)
    # float64: b - a and a - b sum the same products in another order (~1e-15 relative);
    # rel 1e-9 for measures through decompositions, 1e-12 for plain sums
    for there, back in zip(_changes(forward), _changes(backward), strict=True):
        if isinstance(there, tuple):
            (_, there), (_, back) = there, back
            assert back.fro_delta == pytest.approx(there.fro_delta, rel=1e-9)
            assert back.cosine == pytest.approx(there.cosine, rel=1e-12)
            continue
        for name in (
            "fro_delta",
            "cosine",
            "stable_rank_delta",
            "effective_rank_delta",
            "top_k_energy_delta",
        ):
            assert getattr(back, name) == pytest.approx(getattr(there, name), rel=1e-9), name
        assert back.fro_a == pytest.approx(there.fro_b, rel=1e-12)
        assert back.delta_singular_values == pytest.approx(
            there.delta_singular_values, rel=1e-9, abs=1e-12
        )


def test_layer_selection_and_opened_models(tiny_gpt2, gpt2_all_moved):
    result = compare(load_attention(tiny_gpt2), load_attention(gpt2_all_moved), layers=[1])
    assert [layer.layer for layer in result.layers] == [1]


@pytest.mark.parametrize("reads", ["forked workers read", "layers sent to workers"])
def test_worker_processes_give_the_numbers_of_one_process(
    reads, tiny_gpt2, gpt2_all_moved, monkeypatch
):
    """Big comparisons run layers in worker processes (forked on Linux, reading their own
    layers; spawned and sent the layers elsewhere): the same numbers, layer order kept."""
    import sys

    import toolkit.analysis.compare as module

    alone = compare(tiny_gpt2, gpt2_all_moved).to_dict()
    monkeypatch.setattr(module, "PROCESS_WORK", 0)  # a tiny pair counts as big
    monkeypatch.setenv("TOOLKIT_THREADS", "2")
    monkeypatch.delenv("TOOLKIT_THREADS_AUTOMATIC", raising=False)
    if reads == "layers sent to workers":
        monkeypatch.setattr(sys, "platform", "darwin")  # spawn: the layers are pickled over
    pools = []

    class Pool(module.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs["mp_context"].get_start_method())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, "ProcessPoolExecutor", Pool)
    workers = compare(tiny_gpt2, gpt2_all_moved).to_dict()
    assert pools == ["fork" if reads == "forked workers read" else "spawn"]
    assert [layer["layer"] for layer in workers["layers"]] == [0, 1]
    # exact: the same operations on the same float64 arrays, one BLAS thread in both cases
    assert workers["layers"] == alone["layers"]


def test_compare_never_imports_torch(tiny_gpt2, gpt2_all_moved):
    """compare is numpy and scipy only: torch's import (seconds) is not paid for it."""
    import subprocess
    import sys

    code = (
        "import sys; from toolkit import compare; "
        f"compare({str(tiny_gpt2)!r}, {str(gpt2_all_moved)!r}); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_extracted_file_is_compared_on_the_layers_it_holds(tiny_gpt2, gpt2_all_moved, tmp_path):
    from toolkit.analysis.summary import extract

    extracted = tmp_path / "layer1.safetensors"
    extract(str(gpt2_all_moved), extracted, [1])
    from_file = compare(tiny_gpt2, extracted)
    assert [layer.layer for layer in from_file.layers] == [1]
    from_folder = compare(tiny_gpt2, gpt2_all_moved, layers=[1])
    # exact: the same float32 values, converted to contiguous float64 before any sum
    assert from_file.to_dict()["layers"] == from_folder.to_dict()["layers"]


def test_zero_reference_weights_give_no_division_by_zero():
    from toolkit.analysis.spectra import _circuit_change, _matrix_change

    zeros, ones = np.zeros((2, 6, 3)), np.ones((2, 6, 3))
    change = _matrix_change(
        zeros, ones, np.tile(zeros[0], (1, 2)), np.tile(ones[0], (1, 2)), (2, 2, 2, 0.5)
    )
    assert change.relative_change is None and change.heads[0].relative_change is None
    # exact: zero weights take the zero branches; sqrt(36) = 6 is exact in binary
    assert change.cosine == 0.0 and change.fro_delta == pytest.approx(6.0)
    same_zero = _matrix_change(
        zeros, zeros, np.tile(zeros[0], (1, 2)), np.tile(zeros[0], (1, 2)), (2, 2, 2, 0.5)
    )
    assert (same_zero.relative_change, same_zero.cosine) == (0.0, 1.0)
    circuit = _circuit_change(zeros, zeros, ones, ones)
    assert circuit[0].relative_change is None and circuit[0].cosine == 0.0


# --- structural ------------------------------------------------------------------------------


def test_bert_vs_gpt2_takes_the_structural_path(tiny_bert, tiny_gpt2):
    result = compare(tiny_bert, tiny_gpt2)
    assert result.mode == "structural" and result.layers == []
    assert "different families (bert vs gpt2)" in result.note
    assert [(p.a.layer, p.b.layer) for p in result.pairs] == [(0, 0), (1, 1)]
    gpt2 = load_attention(tiny_gpt2).layer(1)
    profile = result.pairs[1].b
    # float64 on both sides, svdvals against numpy's SVD: rel 1e-9 (rounding ~1e-15); circuit
    # spectra from QR cores to 1e-7 relative (the small values of a rank-d_head product), with an
    # abs floor for the values that are zero in exact arithmetic
    for role in ("wq", "w0"):
        s = np.linalg.svd(gpt2.full(role).astype(np.float64), compute_uv=False)
        rms = np.sqrt(np.mean(s**2))
        assert profile.matrices[role].spectrum == pytest.approx(s / rms, rel=1e-9)
        assert profile.matrices[role].stable_rank == pytest.approx(
            (s**2).sum() / s[0] ** 2, rel=1e-9
        )
        head_norms = np.linalg.norm(_heads(gpt2, role), axis=(1, 2))
        assert profile.matrices[role].head_fro_spread == pytest.approx(
            head_norms.std() / head_norms.mean(), rel=1e-9
        )
    for h in range(4):  # circuit spectra from QR cores equal those of the explicit products
        qk = _heads(gpt2, "wq")[h] @ _heads(gpt2, "wk")[h].T
        ov = _heads(gpt2, "wv")[h] @ _heads(gpt2, "w0")[h]
        for name, product in (("qk", qk), ("ov", ov)):
            s = np.linalg.svd(product, compute_uv=False)[:D_HEAD]
            rms = np.sqrt(np.mean(s**2))
            assert profile.circuits[name].head_fro[h] == pytest.approx(
                np.linalg.norm(product), rel=1e-9
            )
            assert profile.circuits[name].head_spectra[h] == pytest.approx(
                s / rms, rel=1e-7, abs=1e-12
            )


def test_different_sizes_of_one_family_take_the_structural_path(minilm, tiny_bert):
    result = compare(minilm, tiny_bert)
    assert result.mode == "structural"
    assert "different sizes" in result.note and "d_model 384 vs 48" in result.note
    # six MiniLM layers at relative depths 0, .2, ... 1 against the two of tiny_bert at 0 and 1
    assert [(p.a.layer, p.b.layer) for p in result.pairs] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 1),
        (4, 1),
        (5, 1),
    ]
    assert len(result.pairs[0].a.matrices["wq"].spectrum) == 384
    assert len(result.pairs[0].b.circuits["qk"].head_spectra) == 3


# --- JSON and CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize("pair", ["elementwise", "structural"])
def test_json_round_trips(pair, tiny_gpt2, gpt2_all_moved, tiny_bert):
    other = gpt2_all_moved if pair == "elementwise" else tiny_bert
    data = compare(tiny_gpt2, other).to_dict()
    text = json.dumps(data, allow_nan=False)
    assert Comparison.from_dict(json.loads(text)).to_dict() == data
    if pair == "elementwise":
        head = data["layers"][1]["matrices"]["wk"]["heads"][3]
        assert head["head"] == 3 and set(head) >= {"fro_delta", "relative_change", "cosine"}
        assert len(data["summary"]["top_heads"]) == 8


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_error(result, *words: str):
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert all(word in lines[0] for word in words)


def test_cli_bad_input_is_one_line(tiny_bert, tmp_path):
    from safetensors.numpy import save_file

    assert_clean_error(run("compare", str(tiny_bert), str(tmp_path / "missing")), "missing")
    unsupported = tmp_path / "t5"
    unsupported.mkdir()
    (unsupported / "config.json").write_text('{"model_type": "t5"}')
    save_file(
        {"shared.weight": np.zeros((2, 2), dtype=np.float32)},
        str(unsupported / "model.safetensors"),
    )
    assert_clean_error(run("compare", str(unsupported), str(tiny_bert)), "t5", "not supported")
    assert_clean_error(run("compare", str(tiny_bert), str(tiny_bert), "--layer", "7"), "layer 7")
    only_layer_0 = tmp_path / "layer0.safetensors"
    assert run("extract", str(tiny_bert), "-o", str(only_layer_0), "--layer", "0").exit_code == 0
    assert_clean_error(
        run("compare", str(tiny_bert), str(only_layer_0), "--layer", "1"), "layer 1", "--layer"
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_clean_error(run("compare", str(tiny_bert), str(tiny_bert), "--plot", str(blocker / "x")))


def test_cli_json_and_plots(tiny_bert, bert_one_head_moved, tmp_path):
    folder, _ = bert_one_head_moved
    plots = tmp_path / "plots"
    result = run(
        "compare", str(tiny_bert), str(folder), "--json", "--plot", str(plots), "--top-k", "2"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    top = data["summary"]["top_heads"][0]
    heads = {role: m["heads"][2] for role, m in data["layers"][1]["matrices"].items()}
    # only wq moved: the head's change over all four matrices is ||Δwq[2]|| / ||all four of head 2||
    assert (top["layer"], top["head"]) == (1, 2)
    # the same float64 numbers combined in another order: pytest's default rel 1e-6 is ample
    assert top["relative_change"] == pytest.approx(
        heads["wq"]["fro_delta"] / np.sqrt(sum(h["fro_a"] ** 2 for h in heads.values()))
    )
    written = sorted(plots.glob("*.png"))
    assert len(written) == 5  # with intruder_dimensions.png
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_cli_table_leaves_stderr_empty_when_it_is_not_a_terminal(tiny_bert, bert_one_head_moved):
    """The transient progress bar shows on a terminal only: into a log it left a blank line
    before the table."""
    result = run("compare", str(tiny_bert), str(bert_one_head_moved[0]))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("A ")


def test_cli_table_and_structural_plots(tiny_bert, tiny_gpt2, tmp_path):
    result = run("compare", str(tiny_bert), str(tiny_gpt2), "--plot", str(tmp_path / "p"))
    assert result.exit_code == 0, result.stderr
    assert "structural" in result.stdout and "different families" in result.stdout
    assert len(list((tmp_path / "p").glob("*.png"))) == 3


def test_markdown_section_embeds_the_plots(tiny_bert, bert_one_head_moved, tmp_path):
    from toolkit.render.compare_plots import comparison_markdown

    section = comparison_markdown(
        compare(tiny_bert, bert_one_head_moved[0]), tmp_path / "figs", link_base=tmp_path
    )
    assert "layer 1 head 2" in section
    assert "](figs/relative_change_heatmaps.png)" in section
    assert (tmp_path / "figs" / "relative_change_heatmaps.png").stat().st_size > 0
