"""Copying a transposed array view into a contiguous array: the per-head layout of extract.

A Linear weight [out, in] read as the x @ W matrix and split per head is a view whose
second-to-last axis runs along the weight's rows: consecutive destination elements lie a whole
row apart in the source. `np.copyto` walks such a view in the destination's order, one element
per source row. Once rows are 4 KB or more apart (a 2048-wide bf16 or 1024-wide float32 weight)
every read lands on another page and, for power-of-two widths, in the same cache set: 4-9 ns per
element here. Copying `_BLOCK` destination columns at a time reads `_BLOCK` source rows side by
side instead, each one contiguously: 1.3-2.3 ns, in numpy alone. Narrower rows stay cached and
numpy's own copy is as fast or faster (0.4-1.8 ns), so they keep it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

_BLOCK = 8  # destination columns (source rows) per copy: 8 rows streamed at once stay in cache
_MIN_ROW_BYTES = 4096  # source rows at least this far apart are copied in blocks


def copy_into(destination: np.ndarray, source: np.ndarray) -> None:
    """destination[...] = source (as `np.copyto`). A transposed view (source.strides[-2] is one
    element, its rows at least `_MIN_ROW_BYTES` apart) of destination's shape and dtype, into a
    C-contiguous destination, is copied in column blocks."""
    item = source.itemsize
    if (
        destination.shape != source.shape
        or destination.dtype != source.dtype
        or source.ndim < 2
        or source.shape[-2] < 2
        or source.strides[-2] != item
        or abs(source.strides[-1]) < _MIN_ROW_BYTES
        or not destination.flags.c_contiguous
    ):
        np.copyto(destination, source)
        return
    columns = source.shape[-1]
    if _collapses(source.shape[:-1], source.strides[:-1]):
        # One matrix: the leading axes and the rows merge (Llama's o_proj weight as w0, whose
        # per-head rows are consecutive elements of one source row).
        rows = math.prod(source.shape[:-1])
        matrix = np.lib.stride_tricks.as_strided(
            source, shape=(rows, columns), strides=(item, source.strides[-1]), writeable=False
        )
        _copy_blocks(destination.reshape(rows, columns), matrix)
    else:  # one matrix per leading index (per head: its rows of a q_proj weight as its wq)
        for index in np.ndindex(*source.shape[:-2]):
            _copy_blocks(destination[index], source[index])


def _collapses(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether the axes of `shape` / `strides` merge into one evenly strided axis."""
    kept = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    return all(s == s_next * n_next for (_, s), (n_next, s_next) in itertools.pairwise(kept))


def _copy_blocks(destination: np.ndarray, source: np.ndarray) -> None:
    """destination[...] = source for 2-D arrays, `_BLOCK` columns at a time."""
    for start in range(0, source.shape[1], _BLOCK):
        destination[:, start : start + _BLOCK] = source[:, start : start + _BLOCK]
