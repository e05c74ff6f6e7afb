"""`verify` recomputes attention from the standard tensors and matches the real model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolkit import load_attention, verify
from toolkit.attention import AttentionModel


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
        assert check.max_abs_diff["probs"] < 1e-4
        assert check.max_abs_diff["output"] < 1e-4
        assert check.concat_vs_sum_max_abs_diff < 1e-4


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
    assert report.layers[0].max_abs_diff["probs"] < 1e-4  # untouched layer still matches
    assert max(report.layers[1].max_abs_diff.values()) > report.tolerance


def test_verify_fails_when_the_score_scale_is_wrong(tiny_gpt2_lm_scaled):
    attention = load_attention(str(tiny_gpt2_lm_scaled))
    # Ignoring scale_attn_by_inverse_layer_idx is right for layer 0 only.
    unscaled_family = dataclasses.replace(
        attention.family, score_scale=lambda config, layer, dims: dims.d_head**-0.5
    )
    report = verify(attention=dataclasses.replace(attention, family=unscaled_family))
    assert report.layers[0].max_abs_diff["probs"] < 1e-4
    assert report.layers[1].max_abs_diff["probs"] > 1e-4
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
    assert all(
        c.max_abs_diff["probs"] < 1e-4 for c in report.layers
    )  # bv does not enter the scores
    assert all(c.max_abs_diff["output"] > 1e-3 for c in report.layers)
