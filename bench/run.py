"""Benchmarks: the toolkit against the routes people use today, side by side, as ratios.

    python bench/run.py                # everything (prepares its own inputs under bench/work/)
    python bench/run.py --only extraction

Writes bench/RESULTS.md and bench/results.json. Every measured command runs as its own process;
wall time and peak RSS come from os.wait4 on that process (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
PY = sys.executable
TOOLKIT = [PY, "-m", "toolkit"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

SHAPES = {
    "bert-base": ("bert", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(command: list[str], repeat: int) -> dict:
    """Median wall seconds and median peak RSS (MB) of `command` run `repeat` times."""
    walls, peaks = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
        )
        _, status, usage = os.wait4(process.pid, 0)
        walls.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1024)  # KiB on Linux
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}"
            )
    return {
        "wall_s": statistics.median(walls),
        "peak_rss_mb": statistics.median(peaks),
        "runs": repeat,
    }


def prepare_checkpoint(name: str) -> Path:
    """A checkpoint of a realistic shape: random init from the config, saved as safetensors."""
    folder = WORK / "models" / name
    if (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file():
        return folder
    family, overrides = SHAPES[name]
    log(f"building {name} from its config (random init)")
    code = (
        "import sys, torch\n"
        "from transformers import BertConfig, BertModel, GPT2Config, GPT2Model\n"
        "torch.manual_seed(0)\n"
        f"overrides = {overrides!r}\n"
        f"model = (BertModel(BertConfig(**overrides)) if {family!r} == 'bert' "
        "else GPT2Model(GPT2Config(**overrides)))\n"
        "model.save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([PY, "-c", code, str(folder)], check=True, env=ENV)
    return folder


def attention_bytes(folder: Path) -> int:
    out = subprocess.run(
        [*TOOLKIT, "inspect", str(folder), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    return json.loads(out.stdout)["attention_parameters"] * 4


def bench_extraction(repeat: int) -> dict:
    """1. inspect/extract (lazy) vs AutoModel-then-slice vs TransformerLens, per model shape."""
    results = {}
    baseline = measure([PY, "-c", "import toolkit.cli, numpy, safetensors"], repeat)
    results["interpreter_baseline"] = baseline
    results["help"] = measure([*TOOLKIT, "--help"], repeat)
    for name in SHAPES:
        folder = prepare_checkpoint(name)
        out = WORK / f"{name}.attention.safetensors"
        log(f"extraction: {name}")
        routes = HERE / "routes"
        row = {
            "attention_mb": attention_bytes(folder) / 1e6,
            "toolkit_inspect": measure([*TOOLKIT, "inspect", str(folder), "--json"], repeat),
            "automodel_inspect": measure(
                [PY, str(routes / "automodel_route.py"), str(folder)], repeat
            ),
            "transformerlens_inspect": measure(
                [PY, str(routes / "transformerlens_route.py"), str(folder)], repeat
            ),
            "toolkit_extract": measure([*TOOLKIT, "extract", str(folder), "-o", str(out)], repeat),
            "automodel_extract": measure(
                [PY, str(routes / "automodel_route.py"), str(folder), str(out)], repeat
            ),
            "transformerlens_extract": measure(
                [PY, str(routes / "transformerlens_route.py"), str(folder), str(out)], repeat
            ),
        }
        results[name] = row
    return results


def extraction_table(results: dict) -> list[str]:
    base = results["interpreter_baseline"]
    lines = [
        "## 1. Extraction",
        "",
        "Each job done three ways: `toolkit` (lazy reads of the attention tensors), AutoModel "
        "(`from_pretrained`, then slice per head) and TransformerLens (`TransformerBridge."
        "boot_transformers`, then its stacked `W_Q`.. tensors). *inspect* = per-head norms; "
        "*extract* = the same plus writing the per-head tensors to a safetensors file.",
        "",
        f"`toolkit --help`: {results['help']['wall_s']:.2f} s. Interpreter baseline (python + "
        f"toolkit.cli + numpy + safetensors imported): {base['wall_s']:.2f} s, "
        f"{base['peak_rss_mb']:.0f} MB peak RSS.",
        "",
        "| model | job | attention MB | toolkit s | AutoModel s | TransformerLens s | "
        "AutoModel / toolkit | TransformerLens / toolkit | toolkit RSS MB | AutoModel RSS MB | "
        "TransformerLens RSS MB | toolkit RSS / (attention + baseline) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SHAPES:
        row = results[name]
        budget = row["attention_mb"] + base["peak_rss_mb"]
        for job in ("inspect", "extract"):
            ours, auto, lens = (
                row[f"{route}_{job}"] for route in ("toolkit", "automodel", "transformerlens")
            )
            lines.append(
                f"| {name} | {job} | {row['attention_mb']:.0f} | {ours['wall_s']:.2f} | "
                f"{auto['wall_s']:.2f} | {lens['wall_s']:.2f} | "
                f"{auto['wall_s'] / ours['wall_s']:.1f}x | "
                f"{lens['wall_s'] / ours['wall_s']:.1f}x | {ours['peak_rss_mb']:.0f} | "
                f"{auto['peak_rss_mb']:.0f} | {lens['peak_rss_mb']:.0f} | "
                f"{ours['peak_rss_mb'] / budget:.2f} |"
            )
    return lines


def prepare_child(name: str) -> Path:
    """A "fine-tuned child" of a checkpoint: the same weights, attention nudged by small noise."""
    folder = WORK / "models" / f"{name}-child"
    if (folder / "model.safetensors").is_file():
        return folder
    parent = prepare_checkpoint(name)
    log(f"building {name}-child (attention weights + 1% noise)")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        "torch.manual_seed(1)\n"
        "model = AutoModel.from_pretrained(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    for name, p in model.named_parameters():\n"
        "        if '.attn.' in name or '.attention.' in name:\n"
        "            p.add_(0.01 * p.std() * torch.randn_like(p))\n"
        "model.save_pretrained(sys.argv[2])\n"
    )
    subprocess.run([PY, "-c", code, str(parent), str(folder)], check=True, env=ENV)
    return folder


def bench_compare(repeat: int) -> dict:
    """2. `toolkit compare` of two gpt2-medium-shaped checkpoints: time and peak memory."""
    name = "gpt2-medium"
    parent, child = prepare_checkpoint(name), prepare_child(name)
    log(f"compare: {name} vs {name}-child")
    params = json.loads(
        subprocess.run(
            [*TOOLKIT, "inspect", str(parent), "--json"],
            capture_output=True,
            text=True,
            check=True,
            env=ENV,
        ).stdout
    )["total_parameters"]
    return {
        "model": name,
        "model_fp32_mb": params * 4 / 1e6,
        "attention_mb": attention_bytes(parent) / 1e6,
        "toolkit_compare": measure(
            [*TOOLKIT, "compare", str(parent), str(child), "--json"], max(1, repeat - 2)
        ),
    }


def compare_table(results: dict) -> list[str]:
    r = results["toolkit_compare"]
    return [
        "## 2. Comparison",
        "",
        f"`toolkit compare` of two {results['model']}-shaped checkpoints (a parent and a copy "
        "whose attention weights carry 1% noise), every metric of the issue, `--json`.",
        "",
        "| wall s | peak RSS MB | one model's fp32 MB | peak RSS / model fp32 | attention MB |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {results['model_fp32_mb']:.0f} | "
        f"{r['peak_rss_mb'] / results['model_fp32_mb']:.2f} | {results['attention_mb']:.0f} |",
    ]


SECTIONS = {
    "extraction": (bench_extraction, extraction_table),
    "compare": (bench_compare, compare_table),
}


def machine() -> dict:
    from importlib.metadata import version  # not `import torch`: forked children inherit RSS

    return {
        "cores": os.cpu_count(),
        "torch": version("torch"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results_file = HERE / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["machine"] = machine()
    for name in args.only or SECTIONS:
        run, _ = SECTIONS[name]
        log(f"section {name}")
        results[name] = run(args.repeat)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cores']} cores, torch {m['torch']}, Python {m['python']}, "
        f"{m['platform']}; {m['date']}. Regenerate with `make bench`.",
        "",
    ]
    for name, (_, table) in SECTIONS.items():
        if name in results:
            lines += table(results[name]) + [""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
