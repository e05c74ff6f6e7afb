"""`toolkit explain lora`: every number of the full-vs-LoRA lesson against an independent route
(the saved models read with numpy, the definitions written out), and its findings follow them."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
from conftest import BERT_SHAPE
from safetensors.numpy import load_file
from test_intruders import _numpy_count

import toolkit
from toolkit.lessons.lora import RANK_TOLERANCE, explain_lora
from toolkit.render.lessons import lesson_blocks
from toolkit.render.report import Paragraph, write_markdown
from toolkit.render.text import say

ROLES = ("wq", "wk", "wv", "w0")
RANK, LAYERS, D_MODEL = 2, BERT_SHAPE["num_hidden_layers"], BERT_SHAPE["hidden_size"]


@pytest.fixture(scope="module")
def lesson(toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain_lora") / "runs"
    started = time.perf_counter()
    result = explain_lora(
        str(tiny_bert_with_tokenizer),
        dataset=str(toy_sentiment_csv),
        steps=8,
        max_length=16,
        max_eval_samples=24,
        rank=RANK,
        alpha=4.0,
        full_learning_rate=2e-3,
        lora_learning_rate=1e-2,
        output_dir=out,
    )
    return result, out, time.perf_counter() - started


def _standard(folder):
    return toolkit.load_attention(folder)


def _delta_singular_values(base, final, layer, role) -> np.ndarray:
    a = base.layer(layer).full(role).astype(np.float64)
    b = final.layer(layer).full(role).astype(np.float64)
    return np.linalg.svd(b - a, compute_uv=False)


@pytest.mark.slow
def test_trainable_parameters_are_counted_from_the_saved_models(lesson):
    result, out, _ = lesson
    final = load_file(str(out / "full" / "final" / "model.safetensors"))
    everything = sum(tensor.size for tensor in final.values())  # BERT ties nothing
    assert result.runs["full"].trainable_parameters == everything
    adapter = load_file(str(out / "lora" / "adapter" / "adapter_model.safetensors"))
    assert result.runs["lora"].trainable_parameters == sum(t.size for t in adapter.values())
    # A [r, d] and B [d, r] per adapted matrix, and the new head: [2, d] and [2]
    assert (
        result.runs["lora"].trainable_parameters
        == LAYERS * 4 * 2 * RANK * D_MODEL + 2 * D_MODEL + 2
    )


@pytest.mark.slow
def test_delta_rank_and_intruders_match_numpy(lesson, tiny_bert_with_tokenizer):
    result, out, _ = lesson
    base = _standard(tiny_bert_with_tokenizer)
    for method in ("full", "lora"):
        final = _standard(out / method / "final")
        run = result.runs[method]
        for layer in range(LAYERS):
            for role in ROLES:
                singular = _delta_singular_values(base, final, layer, role)
                rank = int(np.sum(singular > RANK_TOLERANCE * singular[0]))
                assert run.delta_rank[role][layer] == rank, (method, layer, role)
                a, b = base.layer(layer).full(role), final.layer(layer).full(role)
                expected = _numpy_count(a.astype(np.float64), b.astype(np.float64), 10, 0.5)
                assert run.intruders[role][layer] == expected, (method, layer, role)
        if method == "lora":
            assert max(max(ranks) for ranks in run.delta_rank.values()) <= RANK


@pytest.mark.slow
def test_metrics_time_and_memory_against_the_runs_own_records(lesson):
    result, out, wall = lesson
    for method, run in result.runs.items():
        trajectory = json.loads((out / method / "shift" / "trajectory.json").read_text())
        last = {k: v for k, v in trajectory["evaluations"][-1].items() if k != "step"}
        assert run.metrics == pytest.approx(last)  # the same numbers read back from JSON
        assert [loss for _, loss in trajectory["train_loss"]] == run.train_loss
        assert 0 < run.seconds < wall
        weights = (out / method / "final" / "model.safetensors").stat().st_size / 2**20
        assert run.peak_rss_mb > weights  # the process held the model at least


@pytest.mark.slow
def test_top_heads_are_the_largest_per_head_changes_computed_with_numpy(
    lesson, tiny_bert_with_tokenizer
):
    result, out, _ = lesson
    base = _standard(tiny_bert_with_tokenizer)
    for method, run in result.runs.items():
        final = _standard(out / method / "final")
        changes = []
        for layer in range(LAYERS):
            moved = sum(
                np.sum(
                    (getattr(final.layer(layer), r) - getattr(base.layer(layer), r)) ** 2,
                    axis=(1, 2),
                )
                for r in ROLES
            )
            size = sum(np.sum(getattr(base.layer(layer), r) ** 2, axis=(1, 2)) for r in ROLES)
            changes += [
                (np.sqrt(m / s), layer, head)
                for head, (m, s) in enumerate(zip(moved, size, strict=True))
            ]
        expected = sorted(changes, reverse=True)[: len(run.top_heads)]
        assert [(h["layer"], h["head"]) for h in run.top_heads] == [
            (layer, head) for _, layer, head in expected
        ]
        # float64 from float32 weights, two accumulation orders: rtol 1e-4 is a margin
        np.testing.assert_allclose(
            [h["relative_change"] for h in run.top_heads], [c for c, _, _ in expected], rtol=1e-4
        )


@pytest.mark.slow
def test_findings_follow_the_numbers(lesson):
    result, _, _ = lesson
    full, lora = result.runs["full"], result.runs["lora"]
    found = {f.claim: f for f in result.findings}
    full_ranks = [r for role in ROLES for r in full.delta_rank[role]]
    lora_ranks = [r for role in ROLES for r in lora.delta_rank[role]]
    assert found["low_rank"].reproduced == (max(lora_ranks) <= RANK < statistics.median(full_ranks))
    lora_total = sum(map(sum, lora.intruders.values()))
    full_total = sum(map(sum, full.intruders.values()))
    assert found["lora_intruders"].reproduced == (lora_total > 0)
    assert found["lora_intruders"].numbers == {"lora": lora_total, "full": full_total}
    gap = lora.metrics["accuracy"] - full.metrics["accuracy"]
    assert result.metric_gap == pytest.approx(gap)  # one subtraction of the same floats
    assert found["on_par"].reproduced == (gap >= -0.02)


@pytest.mark.slow
def test_lesson_renders_in_both_languages_with_a_figure_and_json(lesson, tmp_path):
    result, _, _ = lesson
    json.dumps(result.to_dict(), allow_nan=False)
    for lang in ("en", "zh"):
        blocks = lesson_blocks({"lora": result}, lang)
        prose = [b.text for b in blocks if isinstance(b, Paragraph)]
        first = result.findings[0]
        verdict = say(
            lang,
            f"lora.claim.{first.claim}.{'yes' if first.reproduced else 'no'}",
            rank=result.rank,
            metric=result.metric,
            **first.numbers,
        )
        assert verdict in prose
        figures = write_markdown(blocks, tmp_path / f"lora-{lang}.md")
        assert [f.read_bytes()[:4] for f in figures] == [b"\x89PNG"]
