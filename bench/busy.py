"""Busy-core benchmark: how much slower the toolkit runs while another process holds one core.

    python bench/busy.py                 # 5 rounds, the toolkit's own thread policy
    python bench/busy.py --rounds 3 --tree before=/path/to/old/checkout   # old code side by side
    python bench/busy.py --env OMP_NUM_THREADS=2   # any setting of the measured commands

Two commands, each run on a quiet machine and with one core kept busy by a spinning Python
process that this script starts and stops: `toolkit compare minilm <fine-tuned copy> --json`
and a 20-step MiniLM fine-tune (`--json`, no evaluation but the last, tracking every 10 steps).
Quiet and busy runs alternate (quiet, busy, then busy, quiet in the next round, ...), and so do
the checkouts given with --tree (each its own PYTHONPATH; "toolkit" is the one this script
imports), so that load from other users falls on all alike; the ratio is
median(busy wall) / median(quiet wall). Prints one JSON object; --results merges it into
bench/results.json under "busy".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from run import write_child, write_finetune_csv  # bench/run.py, beside this script

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "busy"
PY = sys.executable
TOOLKIT = [PY, "-m", "toolkit"]
FINETUNE = {
    "model": "minilm",
    "task": "classification",
    "max_length": 32,
    "batch_size": 8,
    "max_steps": 20,
    "eval_every": 0,
    "max_eval_samples": 8,
    "track_every": 10,
    "log_every": 10,
    "seed": 42,
}


def log(message: str) -> None:
    print(f"[busy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_child() -> Path:
    """MiniLM with its attention weights nudged by 1% noise: a stand-in for a fine-tuned copy."""
    folder = WORK / "minilm-child"
    if (folder / "model.safetensors").is_file():
        return folder
    from toolkit.sources import embedded_model_dir

    return write_child(embedded_model_dir(), folder)


def prepare_recipe() -> Path:
    """A recipe (JSON is YAML) for MiniLM on the fine-tuning section's fixed CSV of 400 rows."""
    data = write_finetune_csv(WORK / "texts.csv")
    recipe = WORK / "finetune.yaml"
    recipe.write_text(json.dumps({**FINETUNE, "dataset": str(data)}, indent=2) + "\n")
    return recipe


def wall_seconds(command: list[str], env: dict, before=None) -> float:
    if before is not None:
        before()
    start = time.perf_counter()
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr[-2000:]}")
    return seconds


def spinner() -> subprocess.Popen:
    """Another user's job: one pure-Python process that never sleeps."""
    return subprocess.Popen([PY, "-c", "while True: pass"])


def summary(walls: dict, args, trees: dict) -> dict:
    """Medians and busy/quiet ratios of the rounds so far."""
    result = {
        "settings": args.env,
        "trees": trees,
        "rounds": len(next(iter(walls.values()))["busy"]),
        "load_average_at_end": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    for (tree, name), states in walls.items():
        quiet, busy = statistics.median(states["quiet"]), statistics.median(states["busy"])
        result.setdefault(tree, {})[name] = {
            **states,
            "quiet_median": quiet,
            "busy_median": busy,
            "ratio": busy / quiet,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the measured commands"
    )
    parser.add_argument("--only", choices=["compare", "finetune"], action="append")
    parser.add_argument(
        "--tree", action="append", default=[], help="NAME=PATH: also measure this checkout"
    )
    parser.add_argument("--results", action="store_true", help="merge into bench/results.json")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for setting in args.env:
        name, _, value = setting.partition("=")
        env[name] = value
    run_dir = WORK / "run"

    def clear_run() -> None:
        shutil.rmtree(run_dir, ignore_errors=True)

    commands = {
        "compare": ([*TOOLKIT, "compare", "minilm", str(prepare_child()), "--json"], None),
        "finetune": (
            [*TOOLKIT, "finetune", str(prepare_recipe()), "--json", "--output-dir", str(run_dir)],
            clear_run,
        ),
    }
    trees = {"toolkit": str(HERE.parent)} | dict(tree.split("=", 1) for tree in args.tree)
    runs = [(tree, name) for name in args.only or commands for tree in trees]
    walls = {run: {"quiet": [], "busy": []} for run in runs}
    for index in range(args.rounds):
        order = ["quiet", "busy"] if index % 2 == 0 else ["busy", "quiet"]
        for tree, name in runs[index % len(runs) :] + runs[: index % len(runs)]:
            command, before = commands[name]
            for state in order:
                busy = spinner() if state == "busy" else None
                try:
                    seconds = wall_seconds(command, {**env, "PYTHONPATH": trees[tree]}, before)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                walls[tree, name][state].append(seconds)
                log(f"round {index + 1}/{args.rounds} {tree} {name} {state}: {seconds:.1f} s")
        result = summary(walls, args, trees)
        (WORK / "partial.json").write_text(json.dumps(result, indent=2) + "\n")  # rounds so far
    print(json.dumps(result, indent=2))
    if args.results:
        results_file = HERE / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        results.setdefault("busy", []).append(result)
        results_file.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
