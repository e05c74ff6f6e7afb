"""Perplexity of a language model: exp(total negative log-likelihood / number of predicted tokens).

Inputs are per sequence, so that batches of any size combine exactly: `nll` is the summed
negative log-likelihood (natural log) of a sequence's predicted tokens, `tokens` their count.
"""

import math

import datasets
import evaluate
import numpy as np


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="exp of the mean per-token negative log-likelihood.",
            citation="",
            inputs_description="nll: summed token NLL per sequence; tokens: its token count",
            features=datasets.Features(
                {"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll, tokens):
        return {"perplexity": math.exp(float(np.sum(nll)) / float(np.sum(tokens)))}
