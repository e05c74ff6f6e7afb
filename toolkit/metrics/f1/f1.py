"""Macro F1: the unweighted mean over classes of 2·precision·recall / (precision + recall).

The classes are those that occur in the references or the predictions; a class with no true
positive scores 0 (as scikit-learn's f1_score(average="macro", zero_division=0)).
"""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Macro-averaged F1 score over the classes present.",
            citation="",
            inputs_description="predictions, references: class ids (int)",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        scores = []
        for label in np.union1d(predictions, references):
            true_positive = np.sum((predictions == label) & (references == label))
            # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted as label + truly label)
            denominator = np.sum(predictions == label) + np.sum(references == label)
            scores.append(2 * true_positive / denominator)
        return {"f1": float(np.mean(scores))}
