"""`toolkit evaluate`: a fine-tuned classifier's scores on a labelled file its run never saw,
beside the majority class and the bag of words fitted on the run's own training split.

    run folder -> its config.json (the training split, rebuilt: same file, same seed) and final/
    -> the model's answer for each row of the file -> accuracy, macro-F1, baselines, warning
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.training.baseline import (
    baseline_warning,
    learning_warning,
    reference_baselines,
    scores,
)
from toolkit.training.data import load_labelled_file, load_text_data
from toolkit.training.defaults import choose_max_length
from toolkit.training.recipe import FinetuneConfig

BATCH_SIZE = 32


@dataclass
class EvaluationResult:
    """Scores of one run's final model on one labelled file (plain JSON through to_dict)."""

    run_dir: str
    dataset: str
    rows: int
    max_length: int
    metrics: dict[str, float]  # accuracy, f1 (macro)
    baselines: dict[str, dict[str, float]]  # majority, bag_of_words (training/baseline.py)
    warning: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def run_folder(path: str | Path) -> Path:
    """The run folder of `path`: the folder itself, or the parent of its final/."""
    path = Path(path).expanduser()
    for folder in (path, path.parent):
        if (folder / "config.json").is_file() and (folder / "final").is_dir():
            return folder
    raise ToolkitError(
        f"{path} is not a fine-tuning run (a folder with config.json and final/) nor its final/"
    )


def evaluate_run(
    run: str | Path,
    dataset: str,
    text_column: str | None = None,
    label_column: str | None = None,
) -> EvaluationResult:
    """Score RUN's final model on every usable row of `dataset`, with the run's baselines."""
    # the run and the file are checked before torch and transformers load (seconds)
    run_dir = run_folder(run)
    config = FinetuneConfig(**json.loads((run_dir / "config.json").read_text()))
    if config.task != "classification":
        raise ToolkitError(f"{run_dir} is a {config.task} run: evaluate scores classifiers")
    if not Path(dataset).is_file():
        raise ToolkitError(
            f"no such file: {dataset} (give a labelled .csv, .json, .jsonl or .parquet)"
        )
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    texts, label_names, source = load_labelled_file(dataset, text_column, label_column)
    model = AutoModelForSequenceClassification.from_pretrained(
        run_dir / "final", use_safetensors=True
    ).eval()
    known = model.config.label2id
    unseen = sorted(set(label_names) - set(known))
    if unseen:
        raise ToolkitError(
            f"{source} holds labels the model never saw: {', '.join(map(repr, unseen))} "
            f"(it knows {', '.join(map(repr, known))})"
        )
    labels = np.array([known[name] for name in label_names])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    # the run's training split, rebuilt from its settings: the bag of words is fitted on it, and
    # the max-length rule (when the run used it) gives the same cut as in training
    train = load_text_data(config).train
    max_length, _ = choose_max_length(config.max_length, config.task, tokenizer, train["text"])
    batches = []
    for start in range(0, len(texts), BATCH_SIZE):
        batch = tokenizer(
            texts[start : start + BATCH_SIZE],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            batches.append(model(**batch).logits.argmax(-1).numpy())
    predictions = np.concatenate(batches)
    metrics = scores(predictions, labels)
    baselines = reference_baselines(train["text"], train["label"], texts, labels)
    majority = baselines["majority"]
    not_learned = learning_warning(
        {
            **metrics,
            "majority_accuracy": majority["accuracy"],
            "top_prediction_share": float(np.bincount(predictions).max() / len(labels)),
        },
        {},
    )
    behind = baseline_warning(metrics, baselines)
    return EvaluationResult(
        run_dir=str(run_dir),
        dataset=source,
        rows=len(texts),
        max_length=max_length,
        metrics=metrics,
        baselines=baselines,
        warning="; ".join(w for w in (not_learned, behind) if w) or None,
    )
