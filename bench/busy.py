"""Busy-core benchmark: how much slower the toolkit runs while another process holds one core.

    python bench/busy.py                 # 5 rounds, the toolkit's own thread policy
    python bench/busy.py --rounds 3 --tree before=/path/to/old/checkout   # old code side by side
    python bench/busy.py --env OMP_NUM_THREADS=2   # any setting of the measured commands

Two commands, each run on a quiet machine and with one core kept busy by a spinning Python
process that this script starts and stops: `toolkit compare minilm <fine-tuned copy> --json`
and a 20-step MiniLM fine-tune (`--json`, no evaluation but the last, tracking every 10 steps).
Quiet and busy runs alternate (quiet, busy, then busy, quiet in the next round, ...), and so do
the checkouts given with --tree (each its own PYTHONPATH; "toolkit" is the checkout holding this
script), so that load from other users falls on all alike; the ratio is
median(busy wall) / median(quiet wall). Prints one JSON object and the table;
`python bench/run.py --only busy` records them in bench/results.json and bench/RESULTS.md.
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
    from toolkit.sources import embedded_model_path

    return write_child(embedded_model_path(), folder)


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


def summary(walls: dict, settings: list[str], trees: dict) -> dict:
    """Medians and busy/quiet ratios of the rounds so far."""
    result = {
        "settings": settings,
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


def measure_busy(
    rounds: int,
    trees: dict[str, str] | None = None,
    settings: list[str] = (),
    only: list[str] | None = None,
) -> dict:
    """Quiet and busy wall seconds of each command for each checkout in `trees` (name -> path)."""
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for setting in settings:
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
    trees = {"toolkit": str(HERE.parent)} | (trees or {})
    runs = [(tree, name) for name in only or commands for tree in trees]
    walls = {run: {"quiet": [], "busy": []} for run in runs}
    for index in range(rounds):
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
                log(f"round {index + 1}/{rounds} {tree} {name} {state}: {seconds:.1f} s")
        result = summary(walls, list(settings), trees)
        (WORK / "partial.json").write_text(json.dumps(result, indent=2) + "\n")  # rounds so far
    return result


def busy_table(results: dict) -> list[str]:
    """The section of bench/RESULTS.md."""
    lines = [
        "## 5. A busy core (`python bench/run.py --only busy`, or `python bench/busy.py`)",
        "",
        "Wall seconds with one of the cores held by another process (a spinning Python process "
        "that the benchmark starts) against a quiet machine: `toolkit compare minilm` against a "
        "copy whose attention weights carry 1% noise, and a 20-step MiniLM fine-tune (batch 8, "
        "32 tokens, tracking every 10 steps). Quiet and busy runs alternate, and so do the "
        f"checkouts; medians of {results['rounds']} rounds; load average "
        f"{results['load_average_at_end']:.1f} at the end ({results['date']}).",
        "",
        "| checkout | command | quiet s | busy s | busy / quiet |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for tree in results["trees"]:
        for name, r in results.get(tree, {}).items():
            lines.append(
                f"| {tree} | {name} | {r['quiet_median']:.1f} | {r['busy_median']:.1f} | "
                f"{r['ratio']:.2f} |"
            )
    if results.get("note"):  # what the numbers can and cannot show, written by whoever ran it
        lines += ["", results["note"]]
    return lines


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
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.tree)
    result = measure_busy(args.rounds, trees, args.env, args.only)
    print(json.dumps(result, indent=2))
    print("\n".join(busy_table(result)), file=sys.stderr)


if __name__ == "__main__":
    main()
