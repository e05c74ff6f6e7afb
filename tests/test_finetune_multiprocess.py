"""Two real gloo processes under torchrun train one model and write one report and trajectory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_GPT2_LM_OPTIONS

import toolkit

RUN = [
    *TINY_GPT2_LM_OPTIONS,
    "--max-steps",
    "12",
    "--track-every",
    "4",
    "--checkpoint-every",
    "4",
    "--eval-every",
    "6",
]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    root = str(Path(toolkit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "toolkit",
        "finetune",
        *RUN,
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_processes_under_torchrun_write_one_run_and_resume(toy_corpus_txt, tmp_path):
    out = tmp_path / "run"
    done = _torchrun("--dataset", str(toy_corpus_txt), "--output-dir", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)  # one JSON object: only the main process prints
    assert result["processes"] == 2 and result["steps"] == 12
    # Each process saved its own RNG state: both ranks took part in every checkpoint.
    states = sorted(p.name for p in (out / "checkpoints" / "step_000008").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]
    trajectory = json.loads((out / "shift" / "trajectory.json").read_text())
    assert [p["step"] for p in trajectory["shift"]] == [0, 4, 8, 12]
    assert [s for s, _ in trajectory["train_loss"]] == list(range(1, 13))
    assert [e["step"] for e in trajectory["evaluations"]] == [6, 12]
    assert sorted(p.name for p in out.glob("*.md")) == ["report.md"]
    assert "12 optimizer steps on 2 process(es)" in (out / "report.md").read_text()
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind by either process

    # Resuming from step 8 (each rank reloads its own RNG state) redoes steps 9-12 identically.
    again = _torchrun("--dataset", str(toy_corpus_txt), "--output-dir", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "shift" / "trajectory.json").read_text()) == trajectory
