"""`finetune --method lora`: the effective weights W + (alpha/r)·B·A are what tracking, DIR/final
and `compare` see; ΔW has rank <= r where adapted and is exactly zero elsewhere."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import BERT_SHAPE, TINY_GPT2_LM_OPTIONS
from safetensors.numpy import load_file

import toolkit
from toolkit.analysis.compare import compare
from toolkit.errors import ToolkitError
from toolkit.training.lora import merged_state_dict, wrap_with_lora
from toolkit.training.recipe import FinetuneConfig, check_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RANK, ALPHA = 2, 6.0
D_MODEL, N_HEADS = BERT_SHAPE["hidden_size"], BERT_SHAPE["num_attention_heads"]


@pytest.fixture(scope="module")
def lora_run(toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path_factory):
    """12 LoRA steps on wq and wv only; snapshots every 4 steps, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("lora") / "run"
    config = FinetuneConfig(
        model=str(tiny_bert_with_tokenizer),
        dataset=str(toy_sentiment_csv),
        output_dir=str(out),
        method="lora",
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets="wq,wv",
        max_length=16,
        max_steps=12,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        track_every=4,
        checkpoint_every=4,
    )
    return out, toolkit.finetune(config)


def test_delta_has_rank_at_most_r_on_targeted_matrices_and_is_zero_elsewhere(
    lora_run, tiny_bert_with_tokenizer
):
    out, _ = lora_run
    comparison = compare(tiny_bert_with_tokenizer, out / "final")
    for layer in comparison.layers:
        for role, change in layer.matrices.items():
            if role in ("wq", "wv"):
                singular = np.array(change.delta_singular_values)
                assert singular[0] > 0, (layer.layer, role)
                # B A has rank RANK; merging it into float32 weights adds rounding of ~6e-8 |W|,
                # singular values ~1e-7 of the top one: 1e-6 separates them
                assert np.sum(singular > 1e-6 * singular[0]) <= RANK, (layer.layer, role)
            else:  # exact: frozen weights saved unchanged, w - w = 0
                assert change.fro_delta == 0.0, (layer.layer, role)


def test_merged_rank_checked_independently_with_numpy(lora_run, tiny_bert_with_tokenizer):
    out, _ = lora_run
    base = load_file(str(tiny_bert_with_tokenizer / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    for layer in range(BERT_SHAPE["num_hidden_layers"]):
        for module, adapted in (("query", True), ("key", False), ("value", True)):
            name = f"encoder.layer.{layer}.attention.self.{module}.weight"
            delta = final[f"bert.{name}"].astype(np.float64) - base[name]
            rank = np.linalg.matrix_rank(delta, tol=1e-6 * max(np.abs(delta).max(), 1e-30))
            assert (rank == RANK) if adapted else not delta.any(), name


def test_tracked_snapshot_equals_w_plus_scaled_b_a_from_the_checkpoint(lora_run):
    """Independent route: the raw lora_A/lora_B tensors of the step-8 training checkpoint,
    W + (alpha/r)·B·A in numpy, split per head, against the step-8 snapshot."""
    out, _ = lora_run
    state = load_file(str(out / "checkpoints" / "step_000008" / "model.safetensors"))
    snapshot = load_file(str(out / "shift" / "step_000008.safetensors"))
    prefix = "base_model.model.bert.encoder.layer.1.attention.self.value"
    weight = state[f"{prefix}.base_layer.weight"].astype(np.float64)  # [out, in]
    down, up = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
    effective = weight + ALPHA / RANK * (up.astype(np.float64) @ down)
    per_head = effective.T.reshape(D_MODEL, N_HEADS, -1).transpose(1, 0, 2)
    assert np.abs(up).max() > 0  # B has left zero: the check is not vacuous
    # float32 merge against a float64 recomputation: ~1e-7 relative, atol for entries near 0
    np.testing.assert_allclose(snapshot["layers.1.wv"], per_head, rtol=1e-5, atol=1e-6)


# peft's from_pretrained asks `is_gradient_checkpointing`, deprecated by transformers 5
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_final_model_equals_peft_merge_of_the_saved_adapter(lora_run, tiny_bert_with_tokenizer):
    """Independent route: PeftModel.from_pretrained(base, DIR/adapter).merge_and_unload()."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out, result = lora_run
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_with_tokenizer, num_labels=2
    )
    merged = PeftModel.from_pretrained(base, result.adapter_dir).merge_and_unload().state_dict()
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(final) <= set(merged)
    # both merge W + (alpha / r) B A in float32, perhaps in another order: a few ulps
    for name, tensor in final.items():
        np.testing.assert_allclose(tensor, merged[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    last = load_file(str(out / "shift" / "step_000012.safetensors"))
    query = merged["bert.encoder.layer.0.attention.self.query.weight"].numpy()
    np.testing.assert_allclose(
        last["layers.0.wq"], query.T.reshape(D_MODEL, N_HEADS, -1).transpose(1, 0, 2), rtol=1e-6
    )


def test_lora_trains_only_the_adapter_and_the_head(lora_run):
    _, result = lora_run
    # per adapted matrix A [r, d] and B [d, r]; the new head: weight [2, d] and bias [2]
    layers = BERT_SHAPE["num_hidden_layers"]
    expected = layers * 2 * (2 * RANK * D_MODEL) + 2 * D_MODEL + 2
    assert result.trainable_parameters == expected
    assert result.method == "lora" and result.total_parameters > 10 * expected


@pytest.mark.parametrize("kind", ["bert-classifier", "gpt2-lm"])
def test_merged_state_dict_equals_peft_merge_and_unload(kind):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    torch.manual_seed(3)
    if kind == "bert-classifier":
        model = BertForSequenceClassification(BertConfig(**BERT_SHAPE, num_labels=3))
        config = FinetuneConfig(dataset="x", output_dir="x", method="lora", lora_rank=3)
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50))
        config = FinetuneConfig(
            dataset="x", output_dir="x", method="lora", lora_rank=3, task="causal-lm"
        )
    peft_model = wrap_with_lora(model, check_config(config))
    with torch.no_grad():  # B starts at zero: give every adapter (and the head) a real update
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    frozen = {n: p.clone() for n, p in peft_model.named_parameters() if ".base_layer." in n}
    merged = merged_state_dict(peft_model)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name in expected:  # float32 merges in two orders: a few ulps
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)
    # the model being trained still computes with its frozen base weights and its adapter
    assert frozen and all(
        torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen
    )


def test_fused_gpt2_qkv_cannot_be_adapted_in_part(toy_corpus_txt, tmp_path):
    config = FinetuneConfig(
        model="gpt2-config:n_layer=1,n_head=2,n_embd=16,vocab_size=300",
        dataset=str(toy_corpus_txt),
        task="causal-lm",
        output_dir=str(tmp_path / "run"),
        method="lora",
        lora_targets="wq,w0",
        max_steps=1,
    )
    with pytest.raises(ToolkitError, match=r"gpt2 stores wq, wk, wv in one matrix"):
        toolkit.finetune(config)


def test_unknown_lora_target_and_default_learning_rates():
    from toolkit.training.defaults import default_learning_rate

    with pytest.raises(ToolkitError, match=r"lora-targets 'wq,wo' must name some of wq"):
        check_config(
            FinetuneConfig(dataset="x", output_dir="x", method="lora", lora_targets="wq,wo")
        )
    # The default rule (training/defaults.py) gives LoRA ten times a full fine-tune's rate.
    full = default_learning_rate(384, pretrained=True)
    # 10x of the same float: pytest's default rel 1e-6 covers the one rounding
    assert default_learning_rate(384, pretrained=True, method="lora") == pytest.approx(10 * full)
    assert default_learning_rate(768, pretrained=True, method="lora") == pytest.approx(
        10 * default_learning_rate(768, pretrained=True), rel=0.05
    )


@pytest.mark.slow
def test_lora_run_killed_and_resumed_equals_an_uninterrupted_one(toy_corpus_txt, tmp_path):
    """SIGKILL after the step-8 checkpoint, then --resume: the same adapter, merged model and
    trajectory as a run never interrupted (dropout on the LoRA branch makes the RNG matter)."""
    from test_finetune_faults import _finish, _kill_after, _toolkit, _trajectory

    run = [
        *TINY_GPT2_LM_OPTIONS,
        *("--method", "lora", "--lora-rank", "4", "--lora-dropout", "0.1"),
        *("--max-steps", "24", "--learning-rate", "3e-3", "--track-every", "4"),
        *("--checkpoint-every", "4", "--eval-every", "12", "--seed", "5"),
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _toolkit("--dataset", str(toy_corpus_txt), "--output-dir", str(whole), *run)
    victim = _toolkit("--dataset", str(toy_corpus_txt), "--output-dir", str(killed), *run)
    _kill_after(victim, killed / "checkpoints" / "step_000008" / "complete.json", killed)
    resumed = ("--dataset", str(toy_corpus_txt), "--output-dir", str(killed), *run, "--resume")
    _finish(_toolkit(*resumed))
    _finish(reference)

    for saved in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        expected, got = load_file(str(whole / saved)), load_file(str(killed / saved))
        assert expected.keys() == got.keys()
        for name in expected:
            np.testing.assert_array_equal(expected[name], got[name], err_msg=f"{saved} {name}")
    a, b = _trajectory(whole), _trajectory(killed)
    assert [p["step"] for p in b["shift"]] == list(range(0, 25, 4))
    assert b["train_loss"] == a["train_loss"] and b["shift"] == a["shift"]
    assert b["evaluations"] == a["evaluations"]


def test_trajectory_intruders_match_a_numpy_count_on_the_snapshots(lora_run):
    from test_intruders import _numpy_count

    from toolkit.analysis.snapshot_intruders import trajectory_intruders

    out, _ = lora_run
    shift = json.loads((out / "shift" / "trajectory.json").read_text())["shift"]
    found = trajectory_intruders(out / "shift", [(p["step"], p["snapshot"]) for p in shift])
    assert [point.step for point in found] == [4, 8, 12]
    start = toolkit.load_attention(out / "shift" / shift[0]["snapshot"])
    for point, snapshot in zip(found, shift[1:], strict=True):
        now = toolkit.load_attention(out / "shift" / snapshot["snapshot"])
        for layer in range(BERT_SHAPE["num_hidden_layers"]):
            for role in ("wq", "wk", "wv", "w0"):
                a, b = start.layer(layer).full(role), now.layer(layer).full(role)
                expected = _numpy_count(a.astype(np.float64), b.astype(np.float64), 10, 0.5)
                assert point.counts[role][layer] == expected, (point.step, layer, role)
