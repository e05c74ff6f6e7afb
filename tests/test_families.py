"""Llama, Mistral, Qwen2, RoBERTa and DistilBERT: grouped-query attention, rotary positions,
optional biases. Each family on a tiny random model of odd shapes (see conftest)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from toolkit import compare, load_attention, verify
from toolkit.analysis.verify import TOLERANCE
from toolkit.attention import AttentionModel

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels

MODERN = [
    "tiny_llama",
    "tiny_llama_biased",
    "tiny_mistral",
    "tiny_qwen2",
    "tiny_roberta",
    "tiny_distilbert",
]


def _decoder_modules(model, index):
    block = (model if hasattr(model, "layers") else model.model).layers[index].self_attn
    return {"q": block.q_proj, "k": block.k_proj, "v": block.v_proj}, block.o_proj


def _roberta_modules(model, index):
    block = model.encoder.layer[index].attention
    return {"q": block.self.query, "k": block.self.key, "v": block.self.value}, block.output.dense


def _distilbert_modules(model, index):
    block = model.transformer.layer[index].attention
    return {"q": block.q_lin, "k": block.k_lin, "v": block.v_lin}, block.out_lin


MODULES = {
    "tiny_llama": _decoder_modules,
    "tiny_llama_biased": _decoder_modules,
    "tiny_mistral": _decoder_modules,
    "tiny_qwen2": _decoder_modules,
    "tiny_roberta": _roberta_modules,
    "tiny_distilbert": _distilbert_modules,
}


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, tokens, n_heads*d_head] -> [batch, n_heads, tokens, d_head]"""
    b, n, width = t.shape
    return t.view(b, n, n_heads, width // n_heads).transpose(1, 2)


@pytest.mark.parametrize("fixture", MODERN)
def test_per_head_projections_match_the_models_own_modules(request, fixture):
    """Each standard head reproduces its slice of the model's q/k/v projection (before rotary)
    and sum_i z_i @ w0[i] (+ b0) reproduces the output projection of Concat(z)."""
    from transformers import AutoModel

    path = request.getfixturevalue(fixture)
    model = AutoModel.from_pretrained(path).eval()
    attention = load_attention(str(path))
    d = attention.dims
    heads = {"q": d.n_heads, "k": d.n_kv_heads, "v": d.n_kv_heads}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d.d_model, generator=generator)
    z = torch.randn(2, d.n_heads, 5, d.d_head, generator=generator)
    with torch.no_grad():
        for index in attention.layer_indices:
            layer = attention.layer(index)
            projections, output = MODULES[fixture](model, index)
            for role, module in projections.items():
                weight = torch.from_numpy(np.ascontiguousarray(getattr(layer, "w" + role)))
                ours = torch.einsum("btd,hde->bhte", x, weight)
                bias = getattr(layer, "b" + role)
                assert (bias is None) == (module.bias is None)  # absent, never zeros
                if bias is not None:
                    ours = ours + torch.from_numpy(bias)[None, :, None, :]
                expected = _heads(module(x), heads[role])
                assert ours.shape == expected.shape
                # float32 sums of d_model terms in two orders on values of size ~1: ~1e-7 apart
                assert torch.allclose(ours, expected, atol=1e-5)
            per_head_sum = torch.einsum("bhte,hed->btd", z, torch.from_numpy(layer.w0))
            if layer.b0 is not None:
                per_head_sum = per_head_sum + torch.from_numpy(layer.b0)
            concat = z.transpose(1, 2).reshape(2, 5, d.n_heads * d.d_head)
            assert torch.allclose(per_head_sum, output(concat), atol=1e-5)


@pytest.mark.parametrize("fixture", MODERN)
def test_verify_passes_on_every_layer(request, fixture):
    report = verify(str(request.getfixturevalue(fixture)))
    assert report.passed  # every relative difference <= TOLERANCE (docs/numerics.md)
    # and the worst is well inside it: float32 rounding gives ~1e-7 relative on these sizes
    assert max(check.worst_rel_diff for check in report.layers) <= TOLERANCE / 10


@pytest.mark.parametrize("fixture", MODERN)
def test_compare_with_itself_is_exactly_zero(request, fixture):
    path = request.getfixturevalue(fixture)
    result = compare(path, path)
    assert result.mode == "elementwise"
    # Exact by construction: equal weights give a zero difference elementwise, and compare
    # gives an unchanged head's circuit the same number for <C_a, C_b> as for ||C_a||^2.
    for layer in result.layers:
        assert layer.relative_change() == 0.0
        assert layer.head_relative_change() == [0.0] * result.a.n_heads
        for heads in layer.circuits.values():
            assert len(heads) == result.a.n_heads
            assert all(h.fro_delta == 0.0 and h.cosine == 1.0 for h in heads)


def test_grouped_query_layout_and_metadata(tiny_llama):
    attention = load_attention(str(tiny_llama))
    d = attention.dims
    assert (d.n_heads, d.n_kv_heads, d.d_model, d.d_head) == (6, 2, 48, 10)
    assert [d.kv_head(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    layer = attention.layer(0)
    assert layer.wq.shape == (6, 48, 10) and layer.w0.shape == (6, 10, 48)
    assert layer.wk.shape == layer.wv.shape == (2, 48, 10)
    assert attention.bias_roles == () and set(layer.tensors()) == {"wq", "wk", "wv", "w0"}
    positions = attention.positions()
    assert positions["scheme"] == "rotary" and positions["rope_type"] == "llama3"
    assert positions["rope_theta"] == 500.0


def test_attention_parameter_count_matches_the_modules(tiny_qwen2):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_qwen2)
    expected = sum(p.numel() for name, p in model.named_parameters() if ".self_attn." in name)
    assert load_attention(str(tiny_qwen2)).attention_parameters() == expected


def test_extracted_file_keeps_kv_heads_and_leaves_absent_biases_out(tiny_qwen2, tmp_path):
    from safetensors import safe_open

    from toolkit import extract

    out = tmp_path / "qwen2.safetensors"
    extract(str(tiny_qwen2), out)
    with safe_open(str(out), "np") as f:
        names, meta = set(f.keys()), f.metadata()
    assert "layers.0.bk" in names and "layers.0.b0" not in names
    assert meta["n_kv_heads"] == "3" and meta["biases"] == "bq,bk,bv"
    assert json.loads(meta["positions"])["rope_type"] == "yarn"
    saved, original = load_attention(str(out)), load_attention(str(tiny_qwen2))
    assert saved.dims == original.dims and saved.bias_roles == ("bq", "bk", "bv")
    for role, tensor in original.layer(1).tensors().items():  # exact: stored, not computed
        np.testing.assert_array_equal(saved.layer(1).tensors()[role], tensor)
    assert saved.layer(1).b0 is None


def test_multi_head_files_written_before_n_kv_heads_read_unchanged(tiny_gpt2, tmp_path):
    """A file whose metadata lacks n_kv_heads (as every file written before this change) has
    one key/value head per query head and all four biases."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from toolkit import extract

    new = tmp_path / "new.safetensors"
    extract(str(tiny_gpt2), new)
    with safe_open(str(new), "np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k not in ("n_kv_heads", "biases")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in meta.items() if k != "positions"})
    attention = load_attention(str(old))
    assert attention.dims.n_kv_heads == attention.dims.n_heads == 4
    assert attention.bias_roles == ("bq", "bk", "bv", "b0")
    np.testing.assert_array_equal(attention.layer(0).bv, tensors["layers.0.bv"])


def test_inspect_json_says_which_biases_are_absent(tiny_mistral):
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, ["inspect", str(tiny_mistral), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["n_heads"], data["n_kv_heads"]) == (10, 2)
    assert data["biases"] == [] and data["absent_biases"] == ["bq", "bk", "bv", "b0"]
    assert data["layers"][0]["wk"]["shape"] == [2, 40, 6]
    assert len(data["layers"][0]["wk"]["head_fro"]) == 2
    text = CliRunner().invoke(main, ["inspect", str(tiny_mistral), "--heads", "--layer", "0"])
    assert "key/value heads 2" in text.output and "absent: bq, bk, bv, b0" in text.output


# --- verify fails when the modern parts are wrong ------------------------------------------


def _with_family(attention: AttentionModel, **changes) -> AttentionModel:
    return dataclasses.replace(attention, family=dataclasses.replace(attention.family, **changes))


def test_verify_fails_when_key_value_heads_are_paired_with_the_wrong_query_heads(tiny_llama):
    attention = load_attention(str(tiny_llama))

    class Swapped(AttentionModel):
        def layer(self, index):
            layer = super().layer(index)
            layer.wk, layer.wv = layer.wk[::-1].copy(), layer.wv[::-1].copy()
            return layer

    wrong = Swapped(**{f.name: getattr(attention, f.name) for f in dataclasses.fields(attention)})
    assert not verify(attention=wrong).passed


def test_verify_fails_without_the_sliding_window(tiny_mistral, tiny_qwen2):
    mistral = _with_family(load_attention(str(tiny_mistral)), sliding_window=lambda c, i: None)
    # keys outside the window get probability: an O(0.01..1) change, far above rounding
    assert all(c.max_rel_diff["probs"] > 100 * TOLERANCE for c in verify(attention=mistral).layers)
    # Qwen2 slides only on the layers past max_window_layers (here layer 1).
    qwen2 = _with_family(load_attention(str(tiny_qwen2)), sliding_window=lambda c, i: None)
    report = verify(attention=qwen2)
    assert report.layers[0].max_rel_diff["probs"] <= TOLERANCE
    assert report.layers[1].max_rel_diff["probs"] > 100 * TOLERANCE


def test_verify_fails_when_the_rope_scaling_is_ignored(tiny_llama):
    from toolkit.families.base import Rotary
    from toolkit.families.rotary import rotary_from_config

    attention = load_attention(str(tiny_llama))
    unscaled = rotary_from_config({**attention.config, "rope_parameters": None, "rope_theta": 500})
    assert unscaled.inv_freq.shape == rotary_from_config(attention.config).inv_freq.shape
    wrong = _with_family(attention, rotary=lambda config: Rotary(unscaled.inv_freq, 1.0))
    assert not verify(attention=wrong).passed


def test_compare_pairs_each_query_head_with_its_key_value_head(tiny_llama, tmp_path):
    """Only key/value head 1 of layer 1 moves: wk changes in that one entry, and the QK circuit
    changes for query heads 3, 4, 5 (the group reading it) and for no other."""
    from click.testing import CliRunner
    from transformers import AutoModel

    from toolkit.cli import main

    model = AutoModel.from_pretrained(tiny_llama)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.layers[1].self_attn.k_proj.weight[10:20] += 0.05 * torch.randn(
            10, 48, generator=generator
        )  # rows of key/value head 1 (d_head 10)
    model.save_pretrained(tmp_path)
    result = compare(tiny_llama, tmp_path)
    layer = result.layers[1]
    wk = [h.fro_delta for h in layer.matrices["wk"].heads]
    assert len(wk) == 2 and wk[0] == 0.0 and wk[1] > 0  # exact: head 0's weights are unchanged
    a, b = load_attention(str(tiny_llama)).layer(1), load_attention(str(tmp_path)).layer(1)
    for head in range(6):
        kv = head // 3
        qk_a = a.wq[head].astype(np.float64) @ a.wk[kv].astype(np.float64).T
        qk_b = b.wq[head].astype(np.float64) @ b.wk[kv].astype(np.float64).T
        expected = np.linalg.norm(qk_b - qk_a)
        # float64 both ways (thin factors against the explicit product): rel 1e-9, and the
        # unchanged heads' exact 0 from compare against numpy's ~1e-17 rounding: abs 1e-12
        assert layer.circuits["qk"][head].fro_delta == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert (expected > 0) == (head in (3, 4, 5))
        assert layer.head_change("wk", head).fro_delta == wk[kv]
    assert all(h.fro_delta == 0.0 for h in layer.circuits["ov"])
    moved = [entry["head"] for entry in result.top_heads() if entry["relative_change"] > 0]
    assert sorted(moved) == [3, 4, 5]
    cli = CliRunner().invoke(
        main, ["compare", str(tiny_llama), str(tmp_path), "--plot", str(tmp_path / "figs")]
    )
    assert cli.exit_code == 0, cli.output
    assert "2 key/value heads" in cli.output
    assert (tmp_path / "figs" / "circuit_change_heatmaps.png").is_file()
