"""The learning rate and length of a run when the user gives neither: a rule from the model's
width and the dataset's size, known before the first step.

    learning rate  1e-4 x (384 / d_model) ** 1.5, x 10 from random weights, x 10 for LoRA,
                   within [1e-5, 1e-3]
    epochs         enough for at least 200 optimizer steps, at most 20 epochs
    class weights  classification: n / (classes x count) per class (scikit-learn's "balanced"),
                   when the largest class holds more than half the training rows
    max length     classification: the 95th percentile of the training texts' token lengths,
                   within [16, the tokenizer's limit or 512]; causal-lm: 128-token blocks
    best model     classification without --max-steps (or --fsdp): evaluate at the end of every
                   epoch, keep the weights with the best validation macro-F1 as final/, and
                   stop after 2 evaluations without improvement

MiniLM (d_model 384) gets 1e-4, bert-base and gpt2 (768) 3.5e-5, bert-large (1024) 2.3e-5: the
ranges that are known to fine-tune these models. Fewer than ~200 updates at these rates leave a
small classifier predicting its majority class (a 500-row CSV at batch 16 is 29 updates per
epoch). An explicit `--learning-rate`, `--epochs` or `--max-steps` (option or recipe) wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

REFERENCE_WIDTH = 384
REFERENCE_LEARNING_RATE = 1e-4
WIDTH_EXPONENT = 1.5
RANDOM_INIT_FACTOR = 10.0
# LoRA trains a few new, zero-started matrices and needs a larger step than a full fine-tune
# (Hu et al. 2021 used 2e-4..5e-4 on RoBERTa/DeBERTa/GPT-2, where full fine-tunes use ~2e-5..5e-5).
LORA_FACTOR = 10.0
LEARNING_RATE_RANGE = (1e-5, 1e-3)
MIN_STEPS = 200
MAX_DEFAULT_EPOCHS = 20
# Cut 5% of the texts, not the typical one: truncating a review's ending loses its verdict, and
# padding to the longest text costs time for a few rows (length-grouped batches pad little).
LENGTH_PERCENTILE = 95
MAX_LENGTH_RANGE = (16, 512)
CAUSAL_LM_BLOCK = 128
# Above this share of the training rows, the largest class pulls an unweighted loss towards
# always answering it (a 65/20/15 split gave a model that did exactly that).
IMBALANCED_SHARE = 0.5
# The best model is the one with the highest validation macro-F1: with imbalanced labels,
# accuracy rewards always answering the largest class, macro-F1 does not.
SELECTION_METRIC = "f1"
EARLY_STOPPING_PATIENCE = 2  # evaluations without improvement before training stops


@dataclass
class Schedule:
    """The learning rate, epochs and max length a run uses; `chosen` names those the default
    rule set, and says why (setting -> reason)."""

    learning_rate: float
    epochs: int
    total_steps: int
    chosen: dict[str, str] = field(default_factory=dict)
    max_length: int | None = None  # tokens per example (causal-lm: per block)


def default_learning_rate(d_model: int, pretrained: bool, method: str = "full") -> float:
    """The rule's learning rate for a model `d_model` wide, to two significant digits."""
    rate = REFERENCE_LEARNING_RATE * (REFERENCE_WIDTH / d_model) ** WIDTH_EXPONENT
    if not pretrained:
        rate *= RANDOM_INIT_FACTOR  # fresh weights need larger steps to leave their start
    if method == "lora":
        rate *= LORA_FACTOR
    low, high = LEARNING_RATE_RANGE
    return float(f"{min(max(rate, low), high):.2g}")


def default_epochs(updates_per_epoch: int) -> int:
    """Epochs for at least MIN_STEPS optimizer steps, between 1 and MAX_DEFAULT_EPOCHS."""
    return min(MAX_DEFAULT_EPOCHS, max(1, math.ceil(MIN_STEPS / updates_per_epoch)))


def choose_schedule(
    learning_rate: float | None,
    epochs: int | None,
    max_steps: int | None,
    d_model: int,
    pretrained: bool,
    updates_per_epoch: int,
    method: str = "full",
    max_length: tuple[int, str | None] = (CAUSAL_LM_BLOCK, None),
    class_weights: str | None = None,
) -> Schedule:
    """Fill in what the user left out (None) by the rule above; `max_length` is the value the
    run uses and, when the rule chose it, why (see `choose_max_length`); `class_weights` is why
    the rule weighted the loss, if it did (see `choose_class_weights`)."""
    chosen = {"max_length": max_length[1]} if max_length[1] else {}
    if class_weights:
        chosen["class_weights"] = class_weights
    if learning_rate is None:
        learning_rate = default_learning_rate(d_model, pretrained, method)
        start = "pretrained" if pretrained else "random weights"
        chosen["learning_rate"] = f"d_model {d_model}, {start}" + (
            ", LoRA" if method == "lora" else ""
        )
    if max_steps:
        epochs = math.ceil(max_steps / updates_per_epoch)
    elif epochs is None:
        epochs = default_epochs(updates_per_epoch)
        chosen["epochs"] = (
            f"at least {MIN_STEPS} steps at {updates_per_epoch} per epoch, "
            f"at most {MAX_DEFAULT_EPOCHS} epochs"
        )
    total_steps = max_steps or epochs * updates_per_epoch
    return Schedule(learning_rate, epochs, total_steps, chosen, max_length[0])


def choose_max_length(
    given: int | None, task: str, tokenizer, train_texts
) -> tuple[int, str | None]:
    """The max length a run uses, and why when the rule chose it (None when given)."""
    if given is not None:
        return given, None
    if task != "classification":
        return CAUSAL_LM_BLOCK, f"{CAUSAL_LM_BLOCK}-token blocks"
    lengths = [len(ids) for ids in tokenizer(list(train_texts))["input_ids"]]
    limit = tokenizer.model_max_length
    return default_max_length(lengths, limit if limit < 1_000_000 else None)


def default_max_length(token_lengths, model_limit: int | None) -> tuple[int, str]:
    """The classification max length for texts of these token lengths (special tokens included),
    and why; `model_limit` is the tokenizer's own (None when it sets none)."""
    low, high = MAX_LENGTH_RANGE
    high = min(high, model_limit or high)
    percentile = math.ceil(float(np.percentile(token_lengths, LENGTH_PERCENTILE)))
    chosen = min(max(percentile, low), high)
    why = f"{LENGTH_PERCENTILE}th percentile of the training texts' token lengths, {percentile}"
    if chosen != percentile:
        why += f", brought within [{low}, {high}]"
    return chosen, why


def choose_class_weights(
    given: bool | None, labels, num_classes: int
) -> tuple[list[float] | None, str | None]:
    """Per-class loss weights (None: an unweighted loss), and why when the rule chose them."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    largest = counts.max() / counts.sum()
    weighted = given if given is not None else largest > IMBALANCED_SHARE
    if not weighted:
        return None, None
    # a class absent from the training rows gets weight 0: no row of it to weigh
    weights = [float(counts.sum() / (num_classes * c)) if c else 0.0 for c in counts]
    if given is not None:
        return weights, None
    return weights, f"the largest class holds {largest:.0%} of the training rows"


@dataclass
class Selection:
    """How a run picks its final model: the evaluation interval, whether final/ holds the best
    evaluation's weights (else the last step's), the early-stopping patience (0: off), and why
    for each setting the rule chose."""

    eval_every: int
    keep_best: bool
    patience: int
    chosen: dict[str, str] = field(default_factory=dict)


def choose_selection(
    eval_every: int,
    patience: int | None,
    task: str,
    max_steps: int | None,
    fsdp: bool,
    updates_per_epoch: int,
) -> Selection:
    """Keep the best model when the run's length is counted in epochs (no --max-steps: a user
    who sets max steps gets the model at that step), on classification, unsharded; evaluate
    each epoch unless --eval-every is given; stop after `patience` evaluations without a better
    macro-F1 (None: EARLY_STOPPING_PATIENCE)."""
    keep_best = task == "classification" and not max_steps and not fsdp
    if not keep_best:
        return Selection(eval_every, False, 0)
    chosen = {}
    if not eval_every:
        eval_every = updates_per_epoch
        chosen["eval_every"] = "each epoch, to keep the best model"
    if patience is None:
        patience = EARLY_STOPPING_PATIENCE
        chosen["patience"] = "macro-F1 rather than accuracy: labels may be imbalanced"
    return Selection(eval_every, True, patience, chosen)


def describe_schedule(schedule: Schedule, selection: Selection | None = None) -> str:
    """One line for the start of a run: the values, and which of them the rule chose."""

    def origin(name: str) -> str:
        return f" (default: {schedule.chosen[name]})" if name in schedule.chosen else ""

    parts = [
        f"learning rate {schedule.learning_rate:.1e}{origin('learning_rate')}",
        f"{schedule.epochs} epoch(s), {schedule.total_steps} steps{origin('epochs')}",
    ]
    if schedule.max_length is not None:
        parts.append(f"max length {schedule.max_length}{origin('max_length')}")
    if "class_weights" in schedule.chosen:
        parts.append(f"class-weighted loss{origin('class_weights')}")
    if selection is not None and "eval_every" in selection.chosen:
        why = selection.chosen["eval_every"]
        parts.append(f"evaluate every {selection.eval_every} steps (default: {why})")
    if selection is not None and "patience" in selection.chosen:
        why = selection.chosen["patience"]
        parts.append(
            f"keep the best validation macro-F1, stop early after {selection.patience} "
            f"evaluations without a better one (default: {why})"
        )
    return "; ".join(parts)
