"""GGUF files (llama.cpp's format) as a checkpoint: header and tensor index parsed once, one
tensor's bytes read and dequantized (with the `gguf` package) only when asked for.

The header is parsed here rather than with `gguf.GGUFReader`, which turns every entry of the
tokenizer's vocabulary and merges into numpy views (about 20 s for SmolLM2 on this machine,
against a fraction of a second for the walk below).

Tensors are offered under the names transformers gives them (`layers.{l}.self_attn.q_proj.weight`,
[out, in]), so the Llama adapter reads a GGUF file like a `save_pretrained` folder. llama.cpp's
converter permutes the rows of q and k of each head from transformers' rotary layout (pairs
(j, j + d_head/2)) into its interleaved one (pairs (2j, 2j+1)); `get` undoes that permutation.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
# GGUF name -> transformers name of the attention projections, per layer
_ATTENTION = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
# scalar value types: struct format by GGUF value type id
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS.update({11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]  # numpy order ([out, in] for a weight)
    qtype: int  # ggml quantization type
    start: int  # absolute byte offset
    nbytes: int


class GGUFCheckpoint:
    """The `Checkpoint` interface (names, shape, get, ...) over one GGUF file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata, self._tensors = read_index(self.path)
        architecture = self.metadata.get("general.architecture")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ToolkitError(
                f"{self.path} holds a '{architecture}' model: GGUF files are supported for "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} only"
            )
        self._names = {_transformers_name(name): name for name in self._tensors}

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[self._names[name]].shape

    def num_parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self._tensors.values())

    def storage_dtype(self, name: str) -> str:
        """Always "F32": GGUF tensors (quantized or not) are dequantized to float32."""
        return "F32"

    def get(self, name: str, half: bool = False) -> np.ndarray:
        """One tensor, dequantized to float32, with llama.cpp's q/k row permutation undone
        (`half` is accepted for the Checkpoint interface: the result is float32)."""
        if name not in self:
            raise ToolkitError(f"tensor {name} is missing from {self.path}: the file is incomplete")
        array = self._dequantize(self._tensors[self._names[name]])
        meta = self.metadata
        if name.endswith("q_proj.weight"):
            return unpermute_rotary_rows(array, meta["llama.attention.head_count"])
        if name.endswith("k_proj.weight"):
            heads = meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])
            return unpermute_rotary_rows(array, heads)
        return array

    def _dequantize(self, tensor: _Tensor) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.empty(tensor.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(tensor.start)
            if handle.readinto(memoryview(raw)) != tensor.nbytes:
                raise ToolkitError(f"{self.path} is truncated: download it again")
        rows = raw.reshape(*tensor.shape[:-1], -1)  # [..., bytes of one row]
        values = dequantize(rows, GGMLQuantizationType(tensor.qtype))
        return np.ascontiguousarray(values.reshape(tensor.shape), dtype=np.float32)


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of a q or k weight [n_heads * d_head, d_model].

    The converter reshapes each head's rows as (2, d_head/2) and swaps the axes, so that the
    rotary pair (j, j + d_head/2) becomes rows (2j, 2j+1). Reading each head's rows as
    (d_head/2, 2) and swapping back restores transformers' order."""
    rows = weight.shape[0]
    d_head = rows // n_heads
    per_head = weight.reshape(n_heads, d_head // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(weight.shape))


def gguf_config(path: Path) -> dict:
    """A transformers-style config.json dict of a Llama GGUF file, from its header."""
    meta = GGUFCheckpoint(path).metadata
    arch = meta["general.architecture"]
    n_heads = meta[f"{arch}.attention.head_count"]
    d_model = meta[f"{arch}.embedding_length"]
    rope = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 1e4))}
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        rope = {**rope, "rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    return {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d_model,
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", d_model // n_heads),
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        "rms_norm_eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens", 0)),
        "rope_parameters": rope,
        "attention_bias": False,
    }


def _transformers_name(gguf_name: str) -> str:
    """blk.{l}.attn_q.weight -> layers.{l}.self_attn.q_proj.weight; other names unchanged."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _ATTENTION:
        return f"layers.{parts[1]}.self_attn.{_ATTENTION[parts[2]]}.{parts[3]}"
    return gguf_name


def read_index(path: Path) -> tuple[dict, dict[str, _Tensor]]:
    """The key/value metadata (arrays of more than 64 items as their length) and the tensor
    index of a GGUF file (version 2 or 3); parsed once per file version."""
    stat = Path(path).stat()
    return _read_index(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_index(path: str, mtime_ns: int, size: int) -> tuple[dict, dict[str, _Tensor]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with (
            open(path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            reader = _Reader(m)
            if m[:4] != GGUF_MAGIC:
                raise ValueError("no GGUF magic number")
            reader.offset = 4
            version, n_tensors, n_fields = (
                reader.scalar("<I"),
                reader.scalar("<Q"),
                reader.scalar("<Q"),
            )
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            metadata = {}
            for _ in range(n_fields):
                key = reader.string()
                metadata[key] = reader.value(reader.scalar("<I"))
            infos = []
            for _ in range(n_tensors):
                name = reader.string()
                dims = [reader.scalar("<Q") for _ in range(reader.scalar("<I"))]
                qtype, offset = reader.scalar("<I"), reader.scalar("<Q")
                infos.append((name, tuple(reversed(dims)), qtype, offset))
            alignment = metadata.get("general.alignment", 32)
            data_start = -(-reader.offset // alignment) * alignment
            size = len(m)
    except (ValueError, struct.error, OSError) as err:
        raise ToolkitError(
            f"{path} is not a readable GGUF file ({err}): download it again"
        ) from None
    tensors = {}
    for name, shape, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        nbytes = int(np.prod(shape)) // block * type_size
        if data_start + offset + nbytes > size:
            raise ToolkitError(f"{path} is truncated ({name} lies past its end): download it again")
        tensors[name] = _Tensor(shape, qtype, data_start + offset, nbytes)
    return metadata, tensors


class _Reader:
    """Little-endian values read in sequence from a buffer."""

    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        text = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        return text.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS and count > 64:  # skip big numeric arrays (token scores)
                self.offset += count * struct.calcsize(_SCALARS[item_kind])
                return count
            if item_kind == _STRING and count > 64:  # skip the vocabulary and merges unread
                for _ in range(count):
                    self.offset += 8 + struct.unpack_from("<Q", self.buffer, self.offset)[0]
                return count
            items = [self.value(item_kind) for _ in range(count)]
            return items if count <= 64 else count
        return self.scalar(_SCALARS[kind])
