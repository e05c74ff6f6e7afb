"""extract's per-head layout copy, `toolkit.layout.copy_into` against `np.copyto`, per weight shape.

python bench/routes/layout_profile.py    # a markdown table: ns per element, best of 7, one thread

Each row copies one attention weight of a real model's shape, in its usual storage, into the
standard layout: wq [h, d_model, d_head] from a q_proj weight [h * d_head, d_model] (one
transposed matrix per head) and w0 [h, d_head, d_model] from an o_proj weight [d_model, h * d_head]
(one full transpose). Both routes write the same bytes (checked on every row).
"""

from __future__ import annotations

import time

import numpy as np

from toolkit.layout import copy_into

SHAPES = [  # name, heads, d_head, d_model, storage
    ("SmolLM2-135M", 9, 64, 576, np.uint16),
    ("bert-base", 12, 64, 768, np.float32),
    ("Qwen2.5-0.5B", 14, 64, 896, np.uint16),
    ("bert-large", 16, 64, 1024, np.float32),
    ("gpt2-large shape", 20, 64, 1280, np.float32),
    ("Qwen2.5-1.5B", 12, 128, 1536, np.uint16),
    ("Llama-3.2-1B", 32, 64, 2048, np.uint16),
    ("2304 wide (Gemma-2-2B's d_model)", 9, 256, 2304, np.uint16),
    ("Llama-3.2-3B", 24, 128, 3072, np.uint16),
    ("Qwen2-7B", 28, 128, 3584, np.uint16),
    ("Llama-3.1-8B", 32, 128, 4096, np.uint16),
]
STORAGE = {np.uint16: "bf16", np.float32: "float32"}


def best_ns_per_element(copy, destination: np.ndarray, source: np.ndarray) -> float:
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        copy(destination, source)
        best = min(best, time.perf_counter() - start)
    return best / source.size * 1e9


def main() -> None:
    rng = np.random.default_rng(0)
    print("| model | storage | row bytes | weight | np.copyto ns/el | copy_into ns/el | speed-up |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for name, heads, d_head, d_model, storage in SHAPES:
        weight = rng.integers(0, 2**16, size=(heads * d_head, d_model)).astype(storage)
        views = {
            "wq": weight.reshape(heads, d_head, d_model).transpose(0, 2, 1),
            "w0": weight.reshape(d_model, heads * d_head).T.reshape(heads, d_head, d_model),
        }
        for role, view in views.items():
            plain, blocked = np.empty(view.shape, storage), np.empty(view.shape, storage)
            numpy_ns = best_ns_per_element(np.copyto, plain, view)
            toolkit_ns = best_ns_per_element(copy_into, blocked, view)
            assert plain.tobytes() == blocked.tobytes()
            row_bytes = abs(view.strides[-1])
            print(
                f"| {name} | {STORAGE[storage]} | {row_bytes} | {role} | {numpy_ns:.2f} | "
                f"{toolkit_ns:.2f} | {numpy_ns / toolkit_ns:.2f}x |"
            )


if __name__ == "__main__":
    main()
