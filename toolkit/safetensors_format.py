"""The safetensors file format, read and written without memory maps.

The safetensors library maps files into memory, so every page it reads counts in the process's
resident memory until exit, and writing needs all tensors in memory at once. Inspecting a
checkpoint should cost the attention tensors of one layer at a time, so this module reads a
tensor with one positioned read into a fresh array, and writes a file as a stream of tensors
whose shapes are known up front. The format: an 8-byte little-endian header length N, N bytes of
JSON (name -> dtype, shape, data_offsets; "__metadata__" -> str -> str), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": np.uint16,  # read as raw bits, widened to float32 by `read_tensor`
}
_MAX_HEADER = 100_000_000


class FormatError(ValueError):
    """The file is not a valid safetensors file (corrupt, truncated, or something else)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and check the header: every tensor's bytes must lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise FormatError("file shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise FormatError(f"header length {length} exceeds the file")
        try:
            raw = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FormatError(f"header is not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise FormatError("header is not a JSON object")
    data_start = 8 + length
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in raw.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"bad header entry for {name}") from None
        if dtype in NUMPY_DTYPES:
            expected = math.prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise FormatError(f"{name}: {end - begin} bytes for shape {list(shape)} {dtype}")
        if not 0 <= begin <= end or data_start + end > size:
            raise FormatError(f"{name} lies past the end of the file (truncated)")
        tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    return Header(tensors, metadata)


# Half-precision storage kept as stored by `read_tensor(..., widen=False)` and written back by
# `write_stream`: BF16 as its raw bits (uint16; numpy has no bfloat16), F16 as float16.
HALF_DTYPES = {"BF16": np.uint16, "F16": np.float16}


def read_tensor(path: Path, info: TensorInfo, widen: bool = True) -> np.ndarray:
    """One tensor as float32 (floating dtypes) or its own dtype, read with one positioned read;
    `widen=False` keeps BF16 (as uint16 bits) and F16 as stored."""
    if info.dtype not in NUMPY_DTYPES:
        raise FormatError(f"dtype {info.dtype} is not supported")
    array = np.empty(info.shape, dtype=NUMPY_DTYPES[info.dtype])
    with open(path, "rb", buffering=0) as handle:
        handle.seek(info.start)
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):  # a raw read may return less than asked for
            count = handle.readinto(view[done:])
            if not count:
                raise FormatError("unexpected end of file")
            done += count
    if not widen and info.dtype in HALF_DTYPES:
        return array
    return widened(array, info.dtype)


def widened(array: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor as stored in safetensors `dtype` -> float32 (floating dtypes) or as it is."""
    if dtype == "BF16":  # the top half of a float32: one casting shift, no temporary
        return np.left_shift(array, 16, dtype=np.uint32).view(np.float32)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def _header(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], dtype: str
) -> tuple[np.dtype, dict, bytes]:
    """(storage dtype, header, encoded header padded to 8 bytes) of a file of `shapes`."""
    storage = np.dtype("<f4") if dtype == "F32" else np.dtype(HALF_DTYPES[dtype]).newbyteorder("<")
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * storage.itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    return storage, header, encoded


def write_mapped(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    metadata: dict[str, str],
    dtype: str,
    fill: Callable[[dict[str, np.ndarray], Callable[[Iterable[str]], None]], None],
) -> None:
    """Write a file of `shapes` in `dtype` ("F32", "BF16", "F16") whose tensors `fill(views,
    release)` lays out in place: the header is written, the file sized and its data
    memory-mapped, and `views` (name -> writable array of that tensor's shape and storage dtype,
    in the file) handed to `fill`, which copies each tensor into its view, from as many threads
    as it likes, and calls `release(names)` for tensors it is done with: their pages leave this
    process (they stay in the page cache, to be written back), so its memory stays about what is
    being laid out. A tensor's layout (a transposing copy) then writes straight into the file's
    pages: no intermediate array, no second copy by write()."""
    import mmap

    storage, header, encoded = _header(shapes, metadata, dtype)
    total = sum(end - begin for begin, end in (header[n]["data_offsets"] for n in shapes))
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        start = handle.tell()
        handle.flush()
        if total:  # reserve the blocks: a full disk fails here, as OSError, not as a SIGBUS later
            os.posix_fallocate(handle.fileno(), start, total)
    if not total:
        return
    with open(path, "r+b") as handle:
        mapped = mmap.mmap(handle.fileno(), start + total)
    page = mmap.PAGESIZE

    def release(names: Iterable[str]) -> None:
        ranges = [header[name]["data_offsets"] for name in names]
        first = start + min(begin for begin, _ in ranges)
        last = start + max(end for _, end in ranges)
        low, high = -(-first // page) * page, last // page * page  # whole pages only
        if high > low:
            mapped.madvise(mmap.MADV_DONTNEED, low, high - low)

    data = np.frombuffer(mapped, dtype=np.uint8, count=total, offset=start)
    try:
        views = {}
        for name, shape in shapes.items():
            begin, end = header[name]["data_offsets"]
            views[name] = data[begin:end].view(storage).reshape(shape)
        fill(views, release)
    finally:
        views = data = None
        try:
            mapped.close()  # the pages stay in the page cache, written back later
        except BufferError:  # a view still held somewhere: unmapped when it is collected
            pass


def write_stream(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    arrays: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str],
    dtype: str = "F32",
) -> None:
    """Write tensors whose shapes are known up front, as `arrays` yields them, in `dtype`
    ("F32", or "BF16"/"F16" given as stored: see HALF_DTYPES).

    `arrays` must yield the names of `shapes` in the same order; only one array is held at a time.
    """
    storage, _, encoded = _header(shapes, metadata, dtype)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for (name, array), expected in zip(arrays, shapes.items(), strict=True):
            if name != expected[0] or tuple(array.shape) != expected[1]:
                raise ValueError(
                    f"stream out of order: got {name} {array.shape}, expected {expected}"
                )
            handle.write(np.ascontiguousarray(array, dtype=storage).data)
