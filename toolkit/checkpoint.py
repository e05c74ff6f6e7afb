"""Lazy, by-name reading of a checkpoint's tensors, without building the model.

Safetensors files (one, or sharded with an index) have their headers read once; a tensor's bytes
are read only when asked for (`toolkit.safetensors_format`). Pickled `pytorch_model.bin` files are
refused unless the caller allows them, and are then loaded with `torch.load(weights_only=True)`.
An in-memory state dict (a model being trained) can stand in for the files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError, first_line
from toolkit.safetensors_format import (
    HALF_DTYPES,
    FormatError,
    TensorInfo,
    mapped_tensor,
    read_header,
    read_tensor,
)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """Tensor names, shapes and float32 numpy values of the weights in one model folder or file."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        self._state_dict: dict | None = None
        self._frozen = False
        self._located: dict[str, tuple[Path, TensorInfo]] = {}
        self.metadata: dict[str, str] = {}
        if self.path.is_file():
            self._open_safetensors([self.path])
            return
        index = self.path / SAFETENSORS_INDEX
        single = self.path / SAFETENSORS_FILE
        if index.is_file():
            weight_map = _read_index(index)
            self._open_safetensors([index.parent / f for f in sorted(set(weight_map.values()))])
            missing = sorted(set(weight_map) - set(self._located))
            if missing:
                raise ToolkitError(
                    f"the index lists {len(missing)} tensors that its shards lack "
                    f"(first: {missing[0]}): the checkpoint is incomplete"
                )
        elif single.is_file():
            self._open_safetensors([single])
        elif (self.path / PICKLE_FILE).is_file() or (self.path / PICKLE_INDEX).is_file():
            if not allow_pickle:
                raise ToolkitError(
                    f"{self.path} has only pickled weights ({PICKLE_FILE}), which can run code "
                    "when loaded: convert them to safetensors, or pass --allow-pickle to load them "
                    "with torch.load(weights_only=True)"
                )
            self._open_pickle()
        else:
            raise ToolkitError(
                f"no weights in {self.path}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
                "(as written by save_pretrained)"
            )

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, label: str = "<in-memory model>", frozen: bool = False
    ) -> Checkpoint:
        """Wrap an in-memory state dict (name -> torch tensor), e.g. a model being trained.
        `frozen`: its tensors are private copies nothing changes (a tracking snapshot's), so
        `get` may return views of them instead of copies."""
        checkpoint = cls.__new__(cls)
        checkpoint.path = Path(label)
        checkpoint._state_dict = state_dict
        checkpoint._frozen = frozen
        checkpoint._located = {}
        checkpoint.metadata = {}
        return checkpoint

    def _open_safetensors(self, files: list[Path]) -> None:
        for file in files:
            if not file.is_file():
                raise ToolkitError(
                    f"shard {file} listed in the index is missing: download it again"
                )
            try:
                header = read_header(file)
            except (FormatError, OSError) as err:
                raise ToolkitError(
                    f"{file} is not a readable safetensors file ({err}): it is corrupt or "
                    "truncated; write or download it again"
                ) from None
            self.metadata = self.metadata or header.metadata
            for name, info in header.tensors.items():
                self._located[name] = (file, info)

    def _open_pickle(self) -> None:
        import torch

        index = self.path / PICKLE_INDEX
        if index.is_file():
            files = [self.path / f for f in sorted(set(_read_index(index).values()))]
        else:
            files = [self.path / PICKLE_FILE]
        state: dict = {}
        for file in files:
            try:
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except Exception as err:
                raise ToolkitError(f"cannot load {file} ({first_line(err)})") from None
        self._state_dict = state

    def names(self) -> list[str]:
        return list(self._state_dict if self._state_dict is not None else self._located)

    def __contains__(self, name: str) -> bool:
        return name in (self._state_dict if self._state_dict is not None else self._located)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._state_dict is not None:
            return tuple(self._state_dict[name].shape)
        return self._located[name][1].shape

    def num_parameters(self) -> int:
        """Total number of values in the checkpoint, read from headers only."""
        return sum(math.prod(self.shape(name)) for name in self.names())

    def storage_dtype(self, name: str) -> str:
        """The safetensors dtype a tensor is stored in ("F32", "BF16", "F16", ...); "F32" for
        weights loaded from pickled files (always read as float32)."""
        if self._state_dict is not None:
            return "F32"
        return self._located[name][1].dtype

    def get(self, name: str, half: bool = False, mapped: bool = False) -> np.ndarray:
        """One tensor as a float32 numpy array that owns its memory (from a frozen state dict,
        possibly a view of its tensor). `half`: a BF16 or F16 tensor as stored instead (raw bits
        as uint16 for BF16, float16 for F16), bit-exact. `mapped`: a tensor of a file that is
        already in that form comes as a read-only view of the file's mapped pages (see
        `safetensors_format.mapped_tensor`), for a reader that only copies it once."""
        if name not in self:
            raise ToolkitError(
                f"tensor {name} is missing from {self.path}: the checkpoint is incomplete"
            )
        if self._state_dict is not None:
            # A copy, never a view, unless frozen: the live parameters of a model in training
            # change in place. numpy copies in one thread; torch's copy waits for its worker
            # threads, which on a busy machine costs a scheduler time slice per tensor.
            array = self._state_dict[name].detach().float().cpu().numpy()
            return array if self._frozen else np.array(array)
        file, info = self._located[name]
        try:
            as_stored = info.dtype == "F32" or (half and info.dtype in HALF_DTYPES)
            if mapped and as_stored:
                return mapped_tensor(file, info)
            if half and info.dtype in HALF_DTYPES:
                return read_tensor(file, info, widen=False)
            return read_tensor(file, info).astype(np.float32, copy=False)
        except (FormatError, OSError) as err:
            raise ToolkitError(f"cannot read {name} from {file} ({err})") from None


def _read_index(index: Path) -> dict[str, str]:
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise ToolkitError(
            f"{index} is not a valid shard index ({err}): download it again"
        ) from None
