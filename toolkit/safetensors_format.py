"""The safetensors file format, read and written without memory maps.

The safetensors library maps files into memory, so every page it reads counts in the process's
resident memory until exit, and writing needs all tensors in memory at once. Inspecting a
checkpoint should cost the attention tensors of one layer at a time, so this module reads a
tensor with one positioned read into a fresh array, and writes a file as a stream of tensors
whose shapes are known up front. The format: an 8-byte little-endian header length N, N bytes of
JSON (name -> dtype, shape, data_offsets; "__metadata__" -> str -> str), then the data.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def mapped_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor as stored (BF16 as uint16 bits), a read-only view of the file's pages mapped
    into memory: no copy, and no fresh memory to fault in. The mapping lasts as long as the
    array (or a view of it) does, so its pages leave the process with it."""
    if info.dtype not in NUMPY_DTYPES:
        raise FormatError(f"dtype {info.dtype} is not supported")
    dtype = np.dtype(NUMPY_DTYPES[info.dtype])
    if info.end == info.start:  # nothing to map
        empty = np.empty(info.shape, dtype=dtype)
        empty.flags.writeable = False
        return empty
    first = info.start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), info.end - first, access=mmap.ACCESS_READ, offset=first)
    count = (info.end - info.start) // dtype.itemsize
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=info.start - first).reshape(
        info.shape
    )


def widened(array: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor as stored in safetensors `dtype` -> float32 (floating dtypes) or as it is."""
    if dtype == "BF16":  # the top half of a float32: one casting shift, no temporary
        return np.left_shift(array, 16, dtype=np.uint32).view(np.float32)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def _header(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], dtype: str, align: int = 8
) -> tuple[np.dtype, dict, bytes]:
    """(storage dtype, header, encoded header) of a file of `shapes`; the header is padded with
    spaces (as safetensors' own writer does) so that the data starts at a multiple of `align`."""
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
    encoded += b" " * (-(8 + len(encoded)) % align)
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


DIRECT_BLOCK = 4096  # direct I/O: file offsets, lengths and buffer addresses multiples of this


class BlockBuffers:
    """Page-aligned buffers for `write_direct`, kept between files: a tracking run writes a
    snapshot every so often, and buffers it touched once cost no page faults the next time."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []

    def take(self, nbytes: int) -> mmap.mmap:
        for index, buffer in enumerate(self._free):
            if len(buffer) >= nbytes:
                return self._free.pop(index)
        if self._free:  # too small for this file's groups: dropped, not kept beside a new one
            self._free.pop().close()
        return mmap.mmap(-1, -(-nbytes // DIRECT_BLOCK) * DIRECT_BLOCK)

    def give(self, buffer: mmap.mmap) -> None:
        self._free.append(buffer)


def write_direct(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    metadata: dict[str, str],
    dtype: str,
    groups: Sequence[Sequence[str]],
    lay_out: Callable[[int, dict[str, np.ndarray]], None],
    threads: int = 1,
    buffers: BlockBuffers | None = None,
) -> bool:
    """Write a file of `shapes` in `dtype` ("F32", "BF16", "F16") with direct I/O: `groups`
    (consecutive runs of the names of `shapes`, in order: a layer's tensors) are laid out by
    `lay_out(group index, views)` (name -> writable array of that tensor's shape and storage
    dtype) into page-aligned buffers, on `threads` threads, and written in file order straight
    from those buffers to the disk. No page cache: nothing is zero-filled or copied by the
    kernel, and the machine's memory holds `threads + 1` groups at most. The header is padded so
    that the data starts on a block; the bytes of a block two groups share are carried from
    one group's buffer into the next. Returns False, having written nothing that counts, where
    the platform or file system has no direct I/O (macOS; some file systems): use `write_mapped`
    there."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    storage, header, encoded = _header(shapes, metadata, dtype, align=DIRECT_BLOCK)
    data_start = 8 + len(encoded)
    ranges = [
        (header[names[0]]["data_offsets"][0], header[names[-1]]["data_offsets"][1])
        for names in groups
    ]
    if [name for names in groups for name in names] != list(shapes) or any(
        end != begin for (_, end), (begin, _) in itertools.pairwise(ranges)
    ):
        raise ValueError("groups must cover the names of shapes, in order")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o666)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    buffers = buffers or BlockBuffers()
    try:
        first = buffers.take(data_start)
        try:
            first[:data_start] = struct.pack("<Q", len(encoded)) + encoded
            try:
                _write_all(fd, memoryview(first)[:data_start], 0)
            except OSError as err:
                if err.errno == errno.EINVAL:  # opened, but direct writes refused
                    return False
                raise
        finally:
            buffers.give(first)

        def lay_group(index: int, buffer: mmap.mmap) -> None:
            group_begin = ranges[index][0]
            lead = group_begin % DIRECT_BLOCK
            data = np.frombuffer(buffer, dtype=np.uint8)
            views = {}
            for name in groups[index]:
                begin, end = header[name]["data_offsets"]
                low = lead + begin - group_begin
                views[name] = data[low : low + end - begin].view(storage).reshape(shapes[name])
            try:
                lay_out(index, views)
            finally:
                del data, views  # the buffer is reused: no view of it may outlive the group

        carry = b""  # the file's bytes from the last block boundary to the next group's start
        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending: deque = deque()
            upcoming = iter(range(len(groups)))

            def submit_next() -> None:
                index = next(upcoming, None)
                if index is not None:
                    begin, end = ranges[index]
                    buffer = buffers.take(begin % DIRECT_BLOCK + end - begin + DIRECT_BLOCK)
                    pending.append((index, buffer, pool.submit(lay_group, index, buffer)))

            for _ in range(threads + 1):
                submit_next()
            while pending:
                index, buffer, laid = pending.popleft()
                try:
                    laid.result()
                    carry = _write_group(fd, buffer, carry, data_start, ranges[index], not pending)
                finally:
                    buffers.give(buffer)
                submit_next()
        if ranges and ranges[-1][1] % DIRECT_BLOCK:  # the last block was written padded
            os.ftruncate(fd, data_start + ranges[-1][1])
    finally:
        os.close(fd)
    return True


def _write_group(
    fd: int, buffer: mmap.mmap, carry: bytes, data_start: int, span: tuple[int, int], last: bool
) -> bytes:
    """Write one laid-out group (its data `span` of the file, laid out in `buffer` after a lead
    of `begin % DIRECT_BLOCK` bytes) up to its last whole block, the previous group's `carry`
    filling the lead; returns the bytes past that block, carried into the next group. The
    `last` group's partial block is zero-padded and written too (the file is cut after)."""
    begin, end = span
    lead = begin % DIRECT_BLOCK
    buffer[:lead] = carry
    filled = lead + end - begin
    whole = filled // DIRECT_BLOCK * DIRECT_BLOCK
    if last and whole < filled:
        whole += DIRECT_BLOCK  # the buffer has a spare block for this
        buffer[filled:whole] = bytes(whole - filled)
    _write_all(fd, memoryview(buffer)[:whole], data_start + begin - lead)
    return buffer[whole:filled]


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):  # a write may stop short of what was asked
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


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
