"""`--compile` compiles the training step once: fixed batch shapes, the classifier's config
settled before compiling, evaluation eager; without a compiler it stops before writing."""

from __future__ import annotations

import json

import pytest

import toolkit
from toolkit.errors import ToolkitError
from toolkit.training.compiling import settle_forward_config
from toolkit.training.recipe import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAIN_ROWS, BATCH = 216, 16  # the toy reviews' training split (240 less 10% validation)


def _compiled_run(csv, model, out, **settings):
    config = FinetuneConfig(
        model=str(model),
        dataset=str(csv),
        output_dir=str(out),
        max_length=16,
        batch_size=BATCH,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        compile=True,
        **settings,
    )
    return toolkit.finetune(config)


@pytest.mark.slow
def test_two_epochs_with_a_partial_batch_evaluation_and_tracking_compile_at_most_twice(
    toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path, capfd, monkeypatch
):
    import torch
    from torch._dynamo.utils import counters

    # Inductor's own cache, shared by every process of the machine, may hold kernels generated
    # for another ATEN_CPU_CAPABILITY (they then fail to build): this run compiles afresh.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    result = _compiled_run(
        toy_sentiment_csv,
        tiny_bert_with_tokenizer,
        tmp_path / "run",
        epochs=2,
        eval_every=5,
        track_every=5,
    )
    # One graph per distinct (shape, grad mode, guarded config) the compiled forward saw, and
    # one more per graph break: 1 is no recompilation and no break. Before: 5 (problem_type set
    # by the first forward, the 8-row last batch, evaluation's no-grad mode).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # The partial last batch (216 = 13 x 16 + 8) is dropped: 13 updates per epoch.
    assert result.compiled and result.steps == 2 * (TRAIN_ROWS // BATCH)
    trajectory = json.loads((tmp_path / "run" / "shift" / "trajectory.json").read_text())
    assert [step for step, _ in trajectory["train_loss"]] == list(range(1, 27))
    assert [e["step"] for e in trajectory["evaluations"]] == [5, 10, 15, 20, 25, 26]
    said = " ".join(capfd.readouterr().err.split())  # the console wraps long lines
    assert "the partial last batch of each epoch (8 rows) dropped" in said


@pytest.mark.slow
def test_a_compiled_causal_lm_compiles_one_graph(toy_corpus_txt, tmp_path, monkeypatch):
    import torch
    from conftest import TINY_GPT2_SPEC
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # as above
    torch._dynamo.reset()
    counters.clear()
    config = FinetuneConfig(
        model=TINY_GPT2_SPEC,
        task="causal-lm",
        dataset=str(toy_corpus_txt),
        output_dir=str(tmp_path / "run"),
        max_length=32,
        batch_size=5,
        epochs=2,
        eval_every=4,
        track_every=4,
        compile=True,
    )
    result = toolkit.finetune(config)
    # GPT-2's loss lookup logs a warning on each forward unless decided before compiling: a
    # graph break, two graphs.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    evaluated = [e["step"] for e in result.trajectory_record.evaluations]
    assert evaluated[0] == 0 and evaluated[1:3] == [4, 8] and evaluated[-1] == result.steps


def test_compile_without_a_compiler_stops_before_writing(
    toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no g++, c++ or clang++ on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ToolkitError, match=r"--compile needs a C\+\+ compiler .* drop --compile"):
        _compiled_run(toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("num_labels", [1, 3])
def test_settled_problem_type_is_what_the_first_forward_sets(num_labels):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    shape = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    settled = BertForSequenceClassification(BertConfig(**shape, num_labels=num_labels))
    settle_forward_config(settled, "classification")
    forwarded = BertForSequenceClassification(BertConfig(**shape, num_labels=num_labels))
    labels = torch.tensor([0.5, 1.0]) if num_labels == 1 else torch.tensor([0, 2])
    forwarded(input_ids=torch.tensor([[1, 2], [3, 4]]), labels=labels)
    assert forwarded.config.problem_type is not None
    assert settled.config.problem_type == forwarded.config.problem_type
