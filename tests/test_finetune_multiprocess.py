"""Two real gloo processes under torchrun: DDP writes one run and resumes it; FSDP2 (`--fsdp`)
tracks, saves and resumes exactly like DDP, and its gather returns whole tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_GPT2_LM_OPTIONS
from safetensors.numpy import load_file

import toolkit
from toolkit.errors import ToolkitError
from toolkit.training.recipe import FinetuneConfig

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
ROOT = Path(toolkit.__file__).parents[1]


def _launch(*args: str) -> subprocess.Popen:
    """Two processes under torchrun; --standalone picks a free port, so runs may overlap."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return subprocess.Popen(
        [*command, "2", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finetune(*args: str) -> subprocess.Popen:
    return _launch("-m", "toolkit", "finetune", *args)


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own)."""
    import psutil  # an Accelerate dependency

    for worker in psutil.Process(process.pid).children(recursive=True):
        worker.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.communicate()


def _trajectory(run: Path) -> dict:
    return json.loads((run / "shift" / "trajectory.json").read_text())


@pytest.mark.slow
def test_two_processes_under_torchrun_write_one_run_and_resume(toy_corpus_txt, tmp_path):
    out = tmp_path / "run"
    data = ("--dataset", str(toy_corpus_txt), "--output-dir", str(out))
    result = json.loads(_finish(_finetune(*RUN, *data, "--json")))  # only the main one prints
    assert result["processes"] == 2 and result["steps"] == 12
    # Each process saved its own RNG state: both ranks took part in every checkpoint.
    states = sorted(p.name for p in (out / "checkpoints" / "step_000008").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]
    trajectory = _trajectory(out)
    assert [p["step"] for p in trajectory["shift"]] == [0, 4, 8, 12]
    assert [s for s, _ in trajectory["train_loss"]] == list(range(1, 13))
    assert [e["step"] for e in trajectory["evaluations"]] == [0, 6, 12]  # 0: the start
    assert sorted(p.name for p in out.glob("*.md")) == ["report.md"]
    assert "12 optimizer steps on 2 process(es)" in (out / "report.md").read_text()
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind by either process

    # Resuming from step 8 (each rank reloads its own RNG state) redoes steps 9-12 identically.
    _finish(_finetune(*RUN, *data, "--resume"))
    assert _trajectory(out) == trajectory


# --- FSDP2 on CPU (`--fsdp`): the reference is a DDP run on the same two processes. One process
# with twice the batch would see the same examples per update, but dropout draws its masks per
# process (B examples from each rank's RNG, not 2B from one), so only DDP gives the same numbers.


def _differences(run: Path, reference: Path) -> dict[str, float]:
    """The largest absolute difference between two runs, per kind of number they recorded.

    Key biases are left out: their gradient is zero in exact arithmetic (a query's scores all
    gain the same q . b_k, which softmax ignores), so what arrives is float noise of about 1e-10
    whose sign depends on the order of the sums, and AdamW scales it up to steps of the size of
    the learning rate (seen between DDP and FSDP2: BERT's b_k differ by 1.5e-4, GPT-2's by
    7e-7, every other weight by at most 1.4e-7).
    """
    a, b = _trajectory(run), _trajectory(reference)
    assert [p["step"] for p in a["shift"]] == [p["step"] for p in b["shift"]]
    assert [e["step"] for e in a["evaluations"]] == [e["step"] for e in b["evaluations"]]
    differences = {
        "train_loss": np.abs(np.subtract(a["train_loss"], b["train_loss"])).max(),
        "evaluations": max(
            abs(x[k] - y[k])
            for x, y in zip(a["evaluations"], b["evaluations"], strict=True)
            for k in x
        ),
        "head_change": max(
            np.abs(np.subtract(p["head_change"][role], q["head_change"][role])).max()
            for p, q in zip(a["shift"], b["shift"], strict=True)
            for role in p["head_change"]
        ),
    }
    for name, folder in (("snapshots", "shift"), ("final", "final")):
        differences[name] = 0.0
        for file in sorted((reference / folder).glob("*.safetensors")):
            x, y = load_file(str(run / folder / file.name)), load_file(str(file))
            assert sorted(x) == sorted(y), file.name  # the same tensors (GPT-2: lm_head tied)
            moved = [np.abs(_without_key_bias(k, x[k] - y[k])).max(initial=0) for k in x]
            differences[name] = max(differences[name], *moved)
    return differences


def _without_key_bias(name: str, tensor: np.ndarray) -> np.ndarray:
    if name.endswith((".bk", "attention.self.key.bias")):  # standard snapshot name, BERT's name
        return tensor[:0]
    if name.endswith("attn.c_attn.bias"):  # GPT-2's fused [b_q | b_k | b_v]
        b_q, _, b_v = np.split(tensor, 3)
        return np.concatenate([b_q, b_v])
    return tensor


def _assert_same_run(run: Path, reference: Path) -> None:
    differences = _differences(run, reference)
    # Measured here: at most 6e-8 in the losses, 2e-8 in the head changes, 1.4e-7 in the weights.
    tolerance = {"train_loss": 1e-5, "evaluations": 1e-4, "head_change": 1e-6}
    assert all(differences[k] < tolerance.get(k, 1e-6) for k in differences), differences
    # ...and the runs did move the weights: a difference of zero is not a vacuous match.
    assert max(_trajectory(run)["shift"][-1]["head_change"]["wq"][0]) > 1e-3


@pytest.mark.slow
def test_gather_returns_whole_tensors_from_fsdp2_shards(tiny_bert_classifier, tmp_path):
    name = "bert.encoder.layer.0.attention.self.query.weight"
    worker = ROOT / "tests" / "fsdp_gather_worker.py"
    _finish(_launch(str(worker), str(tiny_bert_classifier), str(tmp_path), name))
    saved = load_file(str(tiny_bert_classifier / "model.safetensors"))  # read straight from disk
    halves = [load_file(str(tmp_path / f"local_{rank}.safetensors"))[name] for rank in (0, 1)]
    assert [h.shape for h in halves] == [(24, 48), (24, 48)]  # each rank: half of d_model rows
    assert np.array_equal(np.concatenate(halves), saved[name])
    whole = load_file(str(tmp_path / "whole.safetensors"))
    assert set(saved) <= set(whole)
    for key, tensor in saved.items():
        assert whole[key].shape == tensor.shape and np.array_equal(whole[key], tensor), key
    # Only the main process keeps the gathered tensors.
    assert json.loads((tmp_path / "keys_1.json").read_text()) == []


@pytest.mark.slow
def test_fsdp2_bert_classifier_tracks_and_saves_like_ddp(
    toy_sentiment_csv, tiny_bert_scaled_with_tokenizer, tmp_path
):
    run = [
        *("--model", str(tiny_bert_scaled_with_tokenizer), "--dataset", str(toy_sentiment_csv)),
        *("--max-length", "16", "--batch-size", "8", "--learning-rate", "2e-3"),
        *("--max-steps", "8", "--track-every", "4", "--eval-every", "4", "--checkpoint-every", "4"),
    ]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    reference = _finetune(*run, "--output-dir", str(ddp))
    sharded = _finetune(*run, "--output-dir", str(fsdp), "--fsdp")
    _finish(reference)
    _finish(sharded)
    # Each process wrote its own shard of the model and optimizer (DCP): the run was sharded.
    shards = fsdp / "checkpoints" / "step_000004" / "sharded"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ddp / "checkpoints" / "step_000004" / "sharded").exists()
    _assert_same_run(fsdp, ddp)


@pytest.mark.slow
def test_fsdp2_gpt2_lm_killed_and_resumed_ends_like_ddp(toy_corpus_txt, tmp_path):
    run = [
        *TINY_GPT2_LM_OPTIONS,
        *("--dataset", str(toy_corpus_txt), "--learning-rate", "3e-3", "--seed", "7"),
        *("--max-steps", "16", "--gradient-accumulation-steps", "2", "--track-every", "4"),
        *("--eval-every", "8", "--checkpoint-every", "4"),
    ]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    reference = _finetune(*run, "--output-dir", str(ddp))
    victim = _finetune(*run, "--output-dir", str(fsdp), "--fsdp")
    marker = fsdp / "checkpoints" / "step_000008" / "complete.json"
    deadline = time.monotonic() + 500
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_all(victim)
    assert marker.exists() and not (fsdp / "final").exists(), "the run must die mid-way"

    result = json.loads(
        _finish(_finetune(*run, "--output-dir", str(fsdp), "--fsdp", "--resume", "--json"))
    )
    _finish(reference)
    assert result["resumed_from"] >= 8 and result["steps"] == 16
    _assert_same_run(fsdp, ddp)


def test_fsdp_in_one_cpu_process_is_refused_before_writing(toy_corpus_txt, tmp_path):
    config = FinetuneConfig(
        model="gpt2-config:n_layer=1,n_head=2,n_embd=16",
        task="causal-lm",
        dataset=str(toy_corpus_txt),
        output_dir=str(tmp_path / "run"),
        fsdp=True,
    )
    with pytest.raises(ToolkitError, match="--fsdp shards the model across processes: launch"):
        toolkit.finetune(config)
    assert not (tmp_path / "run").exists()
