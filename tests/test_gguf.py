"""GGUF files as a model spec, on the real SmolLM2-135M-Instruct Q4_1 file (`smollm2`): the header
read lazily, llama.cpp's q/k row permutation undone, checked against transformers' own GGUF load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit import compare, load_attention, verify
from toolkit.cli import main
from toolkit.gguf_checkpoint import unpermute_rotary_rows
from toolkit.sources import embedded_model_path

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' own reading of the same file (dequantized and un-permuted by transformers):
    one load for the whole session (about 40 s here)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = embedded_model_path("smollm2")
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`, as its source writes it."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpps_permute():
    weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of d_head 8
    permuted = _llama_cpp_permute(weight, 3)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, 3), weight)


def test_inspect_reads_the_header_right():
    result = CliRunner().invoke(main, ["inspect", "smollm2", "--layer", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["family"] == "llama"
    assert (data["n_layers"], data["n_heads"], data["n_kv_heads"]) == (30, 9, 3)
    assert (data["d_model"], data["d_head"]) == (576, 64)
    assert data["biases"] == [] and data["positions"]["rope_theta"] == 100000.0
    assert data["layers"][0]["wk"]["shape"] == [3, 576, 64]
    assert data["total_parameters"] == 134_515_008  # SmolLM2-135M, embeddings tied


@pytest.mark.slow
def test_standard_tensors_equal_transformers_gguf_load(smollm2_transformers):
    attention = load_attention("smollm2")
    for index in (0, 29):
        layer = attention.layer(index)
        block = smollm2_transformers.model.layers[index].self_attn
        for role, linear in (
            ("wq", block.q_proj),
            ("wk", block.k_proj),
            ("wv", block.v_proj),
            ("w0", block.o_proj),
        ):
            # exact: both dequantize the same Q4_1 blocks to float32 with the same formula
            np.testing.assert_array_equal(layer.full(role), linear.weight.detach().numpy().T)
    # without undoing the permutation, q and k would not match
    raw = attention.checkpoint._dequantize(attention.checkpoint._tensors["blk.0.attn_q.weight"])
    assert not np.array_equal(raw, smollm2_transformers.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.slow
def test_verify_passes_against_transformers_gguf_load():
    report = verify("smollm2")
    assert report.inputs["kind"] == "texts"  # the tokenizer comes from the file's header
    assert (report.n_heads, report.n_kv_heads) == (9, 3)
    assert len(report.layers) == 30
    # every relative difference <= TOLERANCE: the verdict no longer depends on the CPU's kernels
    # (the absolute block-output difference reaches 1.5e-4 at layer 24, where |output| is 180)
    assert report.passed


def test_compare_minilm_with_smollm2_is_structural():
    result = CliRunner().invoke(main, ["compare", "minilm", "smollm2", "--layer", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "structural" and "different families" in data["note"]
    (pair,) = data["pairs"]
    assert pair["b"]["layer"] == 0
    assert len(pair["b"]["circuits"]["qk"]["head_fro"]) == 9  # one QK circuit per query head
    assert len(pair["b"]["matrices"]["wk"]["head_fro"]) == 3  # one wk per key/value head


def test_compare_smollm2_with_itself_is_exactly_zero():
    result = compare("smollm2", "smollm2", layers=[0, 29])
    # exact by construction: equal weights subtract to exactly 0 (docs/numerics.md)
    for layer in result.layers:
        assert layer.relative_change() == 0.0
        assert layer.head_relative_change() == [0.0] * 9


def test_bert_and_roberta_of_equal_sizes_compare_structurally(tiny_bert, tmp_path):
    import torch
    from transformers import BertConfig, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    shape = BertConfig.from_pretrained(tiny_bert).to_dict()
    settings = {k: shape[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")}
    RobertaModel(RobertaConfig(**settings, intermediate_size=40, vocab_size=120)).save_pretrained(
        tmp_path
    )
    result = compare(tiny_bert, tmp_path)
    assert result.mode == "structural" and "bert vs roberta" in result.note
