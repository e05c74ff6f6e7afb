"""Faults: a run killed with SIGKILL and resumed ends like an uninterrupted one; NaN stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_GPT2_LM_OPTIONS, TINY_GPT2_SPEC
from safetensors.torch import load_file

import toolkit
from toolkit.errors import ToolkitError
from toolkit.training.recipe import FinetuneConfig
from toolkit.training.tracking import SKIPPED

# 400 short lines -> about 78 training blocks of 32 tokens: 20 updates per epoch, so 60 steps
# cross epoch boundaries and the kill lands mid-epoch. GPT-2's dropout makes the RNG state matter.
RUN = [
    *TINY_GPT2_LM_OPTIONS,
    "--max-steps",
    "60",
    "--learning-rate",
    "3e-3",
    "--track-every",
    "5",
    "--checkpoint-every",
    "4",
    "--eval-every",
    "20",
    "--seed",
    "7",
]


def _toolkit(*args: str) -> subprocess.Popen:
    # One thread, as in every run compared here: float sums depend on the thread count.
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(toolkit.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit", "finetune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr


def _kill_after(victim: subprocess.Popen, marker: Path, run: Path) -> None:
    """SIGKILL `victim` as soon as `marker` (a checkpoint's complete.json) exists."""
    deadline = time.monotonic() + 240
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert marker.exists() and not (run / "final").exists(), "the run must die mid-way"


def _without_skips(points: list[dict], other: list[dict]) -> list[dict]:
    """`points` without the snapshot fields where either run skipped a snapshot (the writer was
    still busy: a matter of timing, not of the numbers)."""
    return [
        {k: v for k, v in p.items() if not skipped or k not in ("snapshot", "snapshot_missing")}
        for p, q in zip(points, other, strict=True)
        for skipped in [SKIPPED in (p["snapshot_missing"], q["snapshot_missing"])]
    ]


def _trajectory(run: Path) -> dict:
    return json.loads((run / "shift" / "trajectory.json").read_text())


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights_and_trajectory(toy_corpus_txt, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _toolkit("--dataset", str(toy_corpus_txt), "--output-dir", str(whole), *RUN)

    victim = _toolkit("--dataset", str(toy_corpus_txt), "--output-dir", str(killed), *RUN)
    _kill_after(victim, killed / "checkpoints" / "step_000024" / "complete.json", killed)

    _finish(
        _toolkit("--dataset", str(toy_corpus_txt), "--output-dir", str(killed), *RUN, "--resume")
    )
    _finish(reference)

    expected, got = (
        load_file(str(whole / "final" / "model.safetensors")),
        load_file(str(killed / "final" / "model.safetensors")),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    a, b = _trajectory(whole), _trajectory(killed)
    assert [p["step"] for p in b["shift"]] == list(range(0, 61, 5))
    assert [s for s, _ in b["train_loss"]] == list(range(1, 61))
    assert b["train_loss"] == a["train_loss"]
    assert _without_skips(b["shift"], a["shift"]) == _without_skips(a["shift"], b["shift"])
    assert b["evaluations"] == a["evaluations"]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "step_000052",
        "step_000056",
    ]


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(
    toy_corpus_txt, tmp_path, one_torch_thread
):
    """Learning rate 1e38: one AdamW step makes the weights ~1e38 and the next loss overflows."""
    config = FinetuneConfig(
        model=TINY_GPT2_SPEC,
        dataset=str(toy_corpus_txt),
        task="causal-lm",
        output_dir=str(tmp_path / "run"),
        max_length=32,
        batch_size=4,
        max_steps=10,
        learning_rate=1e38,
        warmup_ratio=0.0,
        checkpoint_every=1,
        track_every=1,
    )
    with pytest.raises(
        ToolkitError,
        match=r"loss became (nan|inf) at step 2, so training stopped; "
        r"the last good checkpoint is .*step_000001",
    ):
        toolkit.finetune(config)
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "complete.json").is_file()
    assert not (tmp_path / "run" / "final").exists()
    steps = [p["step"] for p in _trajectory(tmp_path / "run")["shift"]]
    assert steps == [0, 1]
