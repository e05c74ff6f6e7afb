"""GGUF files (llama.cpp's format) as a checkpoint: header and tensor index parsed once, one
tensor's bytes read and dequantized (with the `gguf` package) only when asked for.

The header is parsed here rather than with `gguf.GGUFReader`, which turns every entry of the
tokenizer's vocabulary and merges into numpy views (about 20 s for SmolLM2 on this machine,
against a fraction of a second for the walk below).

Tensors are offered under the names transformers gives them (`model.layers.{l}.self_attn.
q_proj.weight`, [out, in]), found through the `gguf` package's own name tables (MODEL_TENSORS,
TensorNameMap), so a family adapter reads a GGUF file like a `save_pretrained` folder. For the
llama architecture, llama.cpp's converter permutes the rows of q and k of each head from
transformers' rotary layout (pairs (j, j + d_head/2)) into its interleaved one (pairs
(2j, 2j+1)); `get` undoes that permutation. Other architectures are written unpermuted.
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
# Rotary scalings stored as tensors, which the config carries (`gguf_config`), not the model:
# Llama 3's per-frequency factors, and Phi-3 128k's LongRoPE factors
ROPE_FREQS = "rope_freqs.weight"
LONGROPE = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
ROPE_TENSORS = frozenset({ROPE_FREQS, *LONGROPE.values()})


@dataclass(frozen=True)
class GGUFArchitecture:
    """What a GGUF `general.architecture` becomes in transformers."""

    model_type: str
    model_class: str  # the causal LM class, config.json's `architectures`
    rotary_rows_permuted: bool = False  # llama.cpp's converter permutes q/k rows (llama only)
    # llama.cpp's converter writes Gemma's RMSNorm weights plus 1 (its norm scales by the weight,
    # Gemma's by 1 + weight); transformers holds them without
    norm_offset: float = 0.0
    # AutoTokenizer's `tokenizer_type`, where transformers' GGUF config reader does not know the
    # architecture (and so cannot pick the tokenizer class from the file itself)
    tokenizer_type: str | None = None


ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", rotary_rows_permuted=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM"),
    "gemma": GGUFArchitecture("gemma", "GemmaForCausalLM", norm_offset=1.0, tokenizer_type="gemma"),
    "gemma2": GGUFArchitecture("gemma2", "Gemma2ForCausalLM", norm_offset=1.0),
    "phi3": GGUFArchitecture("phi3", "Phi3ForCausalLM"),
}
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
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ToolkitError(
                f"{self.path} holds a '{self.architecture}' model: GGUF files are supported for "
                f"{', '.join(ARCHITECTURES)} only"
            )
        unreadable = sorted({t.qtype for t in self._tensors.values()} - _dequantizable_types())
        if unreadable:
            raise ToolkitError(
                f"{self.path} stores tensors as {_type_name(unreadable[0])}, which the gguf "
                "package cannot dequantize: convert the file to another type (e.g. Q8_0, F16)"
            )
        n_layers = self.metadata.get(f"{self.architecture}.block_count", 0)
        to_transformers = transformers_names(self.architecture, n_layers)
        self._names = {_renamed(name, to_transformers): name for name in self._tensors}

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

    def get(self, name: str, half: bool = False, mapped: bool = False) -> np.ndarray:
        """One tensor, dequantized to float32, as transformers holds it: llama.cpp's q/k row
        permutation and Gemma's norm offset undone (`half` is accepted for the Checkpoint
        interface: the result is float32, and `mapped` too: a dequantized tensor is a new array)."""
        if name not in self:
            raise ToolkitError(f"tensor {name} is missing from {self.path}: the file is incomplete")
        gguf_name = self._names[name]
        array = self._dequantize(self._tensors[gguf_name])
        architecture = ARCHITECTURES[self.architecture]
        if architecture.norm_offset and gguf_name.endswith("norm.weight"):
            return array - np.float32(architecture.norm_offset)
        if not architecture.rotary_rows_permuted:
            return array
        heads = self.metadata[f"{self.architecture}.attention.head_count"]
        if gguf_name.endswith("attn_q.weight"):
            return unpermute_rotary_rows(array, heads)
        if gguf_name.endswith("attn_k.weight"):
            kv_heads = self.metadata.get(f"{self.architecture}.attention.head_count_kv", heads)
            return unpermute_rotary_rows(array, kv_heads)
        return array

    def _dequantize(self, tensor: _Tensor) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        kind = GGMLQuantizationType(tensor.qtype)

        raw = np.empty(tensor.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(tensor.start)
            if handle.readinto(memoryview(raw)) != tensor.nbytes:
                raise ToolkitError(f"{self.path} is truncated: download it again")
        rows = raw.reshape(*tensor.shape[:-1], -1)  # [..., bytes of one row]
        values = dequantize(rows, kind)
        return np.ascontiguousarray(values.reshape(tensor.shape), dtype=np.float32)


@functools.cache
def _dequantizable_types() -> frozenset[int]:
    """The ggml types the installed gguf package dequantizes (tried on one zero block each)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    readable = set()
    for kind, (_, type_size) in GGML_QUANT_SIZES.items():
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), kind)
        except NotImplementedError:
            continue
        readable.add(int(kind))
    return frozenset(readable)


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"ggml type {qtype}"


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
    """A transformers-style config.json dict of a GGUF file, from its header (llama.cpp's keys,
    `{architecture}.embedding_length` and so on, which all supported architectures share)."""
    checkpoint = GGUFCheckpoint(path)
    meta, arch = checkpoint.metadata, checkpoint.architecture
    n_heads = meta[f"{arch}.attention.head_count"]
    d_model = meta[f"{arch}.embedding_length"]
    rope = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 1e4))}
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        rope = {**rope, "rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    head_dim = meta.get(f"{arch}.attention.key_length", d_model // n_heads)
    if ROPE_FREQS in checkpoint:  # Llama 3.1 and later: the rotary scaling as a tensor
        rope = llama3_rope_parameters(
            checkpoint.get(ROPE_FREQS), rope["rope_theta"], head_dim, f"{path}'s {ROPE_FREQS}"
        )
    if any(name in checkpoint for name in LONGROPE.values()):
        rope = _longrope_parameters(checkpoint, rope["rope_theta"])
    config = {
        "model_type": ARCHITECTURES[arch].model_type,
        "architectures": [ARCHITECTURES[arch].model_class],
        "hidden_size": d_model,
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        "rms_norm_eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens", 0)),
        "rope_parameters": rope,
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in checkpoint._tensors,
        # the tokenizer's ids where the file has one, never a config class's default (Phi-3's
        # 32000, outside a smaller vocabulary); no padding id: it would freeze that embedding
        # row in training, and a batch's padding is the tokenizer's business
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": None,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in checkpoint._tensors
    if rope["rope_type"] == "longrope":  # Phi3Config keeps it beside the rope parameters too
        config["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if arch == "gemma2":
        # llama.cpp and Gemma2Config: the window on even layers only
        config["layer_types"] = [
            "full_attention" if layer % 2 else "sliding_attention"
            for layer in range(config["num_hidden_layers"])
        ]
        # The header has no query_pre_attn_scalar: llama.cpp scales the queries by
        # 1/sqrt(head_dim), by 1/sqrt(d_model / n_heads) for the 27B (its 46 layers), which is
        # the scalar of every Gemma 2 release (256, 256, 144)
        n_layers = config["num_hidden_layers"]
        config["query_pre_attn_scalar"] = (
            d_model // n_heads if n_layers == 46 else config["head_dim"]
        )
    optional = {  # llama.cpp key -> transformers key, where the file states it
        "attention.sliding_window": "sliding_window",
        "attn_logit_softcapping": "attn_logit_softcapping",
        "final_logit_softcapping": "final_logit_softcapping",
    }
    for key, name in optional.items():
        if f"{arch}.{key}" in meta:
            config[name] = meta[f"{arch}.{key}"]
    return config


def _longrope_parameters(checkpoint: GGUFCheckpoint, theta: float) -> dict:
    """Phi-3 128k's LongRoPE as llama.cpp's converter writes it: the long and short factor
    lists as two tensors, the pretraining context and attention factor as header keys;
    transformers' `longrope` parameters are the same numbers."""
    arch, path = checkpoint.architecture, checkpoint.path
    if arch != "phi3":
        raise ToolkitError(f"{path} holds LongRoPE factors, which a {arch} model has no place for")
    context_key = f"{arch}.rope.scaling.original_context_length"
    original = checkpoint.metadata.get(context_key)
    lacking = [name for name in LONGROPE.values() if name not in checkpoint]
    if lacking or original is None:
        raise ToolkitError(f"{path} has LongRoPE factors but no {(lacking or [context_key])[0]}")
    parameters = {"rope_type": "longrope", "rope_theta": theta}
    for key, name in LONGROPE.items():
        # each float32 factor as its shortest decimal (1.2, not 1.2000000476837158), which
        # rounds back to the same float32 when transformers builds its tensor
        parameters[key] = [float(str(value)) for value in checkpoint.get(name).reshape(-1)]
    parameters["original_max_position_embeddings"] = int(original)
    # the ratio transformers takes when no factor is given, stated so that it does not warn
    context = checkpoint.metadata.get(f"{arch}.context_length")
    if context:
        parameters["factor"] = context / int(original)
    attention_factor = checkpoint.metadata.get(f"{arch}.rope.scaling.attn_factor")
    if attention_factor is not None:
        parameters["attention_factor"] = float(attention_factor)
    return parameters


def llama3_rope_parameters(
    freq_factors: np.ndarray, theta: float, head_dim: int, what: str
) -> dict:
    """transformers' rope parameters ('llama3') of the `rope_freqs` tensor llama.cpp's converter
    writes in place of Llama 3's rope_scaling: the factor each inverse frequency is divided by,
    1 below the high-frequency wavelength C/high, `factor` above C/low, and between them
    1 / ((1 - s)/factor + s) with s = (C/wavelength - low)/(high - low).

    That s is linear in 1/wavelength, so the factors of the smoothly scaled dimensions give its
    slope and intercept by a least-squares line; with low = 1 (every Llama 3 release's value)
    they fix C (original_max_position_embeddings) and high. The parameters are kept only if
    the rule rebuilds every factor of the file; otherwise the file is refused (`what` names
    the tensor in that line)."""
    factors = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    refusal = f"{what} is not Llama 3's rotary scaling, the only one read from that tensor"
    if factors.shape != inv_freq.shape or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise ToolkitError(f"{refusal} ({factors.size} factors for {inv_freq.size} frequencies)")
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):  # no scaling at all
        return {"rope_type": "default", "rope_theta": theta}
    wavelength = 2 * np.pi / inv_freq
    smooth = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if smooth.sum() < 2:
        raise ToolkitError(
            f"{refusal}: fewer than two of its factors lie between 1 and {factor:g}, too few to "
            "recover where the scaling starts and ends"
        )
    share = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)  # s of each smooth dimension
    slope, intercept = np.polyfit(1 / wavelength[smooth], share, 1)
    original, high = (-slope / intercept, 1 - 1 / intercept) if intercept < 0 else (0.0, 0.0)
    if abs(original - round(original)) < 1e-3 * original:  # a context length: an integer
        original = round(original)
    if abs(high - round(high, 3)) < 1e-4 * high:  # the float32 factors' rounding, not a choice
        high = round(high, 3)
    parameters = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(high),
        "original_max_position_embeddings": original,
    }
    if not original > 0 or not np.allclose(
        _llama3_factors(parameters, wavelength), factors, rtol=1e-5
    ):
        raise ToolkitError(f"{refusal}: no low/high frequency bounds rebuild its factors")
    return parameters


def _llama3_factors(parameters: dict, wavelength: np.ndarray) -> np.ndarray:
    """The factors llama.cpp's converter writes for these Llama 3 rope parameters."""
    factor, low, high = (parameters[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = parameters["original_max_position_embeddings"]
    share = (context / wavelength - low) / (high - low)
    between = 1 / ((1 - share) / factor + share)
    return np.where(
        wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, between)
    )


# Where gguf's tables list several transformers-style names for one tensor (q_layernorm is
# Persimmon's, query_key_value Falcon's, up_proj Llama's), the one these architectures use.
_CHOSEN_NAMES = {"attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "attn_qkv": "qkv_proj"}
_CHOSEN_BY_ARCHITECTURE = {"phi3": {"ffn_up": "gate_up_proj"}}


@functools.cache
def transformers_names(architecture: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name (no .weight/.bias) -> transformers' name of the same tensor, from the
    gguf package's tables: of the names TensorNameMap knows for each tensor of the
    architecture, the one transformers' models use ('model.…', or 'lm_head' for the output)."""
    import gguf

    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    tables = gguf.TensorNameMap(arch, 0)  # merges the architecture's own block names
    chosen_names = {**_CHOSEN_NAMES, **_CHOSEN_BY_ARCHITECTURE.get(architecture, {})}
    names = {}
    for tensor in gguf.MODEL_TENSORS[arch]:
        in_block = tensor in tables.block_mappings_cfg
        table = tables.block_mappings_cfg if in_block else tables.mappings_cfg
        gguf_pattern = gguf.TENSOR_NAMES[tensor]
        leaf = chosen_names.get(gguf_pattern.rpartition(".")[2])
        candidates = [c for c in table.get(tensor, ()) if c.startswith(("model.", "lm_head"))]
        chosen = next((c for c in candidates if c.endswith(f".{leaf}")), None) or next(
            iter(candidates), None
        )
        if chosen is None:
            continue
        for layer in range(n_layers) if in_block else [None]:
            names[gguf_pattern.format(bid=layer)] = chosen.format(bid=layer)
    return names


def _renamed(gguf_name: str, to_transformers: dict[str, str]) -> str:
    """blk.{l}.attn_q.weight -> model.layers.{l}.self_attn.q_proj.weight; unknown names kept."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if dot and stem in to_transformers:
        return f"{to_transformers[stem]}.{suffix}"
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
        if qtype not in iter(GGMLQuantizationType):
            raise ToolkitError(
                f"{path} stores {name} as {_type_name(qtype)}, a type the gguf package does "
                "not know: update gguf, or convert the file to another type (e.g. Q8_0, F16)"
            )
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
