"""Copying a transposed array view into a contiguous array: the per-head layout of extract.

A Linear weight [out, in] read as the x @ W matrix and split per head is a view whose
second-to-last axis runs along the weight's rows: consecutive destination elements lie a whole
row apart in the source. `np.copyto` walks such a view in the destination's order, one element
per source row. When rows are a multiple of 2 KB apart (a 1024-, 2048- or 4096-wide weight in
bf16 or float32), those rows fall into one or two cache sets, which hold only a few lines each,
and every read misses: 4-9 ns per element here. Copying `_BLOCK` destination columns at a time
reads `_BLOCK` source rows side by side instead, each one contiguously: 0.4-2.1 ns, in numpy
alone (16 columns are 10-40% faster than 8 on most shapes there, bf16 and float32). A
whole-matrix transpose (o_proj as w0) gains the same way from rows over 4 KB apart of any width.
Other views stay cached, and numpy's own copy is as fast or faster there (measured per shape by
bench/routes/layout_profile.py).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

_BLOCK = 16  # destination columns (source rows) per copy: 16 rows streamed at once stay in cache
_SET_ALIASING_BYTES = 2048  # rows a multiple of this apart share cache sets
_FAR_ROW_BYTES = 4096  # a whole-matrix transpose with rows further apart is copied in blocks


def copy_into(destination: np.ndarray, source: np.ndarray) -> None:
    """destination[...] = source (as `np.copyto`). A transposed view (source.strides[-2] is one
    element) of destination's shape and dtype, into a C-contiguous destination, is copied in
    column blocks where that is faster (see the module's docstring)."""
    item = source.itemsize
    if (
        destination.shape != source.shape
        or destination.dtype != source.dtype
        or source.ndim < 2
        or source.shape[-2] < 2
        or source.strides[-2] != item
        or not destination.flags.c_contiguous
    ):
        np.copyto(destination, source)
        return
    columns, row_bytes = source.shape[-1], abs(source.strides[-1])
    aliased = row_bytes % _SET_ALIASING_BYTES == 0
    # One matrix when the leading axes and the rows merge (Llama's o_proj weight as w0, whose
    # per-head rows are consecutive elements of one source row), else one per leading index
    # (per head: its rows of a q_proj weight as its wq).
    whole = _collapses(source.shape[:-1], source.strides[:-1])
    if whole and (aliased or row_bytes > _FAR_ROW_BYTES):
        rows = math.prod(source.shape[:-1])
        matrix = np.lib.stride_tricks.as_strided(
            source, shape=(rows, columns), strides=(item, source.strides[-1]), writeable=False
        )
        _copy_blocks(destination.reshape(rows, columns), matrix)
    elif not whole and aliased:
        for index in np.ndindex(*source.shape[:-2]):
            _copy_blocks(destination[index], source[index])
    else:
        np.copyto(destination, source)


def _collapses(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether the axes of `shape` / `strides` merge into one evenly strided axis."""
    kept = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    return all(s == s_next * n_next for (_, s), (n_next, s_next) in itertools.pairwise(kept))


def _copy_blocks(destination: np.ndarray, source: np.ndarray) -> None:
    """destination[...] = source for 2-D arrays, `_BLOCK` columns at a time."""
    for start in range(0, source.shape[1], _BLOCK):
        destination[:, start : start + _BLOCK] = source[:, start : start + _BLOCK]
