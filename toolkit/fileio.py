"""Atomic file writes: a reader never sees a half-written output, even after a kill.

Everything written lands with the permissions a plain open() or mkdir would give under the
user's umask (0644 and 0755 under umask 022), whatever the writer used for its temporary file:
mkstemp, mkdtemp and safetensors all make owner-only files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import ToolkitError


def check_output_path(path: str | Path) -> Path:
    """Fail before any work when `path`'s folder does not exist or `path` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ToolkitError(f"output path {path} is a directory: give a file name")
    if not path.parent.is_dir():
        raise ToolkitError(
            f"output folder {path.parent} does not exist: create it first or choose another path"
        )
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        give_plain_permissions(tmp)  # after the write: a writer may have replaced the file
        # rename is atomic: after a kill the old file or the new one is there, never a part
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: str | Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` if the block succeeds."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        give_plain_permissions(tmp)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def give_plain_permissions(path: str | Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode open() or mkdir would have."""
    path, umask = Path(path), _umask()
    if path.is_file():
        path.chmod(0o666 & ~umask)
        return
    for folder, _, files in os.walk(path):
        Path(folder).chmod(0o777 & ~umask)
        for name in files:
            (Path(folder) / name).chmod(0o666 & ~umask)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads write too)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)  # elsewhere the only way to read it is to set it, briefly
    os.umask(umask)
    return umask
