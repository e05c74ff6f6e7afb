"""torch.compile for a training run, compiled once: fixed batch shapes, the config attributes the
forward would set decided before compiling, and a compiler looked for before the run starts.

A compiled step is specialised on what it saw: a batch of another shape, or a config attribute
that the first forward changes (`problem_type`, set by transformers' classifiers), makes the next
step compile again. So with `--compile` every training batch is padded to `--max-length` tokens,
the partial last batch of an epoch is dropped, and the classifier's `problem_type` and the loss
function are decided first; evaluation runs eager (its batches and its no-grad mode would each be
another graph).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

# Why the default is off: on one H200 (bench/gpu/throughput.py, 100 steps of a bert-base shape)
# the compiled run recompiled on each new shape and came out slower than eager.
WHEN_TO_COMPILE = (
    "torch.compile is off: pass --compile for long runs on a GPU, where the one compilation "
    "(about a minute) is paid back"
)


def compiler_missing(device_type: str) -> str | None:
    """What inductor lacks to compile for `device_type` ("cpu" or "cuda"), or None."""
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "the triton package"
    # CPU kernels are C++; triton's launchers on CUDA are C.
    names = ("CXX", "g++", "c++", "clang++") if device_type == "cpu" else ("CC", "gcc", "cc")
    found = [shutil.which(os.environ.get(n, "") if n.isupper() else n) for n in names]
    if not any(found):
        return "a C++ compiler (g++ or clang++)" if device_type == "cpu" else "a C compiler (gcc)"
    return None


def settle_forward_config(model, task: str) -> None:
    """Decide before compiling what a transformers model's first forward would decide, so that
    the compiled step is neither guarded on a value that changes after step 1 nor broken in two:
    a classifier's `problem_type`, and the loss function (looked up, with a logged warning that
    breaks the graph, on every forward of a model whose `loss_type` is not recognised)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    config = inner.config
    if task == "classification" and getattr(config, "problem_type", None) is None:
        # integer class ids (training/data.py): cross-entropy, as the forward would choose
        single = "single_label_classification"
        config.problem_type = "regression" if config.num_labels == 1 else single
    if hasattr(type(inner), "loss_function"):
        inner.loss_function = inner.loss_function  # the same function, looked up once


def dropped_rows(rows: int, batch_size: int) -> int:
    """Rows of the partial last batch that a fixed-shape epoch drops (none if there is only one
    batch: then every step has that one shape anyway)."""
    return rows % batch_size if rows > batch_size else 0


def describe_fixed_shapes(max_length: int, dropped: int) -> str:
    """What compiling once did to the batches, said on the schedule line."""
    dropped_note = (
        f"; the partial last batch of each epoch ({dropped} rows) dropped" if dropped else ""
    )
    return f"torch.compile: batches padded to {max_length} tokens{dropped_note}"
