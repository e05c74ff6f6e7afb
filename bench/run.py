"""Benchmarks: the toolkit against the routes people use today, side by side, as ratios.

    python bench/run.py                # everything (prepares its own inputs under bench/work/)
    python bench/run.py --only extraction
    python bench/run.py --only extraction --shape llama-1b   # one row, merged into results.json

Writes bench/RESULTS.md and bench/results.json. Every measured command runs as its own process;
wall time and peak RSS come from os.wait4 on that process (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
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

# Llama 3.2 1B's shape: grouped-query attention (32 query / 8 key-value heads), rotary positions
# with llama3 scaling, tied embeddings; stored in bfloat16 as that model ships.
LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
SHAPES = {
    "bert-base": ("bert", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "llama-1b": ("llama", LLAMA_1B),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(command: list[str], repeat: int, output: Path | None = None) -> dict:
    """Median wall seconds and median peak RSS (MB) of `command` run `repeat` times.

    `output`, the file the command writes, is removed before each run (untimed): replacing an
    existing file costs ext4 a forced write-out of the new one, which is not the command's work.
    """
    walls, peaks = [], []
    for _ in range(repeat):
        if output is not None:
            output.unlink(missing_ok=True)
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
        if SHAPES[name][0] == "llama":
            prepare_tokenizer(folder)
        return folder
    family, overrides = SHAPES[name]
    log(f"building {name} from its config (random init)")
    code = (
        "import sys, torch\n"
        "from transformers import BertConfig, BertModel, GPT2Config, GPT2Model\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        f"overrides = {overrides!r}\n"
        f"family = {family!r}\n"
        "if family == 'llama':  # built in bfloat16: half the memory of float32, as it ships\n"
        "    torch.set_default_dtype(torch.bfloat16)\n"
        "    model = LlamaForCausalLM(LlamaConfig(**overrides))\n"
        "elif family == 'bert':\n"
        "    model = BertModel(BertConfig(**overrides))\n"
        "else:\n"
        "    model = GPT2Model(GPT2Config(**overrides))\n"
        "model.save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([PY, "-c", code, str(folder)], check=True, env=ENV)
    if family == "llama":
        prepare_tokenizer(folder)
    return folder


def prepare_tokenizer(folder: Path) -> None:
    """A small BPE tokenizer beside a Llama checkpoint: TransformerLens boots one with the model
    (real Llama checkpoints ship theirs; a tokenizer-less Llama folder makes it fail)."""
    if (folder / "tokenizer.json").is_file():
        return
    code = (
        "import sys\n"
        "from toolkit.training.data import train_bpe_tokenizer\n"
        "texts = ['the cat sat on the mat', 'attention is all you need'] * 50\n"
        "train_bpe_tokenizer(texts, 300).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([PY, "-c", code, str(folder)], check=True, env=ENV)


def attention_bytes(folder: Path) -> int:
    out = subprocess.run(
        [*TOOLKIT, "inspect", str(folder), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    return json.loads(out.stdout)["attention_parameters"] * 4


def bench_extraction(repeat: int, shapes: list[str] | None = None) -> dict:
    """1. inspect/extract (lazy) vs AutoModel-then-slice vs TransformerLens, per model shape
    (`shapes`: only those rows)."""
    results = {}
    baseline = measure([PY, "-c", "import toolkit.cli, numpy, safetensors"], repeat)
    results["interpreter_baseline"] = baseline
    results["help"] = measure([*TOOLKIT, "--help"], repeat)
    for name in shapes or SHAPES:
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
            "toolkit_extract": measure(
                [*TOOLKIT, "extract", str(folder), "-o", str(out)], repeat, out
            ),
            "automodel_extract": measure(
                [PY, str(routes / "automodel_route.py"), str(folder), str(out)], repeat, out
            ),
            "transformerlens_extract": measure(
                [PY, str(routes / "transformerlens_route.py"), str(folder), str(out)], repeat, out
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
    apart = [
        f"{name} on {results[name]['date']} (interpreter baseline then "
        f"{results[name]['interpreter_baseline']['wall_s']:.2f} s)"
        for name in SHAPES
        if "date" in results.get(name, {})
    ]
    if apart:
        lines[-2:-2] = [f"Rows measured apart (`--shape`): {', '.join(apart)}.", ""]
    for name in (name for name in SHAPES if name in results):
        row = results[name]
        budget = row["attention_mb"] + row.get("interpreter_baseline", base)["peak_rss_mb"]
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


# 3. Fine-tuning: one recipe for all three routes; every text is longer than max_length, so every
# batch is [batch_size, max_length] whatever order a route draws the rows in.
FINETUNE_RECIPE = {
    "task": "classification",
    "max_length": 64,
    "batch_size": 8,
    "max_steps": 20,
    "learning_rate": 5e-5,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "seed": 42,
    "eval_every": 0,
    "max_eval_samples": 8,
    "log_every": 10,
}
FINETUNE_TRACK_EVERY = 10
FINETUNE_WORDS = (
    "the model reads every word of this long sentence and learns which heads attend to what "
    "attention weights move slowly during fine tuning while the classifier head moves fast"
).split()
FINETUNE_LABELS = ("negative", "neutral", "positive")


def prepare_classifier() -> Path:
    """A bert-base-shaped 3-class classifier (random init) with a BERT tokenizer beside it."""
    folder = WORK / "models" / "bert-base-classifier"
    if (folder / "model.safetensors").is_file():
        return folder
    log("building bert-base-classifier from its config (random init) + MiniLM's tokenizer")
    code = (
        "import sys, torch\n"
        "from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification\n"
        "from toolkit.sources import embedded_model_dir\n"
        "torch.manual_seed(0)\n"
        f"labels = {list(FINETUNE_LABELS)!r}\n"
        "model = BertForSequenceClassification(BertConfig(\n"
        "    num_labels=len(labels), id2label=dict(enumerate(labels)),\n"
        "    label2id={name: i for i, name in enumerate(labels)}))\n"
        "model.save_pretrained(sys.argv[1])\n"
        "AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([PY, "-c", code, str(folder)], check=True, env=ENV)
    return folder


def prepare_finetune_recipe() -> Path:
    """bench/work/finetune.yaml (JSON is YAML) naming the classifier and a fixed CSV of 400 rows."""
    rng = random.Random(0)
    data = WORK / "finetune.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(400):  # 80 words: always past max_length tokens
            text = " ".join(rng.choice(FINETUNE_WORDS) for _ in range(80))
            writer.writerow([text, rng.choice(FINETUNE_LABELS)])
    recipe = WORK / "finetune.yaml"
    settings = {**FINETUNE_RECIPE, "model": str(prepare_classifier()), "dataset": str(data)}
    recipe.write_text(json.dumps(settings, indent=2) + "\n")
    return recipe


def run_json(command: list[str], env: dict) -> dict:
    """Run `command`, return the JSON it prints on stdout."""
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def bench_finetune(repeat: int) -> dict:
    """3. Training samples/s: toolkit finetune tracking / not tracking vs the transformers Trainer.

    The three routes run in turn, the order rotated each round (a b c, b c a, c a b) so that
    load from other work, and any effect of running first or last, falls on all of them alike;
    medians of the rounds.
    """
    recipe = prepare_finetune_recipe()
    env = {**ENV, "OMP_NUM_THREADS": str(os.cpu_count())}  # the same torch threads for every route
    runs = WORK / "finetune-runs"
    finetune = [*TOOLKIT, "finetune", str(recipe), "--json"]
    routes = {  # each command ends with its output folder
        "tracking": [*finetune, "--track-every", str(FINETUNE_TRACK_EVERY), "--output-dir"],
        "no_tracking": [*finetune, "--track-every", "0", "--output-dir"],
        "trainer": [PY, str(HERE / "routes" / "trainer_route.py"), str(recipe)],
    }
    rounds = repeat
    speeds = {route: [] for route in routes}
    names = list(routes)
    for index in range(rounds):
        for route in names[index % 3 :] + names[: index % 3]:
            command = routes[route]
            log(f"finetune: {route}, round {index + 1}/{rounds}")
            shutil.rmtree(runs / route, ignore_errors=True)
            result = run_json([*command, str(runs / route)], env)
            speeds[route].append(result["train_samples_per_second"])
    return {
        "settings": {**FINETUNE_RECIPE, "track_every": FINETUNE_TRACK_EVERY},
        "threads": os.cpu_count(),
        "samples_per_second": speeds,
        "median": {route: statistics.median(values) for route, values in speeds.items()},
    }


def finetune_table(results: dict) -> list[str]:
    s, median = results["settings"], results["median"]
    tracking, untracked, trainer = median["tracking"], median["no_tracking"], median["trainer"]
    return [
        "## 3. Fine-tuning throughput",
        "",
        f"A bert-base-shaped classifier (110M, random init, 3 labels) trained for {s['max_steps']} "
        f"steps of {s['batch_size']} texts x {s['max_length']} tokens (every text is longer, so "
        "every batch is full), fp32, AdamW (fused) with linear warmup and gradient clipping, seed "
        f"{s['seed']}, one process, {results['threads']} torch threads, by (a) `toolkit finetune` "
        f"tracking the attention every {s['track_every']} steps, (b) `toolkit finetune "
        "--track-every 0`, (c) the transformers `Trainer` (same rows, tokenization, collator and "
        "settings). Timed: from the end of the first update (a warm-up) to the end of the last, "
        "tracking and its last snapshot write included, the final evaluation excluded; samples/s "
        "over the updates in between. Routes run in turn, the order rotated each round; medians of "
        f"{len(results['samples_per_second']['trainer'])} rounds.",
        "",
        "| (a) tracking samples/s | (b) no tracking samples/s | (c) Trainer samples/s | "
        "(a) / (b) (target >= 0.97) | (b) / (c) (target >= 1.0) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {tracking:.2f} | {untracked:.2f} | {trainer:.2f} | {tracking / untracked:.3f} | "
        f"{untracked / trainer:.3f} |",
    ]


SECTIONS = {
    "extraction": (bench_extraction, extraction_table),
    "compare": (bench_compare, compare_table),
    "finetune": (bench_finetune, finetune_table),
}


def gpu_section() -> list[str]:
    """4. GPU: the results of bench/gpu/throughput.py, which runs on a GPU machine only."""
    lines = ["## 4. GPU: bf16 fine-tuning throughput and model FLOP utilisation", ""]
    gpu_file = HERE / "gpu" / "results.json"
    if not gpu_file.is_file():
        return lines + [
            "Not measured yet: `bench/gpu/throughput.py` runs on a machine with a CUDA GPU, and "
            "none was lent to the sessions so far.",
            "",
        ]
    g = json.loads(gpu_file.read_text())
    mfu = f"{100 * g['mfu']:.1f}%" if g["mfu"] is not None else "n/a (peak unknown)"
    return lines + [
        f"{g['device']}, torch {g['torch']}: bert-base shape ({g['parameters'] / 1e6:.0f}M), "
        f"batch {g['batch_size']} x {g['max_length']} tokens, bf16, tracking every "
        f"{g['track_every']} steps, {g['steps']} steps.",
        "",
        "| samples/s | tokens/s | model TFLOP/s (6 x params x tokens) | peak bf16 TFLOP/s | MFU |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {g['samples_per_second']:.1f} | {g['tokens_per_second']:.0f} | "
        f"{g['model_tflops_per_second']:.1f} | {g['peak_bf16_tflops']} | {mfu} |",
        "",
    ]


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
    parser.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="extraction: only this model shape (repeatable); other rows are kept",
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results_file = HERE / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.render and not args.shape:
        results["machine"] = machine()
    for name in [] if args.render else args.only or SECTIONS:
        run, _ = SECTIONS[name]
        log(f"section {name}")
        if name == "extraction" and args.shape:  # rows measured apart carry their own date
            rows = run(args.repeat, args.shape)
            baseline, _ = rows.pop("interpreter_baseline"), rows.pop("help")
            for shape in args.shape:
                rows[shape].update(date=machine()["date"], interpreter_baseline=baseline)
            results[name] = {**results.get(name, {}), **rows}
        else:
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
    lines += gpu_section()
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
