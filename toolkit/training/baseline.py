"""Whether a fine-tuned model learned anything: the baselines every evaluation is read against.

Classification: the accuracy of always answering the training set's most common class, on the
same rows, and the share of rows given the model's most frequent answer. Causal LM: the
perplexity of the starting model on the same validation blocks (evaluated at step 0).
"""

from __future__ import annotations

import numpy as np

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
