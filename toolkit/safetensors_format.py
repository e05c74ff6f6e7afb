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
import struct
from collections.abc import Iterable
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


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor as float32 (floating dtypes) or its own dtype, read with one positioned read."""
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
    if info.dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def write_stream(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    arrays: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str],
) -> None:
    """Write float32 tensors whose shapes are known up front, as `arrays` yields them.

    `arrays` must yield the names of `shapes` in the same order; only one array is held at a time.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for (name, array), expected in zip(arrays, shapes.items(), strict=True):
            if name != expected[0] or tuple(array.shape) != expected[1]:
                raise ValueError(
                    f"stream out of order: got {name} {array.shape}, expected {expected}"
                )
            handle.write(np.ascontiguousarray(array, dtype="<f4").data)
