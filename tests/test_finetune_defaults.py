"""Default settings that learn, the majority-class baseline beside every classification score,
a plain warning when a model learned nothing, and length-grouped batches."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import FILLER, NEGATIVE, POSITIVE

import toolkit
from toolkit.training.batching import LengthGroupedSampler
from toolkit.training.recipe import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABEL_SHARES = {"positive": 0.65, "negative": 0.2, "neutral": 0.15}


def _review(label: str, rng: random.Random) -> str:
    """Filler words plus one keyword that decides the label (neutral: none)."""
    words = rng.sample(FILLER, rng.randint(3, 8))
    if label != "neutral":
        words.append(rng.choice(POSITIVE if label == "positive" else NEGATIVE))
    rng.shuffle(words)
    return " ".join(words)


def _imbalanced_csv(path: Path, rows: int, seed: int, labels_follow_text: bool = True) -> Path:
    rng = random.Random(seed)
    names, weights = list(LABEL_SHARES), list(LABEL_SHARES.values())
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            label = rng.choices(names, weights)[0]
            text = _review(label, rng)
            if not labels_follow_text:
                label = rng.choices(names, weights)[0]  # drawn afresh: the text says nothing
            writer.writerow([text, label])
    return path


@pytest.mark.slow
def test_default_settings_beat_the_majority_class_on_held_out_rows(
    tiny_bert_with_tokenizer, tmp_path
):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _imbalanced_csv(tmp_path / "train.csv", 300, seed=0)
    result = toolkit.finetune(
        FinetuneConfig(
            model=str(tiny_bert_with_tokenizer),
            dataset=str(data),
            output_dir=str(tmp_path / "run"),
            max_length=16,
            track_every=0,
        )
    )
    # The rule: d_model 48 -> 1e-4 x (384/48)^1.5 = 2.3e-3, above the 1e-3 ceiling; 270 training
    # rows are 17 batches of 16, so at least 200 steps take 12 epochs (204 steps).
    assert result.learning_rate == 1e-3 and result.epochs == 12 and result.steps == 204
    # 65% of the rows are "positive": the loss is class-weighted by default
    assert set(result.defaults) == {
        "learning_rate",
        "epochs",
        "class_weights",
        "eval_every",
        "patience",
    }
    assert result.learned
    # one keyword decides each label: a bag of words may well do better than a tiny random BERT,
    # and the warning then says so; it says nothing else
    words = result.baselines["bag_of_words"]
    behind = any(result.metrics[k] < words[k] for k in ("accuracy", "f1"))
    assert (result.warning is not None) == behind
    assert result.warning is None or result.warning.startswith("the fine-tuned model does not beat")

    held_out = list(csv.DictReader(open(_imbalanced_csv(tmp_path / "test.csv", 200, seed=1))))
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    with torch.no_grad():
        encoded = tokenizer([row["text"] for row in held_out], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1).tolist()
    truth = [row["label"] for row in held_out]
    right = sum(model.config.id2label[p] == t for p, t in zip(predicted, truth, strict=True))
    majority_share = Counter(truth).most_common(1)[0][1] / len(truth)
    assert right / len(truth) > majority_share + 0.1, (right / len(truth), majority_share)


@pytest.mark.slow
def test_labels_unrelated_to_the_text_give_the_warning_line_and_json_field(
    tiny_bert_with_tokenizer, tmp_path
):
    data = _imbalanced_csv(tmp_path / "noise.csv", 300, seed=2, labels_follow_text=False)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(toolkit.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "toolkit", "finetune", "--model"]
    command += [str(tiny_bert_with_tokenizer), "--dataset", str(data), "--max-length", "16"]
    command += ["--track-every", "0", "--group-by-length", "--json"]
    run = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["learned"] is False
    assert result["warning"].startswith("the model did not learn")
    assert "--learning-rate" in result["warning"]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {result['warning']}"]
    # the majority baseline of the validation rows, from the CSV itself: the seeded split's rows
    metrics = result["metrics"]
    assert metrics["accuracy"] <= metrics["majority_accuracy"] or (
        metrics["top_prediction_share"] >= 0.95
    )
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"**Warning: {result['warning']}**" in report


def test_majority_accuracy_counts_the_training_majority_on_the_evaluated_rows():
    from toolkit.training.baseline import class_baselines, majority_class

    train_labels = [2, 2, 2, 0, 1]  # class 2 is the training majority
    references = [0, 0, 0, 2, 1]  # ... but not the validation one
    predictions = [1, 1, 1, 1, 0]
    assert majority_class(train_labels) == 2
    baselines = class_baselines(predictions, references, majority=2)
    assert baselines == {"majority_accuracy": 1 / 5, "top_prediction_share": 4 / 5}


def test_length_grouped_batches_cover_every_row_once_and_repeat_for_a_seed():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    again = LengthGroupedSampler(lengths, batch_size=8, seed=3)  # a resumed run's sampler
    again.set_epoch(1)
    assert list(again) == order
    again.set_epoch(2)
    assert list(again) != order and sorted(again) == list(range(1000))
    # Grouped: the padding a batch needs (longest minus each row) is far below random batches'.
    batches = [order[i : i + 8] for i in range(0, 1000, 8)]
    shuffled = rng.sample(range(1000), 1000)
    random_batches = [shuffled[i : i + 8] for i in range(0, 1000, 8)]

    def padding(groups):
        return sum(max(lengths[i] for i in g) - lengths[i] for g in groups for i in g)

    assert padding(batches) < 0.1 * padding(random_batches)


def test_default_rule_gives_the_rates_known_to_fine_tune_these_widths():
    from toolkit.training.defaults import default_epochs, default_learning_rate

    assert default_learning_rate(384, pretrained=True) == 1e-4  # MiniLM
    assert 2e-5 <= default_learning_rate(768, pretrained=True) <= 5e-5  # bert-base, gpt2
    assert 1e-5 <= default_learning_rate(1024, pretrained=True) < 3e-5  # bert-large
    assert default_learning_rate(128, pretrained=False) == 1e-3  # a fresh small GPT-2: capped
    assert default_epochs(29) == 7  # 6 x 29 = 174 < 200 <= 7 x 29 = 203
    assert default_epochs(2147) == 1 and default_epochs(1) == 20


def test_explicit_learning_rate_epochs_and_steps_win_over_the_rule():
    from toolkit.training.defaults import choose_schedule

    given = choose_schedule(3e-5, 2, None, d_model=384, pretrained=True, updates_per_epoch=29)
    assert (given.learning_rate, given.epochs, given.total_steps, given.chosen) == (3e-5, 2, 58, {})
    steps = choose_schedule(None, None, 50, d_model=384, pretrained=True, updates_per_epoch=29)
    assert (steps.epochs, steps.total_steps, set(steps.chosen)) == (2, 50, {"learning_rate"})


def test_max_length_is_the_95th_percentile_of_the_training_token_lengths(
    tiny_bert_with_tokenizer,
):
    from transformers import AutoTokenizer

    from toolkit.training.defaults import choose_max_length, default_max_length

    # lengths 1..100: the 95th percentile (linear between order statistics) is 1 + 0.95 x 99 =
    # 95.05, rounded up so that 95% of the texts fit whole
    assert default_max_length(range(1, 101), 512)[0] == 96
    assert default_max_length(range(1, 101), 64)[0] == 64  # the tokenizer's limit caps it
    assert default_max_length([3] * 10, None)[0] == 16  # no shorter than 16
    # texts of 1..20 known words: [CLS] + words + [SEP] = 3..22 tokens; the percentile's position
    # 0.95 x 19 = 18.05 lies between 21 and 22 tokens: 21.05, rounded up to 22
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_with_tokenizer)
    texts = [" ".join(["film"] * n) for n in range(1, 21)]
    length, why = choose_max_length(None, "classification", tokenizer, texts)
    assert length == 22 and why.startswith("95th percentile") and "21.05" not in why
    assert choose_max_length(48, "classification", tokenizer, texts) == (48, None)
    assert choose_max_length(None, "causal-lm", tokenizer, texts)[0] == 128


def test_class_weights_are_balanced_when_the_largest_class_holds_over_half():
    from toolkit.training.defaults import choose_class_weights

    # counts 6, 3, 1 of 10 rows, 3 classes: weights 10 / (3 x count)
    weights, why = choose_class_weights(None, [0] * 6 + [1] * 3 + [2], 3)
    assert weights == pytest.approx([10 / 18, 10 / 9, 10 / 3], rel=1e-12)
    assert why == "the largest class holds 60% of the training rows"
    assert choose_class_weights(None, [0, 0, 1, 1], 2) == (None, None)  # 50%: not above half
    assert choose_class_weights(False, [0] * 9 + [1], 2) == (None, None)  # the user said no
    assert choose_class_weights(True, [0, 0, 1, 1], 2) == ([1.0, 1.0], None)  # the user said yes
    # a class absent from the training rows weighs nothing
    assert choose_class_weights(None, [0, 0, 0, 1], 3)[0] == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_the_weighted_loss_is_the_weighted_mean_of_the_rows_cross_entropy():
    import math
    from types import SimpleNamespace

    import torch

    from toolkit.training.loop import _training_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    model = lambda **batch: SimpleNamespace(logits=logits, loss=None)  # noqa: E731
    weights = [0.5, 2.0]
    # by hand: -log softmax of the true class, each row weighted by its class's weight
    nll = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)]
    expected = (0.5 * nll[0] + 2.0 * nll[1] + 0.5 * nll[2]) / (0.5 + 2.0 + 0.5)
    loss = _training_loss(model, {"labels": labels}, weights)
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # float32 softmax: ~1e-7 relative
