"""`verify` recomputes attention from the standard tensors and matches the real model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolkit import load_attention, verify
from toolkit.analysis.verify import TOLERANCE
from toolkit.attention import AttentionModel

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels


@pytest.mark.parametrize(
    "fixture",
    [
        "tiny_bert",
        "tiny_bert_classifier",
        "tiny_gpt2",
        "tiny_gpt2_lm_scaled",
        "tiny_gpt2_unscaled",
        "minilm",
    ],
)
def test_verify_passes_on_every_layer(request, fixture):
    report = verify(str(request.getfixturevalue(fixture)))
    assert report.passed
    assert [c.layer for c in report.layers] == list(range(len(report.layers)))
    for check in report.layers:
        # relative to the model's own magnitude, the bound derived in docs/numerics.md
        assert max(check.max_rel_diff.values()) <= TOLERANCE
        assert check.concat_vs_sum_max_rel_diff <= TOLERANCE
        # the relative figure is the absolute one over the largest |model's value| (the same
        # float division, so exactly equal)
        for quantity, absolute in check.max_abs_diff.items():
            assert check.max_rel_diff[quantity] == absolute / check.reference_max_abs[quantity]


def test_verify_on_texts_uses_the_tokenizer_and_pads(minilm):
    report = verify(str(minilm), ["one two three four five six seven", "short"])
    assert report.inputs["kind"] == "texts"
    assert report.inputs["shape"][0] == 2
    assert report.passed


def test_w0_shape_is_heads_times_d_head_by_d_model(tiny_gpt2):
    report = verify(str(tiny_gpt2))
    assert report.w0_shape == [4 * 16, 64]


class _Corrupted(AttentionModel):
    """Extraction with a plausible bug in one layer: two heads of wq swapped."""

    def layer(self, index):
        layer = super().layer(index)
        if index == 1:
            layer.wq = layer.wq[[1, 0, *range(2, layer.wq.shape[0])]]
        return layer


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2"])
def test_verify_fails_when_a_head_is_misassigned(request, fixture):
    attention = load_attention(str(request.getfixturevalue(fixture)))
    corrupted = _Corrupted(
        **{f.name: getattr(attention, f.name) for f in dataclasses.fields(attention)}
    )
    report = verify(attention=corrupted)
    assert not report.passed
    assert report.layers[0].worst_rel_diff <= TOLERANCE  # untouched layer still matches
    # a misassigned head is a large error, not rounding: far above the bound
    assert max(report.layers[1].max_rel_diff.values()) > 100 * TOLERANCE


def test_verify_fails_when_the_score_scale_is_wrong(tiny_gpt2_lm_scaled):
    attention = load_attention(str(tiny_gpt2_lm_scaled))
    # Ignoring scale_attn_by_inverse_layer_idx is right for layer 0 only.
    unscaled_family = dataclasses.replace(
        attention.family, score_scale=lambda config, layer, dims: dims.d_head**-0.5
    )
    report = verify(attention=dataclasses.replace(attention, family=unscaled_family))
    assert report.layers[0].worst_rel_diff <= TOLERANCE
    # the wrong scale moves probabilities by O(0.01..1), not by rounding
    assert report.layers[1].max_rel_diff["probs"] > 100 * TOLERANCE
    assert not report.passed


def test_verify_fails_when_a_bias_is_dropped(tiny_bert):
    attention = load_attention(str(tiny_bert))

    class NoValueBias(AttentionModel):
        def layer(self, index):
            layer = super().layer(index)
            layer.bv = np.zeros_like(layer.bv)
            return layer

    wrong = NoValueBias(
        **{f.name: getattr(attention, f.name) for f in dataclasses.fields(attention)}
    )
    report = verify(attention=wrong)
    # bv does not enter the scores
    assert all(c.max_rel_diff["probs"] <= TOLERANCE for c in report.layers)
    # the missing bias moves every output by O(its size), not by rounding
    assert all(c.max_rel_diff["output"] > 100 * TOLERANCE for c in report.layers)


def test_compare_layer_divides_by_the_largest_model_value_over_real_queries():
    """Differences at padding queries are ignored; the relative figure is max |diff| over the
    real queries divided by max |model's value| there (hand-computed numbers, all exact in
    float32: powers of two and small integers)."""
    import torch

    from toolkit.analysis.verify import compare_layer

    valid = torch.tensor([[True, True, False]])  # [batch 1, tokens 3]: the last is padding
    model_output = torch.zeros(1, 3, 4)
    model_output[0, 1, 2] = -8.0  # the largest |value| over the real queries
    model_output[0, 2, 0] = 1000.0  # at the padding query: not the scale
    ours = model_output.clone()
    ours[0, 0, 3] += 0.5  # the largest difference at a real query
    ours[0, 2, 1] += 99.0  # at the padding query: ignored
    model_probs = torch.zeros(1, 2, 3, 3)
    model_probs[0, 1, 0, 0] = 0.5
    probs = model_probs.clone()
    probs[0, 0, 1, 2] = 0.25
    concat = ours.clone()
    concat[0, 1, 0] += 2.0
    check = compare_layer(
        7, {"probs": (probs, model_probs), "output": (ours, model_output)}, concat, valid
    )
    assert check.layer == 7
    assert check.max_abs_diff == {"probs": 0.25, "output": 0.5}
    assert check.reference_max_abs == {"probs": 0.5, "output": 8.0}
    assert check.max_rel_diff == {"probs": 0.5, "output": 0.0625}
    assert (check.concat_vs_sum_max_abs_diff, check.concat_vs_sum_max_rel_diff) == (2.0, 0.25)
    assert check.worst_rel_diff == 0.5
