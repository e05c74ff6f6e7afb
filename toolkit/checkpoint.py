"""Lazy, by-name reading of a checkpoint's tensors, without building the model.

Safetensors files (one, or sharded with an index) are opened once and tensors are read only when
asked for. Pickled `pytorch_model.bin` files are refused unless the caller allows them, and are
then loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """Tensor names, shapes and float32 numpy values of the weights in one model folder or file."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        if self.path.is_file():
            self._open_safetensors({}, [self.path])
            return
        index = self.path / SAFETENSORS_INDEX
        single = self.path / SAFETENSORS_FILE
        if index.is_file():
            self._open_safetensors(*_read_index(index))
        elif single.is_file():
            self._open_safetensors({}, [single])
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
    def from_state_dict(cls, state_dict: dict, label: str = "<in-memory model>") -> Checkpoint:
        """Wrap an in-memory state dict (name -> torch tensor), e.g. a model being trained."""
        checkpoint = cls.__new__(cls)
        checkpoint.path = Path(label)
        checkpoint._state_dict = state_dict
        checkpoint._handles = {}
        checkpoint._file_of = {}
        return checkpoint

    def _open_safetensors(self, weight_map: dict[str, str], files: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            if not file.is_file():
                raise ToolkitError(
                    f"shard {file} listed in the index is missing: download it again"
                )
            try:
                handle = safe_open(str(file), framework="np")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as err:
                raise ToolkitError(
                    f"{file} is not a readable safetensors file ({_first_line(err)}): it is "
                    "corrupt or truncated; write or download it again"
                ) from None
            self._handles[file] = handle
            for name in names:
                self._file_of[name] = file
        if weight_map:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise ToolkitError(
                    f"the index lists {len(missing)} tensors that its shards lack "
                    f"(first: {missing[0]}): the checkpoint is incomplete"
                )
        self._state_dict = None

    def _open_pickle(self) -> None:
        import torch

        files = (
            [self.path / f for f in sorted(set(_read_index(self.path / PICKLE_INDEX)[0].values()))]
            if (self.path / PICKLE_INDEX).is_file()
            else [self.path / PICKLE_FILE]
        )
        state: dict = {}
        for file in files:
            try:
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except Exception as err:
                raise ToolkitError(f"cannot load {file} ({_first_line(err)})") from None
        self._state_dict = state
        self._handles = {}
        self._file_of = {}

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata of the first file (empty for pickled weights)."""
        for handle in self._handles.values():
            return handle.metadata() or {}
        return {}

    def names(self) -> list[str]:
        if self._state_dict is not None:
            return list(self._state_dict)
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in (self._state_dict if self._state_dict is not None else self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._state_dict is not None:
            return tuple(self._state_dict[name].shape)
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def num_parameters(self) -> int:
        """Total number of values in the checkpoint, read from headers only."""
        return sum(math.prod(self.shape(name)) for name in self.names())

    def get(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array."""
        if name not in self:
            raise ToolkitError(
                f"tensor {name} is missing from {self.path}: the checkpoint is incomplete"
            )
        if self._state_dict is not None:
            return self._state_dict[name].detach().float().cpu().numpy()
        handle = self._handles[self._file_of[name]]
        if handle.get_slice(name).get_dtype() == "BF16":
            # numpy has no bfloat16: widen the raw 16 bits into the top half of a float32.
            return _bf16_to_float32(handle, name)
        try:
            array = handle.get_tensor(name)
        except Exception as err:
            raise ToolkitError(
                f"cannot read {name} from {self._file_of[name]} ({_first_line(err)})"
            ) from None
        return array.astype(np.float32, copy=False)


def _bf16_to_float32(handle, name: str) -> np.ndarray:
    import torch

    sliced = handle.get_slice(name)
    raw = sliced[:]  # with framework="np" BF16 slices come back as uint16 bit patterns
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return torch.as_tensor(raw).float().numpy()


def _read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise ToolkitError(
            f"{index} is not a valid shard index ({err}): download it again"
        ) from None
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    return weight_map, files


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
