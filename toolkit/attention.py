"""The standard per-head attention tensors of a checkpoint, read lazily layer by layer.

    >>> import toolkit
    >>> model = toolkit.load_attention("minilm")
    >>> layer = model.layer(0)
    >>> layer.wq.shape            # [n_heads, d_model, d_head]
    (12, 384, 32)

Arrays are float32 numpy; `AttentionLayer.as_torch()` gives torch tensors sharing the memory.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.checkpoint import Checkpoint
from toolkit.errors import ToolkitError
from toolkit.families import (
    Dimensions,
    Family,
    family_by_name,
    family_for_checkpoint,
    family_for_config,
    is_registered,
)
from toolkit.safetensors_format import BlockBuffers, widened
from toolkit.sources import ModelSource, resolve_source

WEIGHT_ROLES = ("wq", "wk", "wv", "w0")
BIAS_ROLES = ("bq", "bk", "bv", "b0")
ROLES = WEIGHT_ROLES + BIAS_ROLES
STANDARD_FORMAT = "toolkit-attention/1"


def standard_name(layer: int, role: str) -> str:
    """The name of one standard tensor in a standard-format file: `layers.{layer}.{role}`."""
    return f"layers.{layer}.{role}"


def parse_standard_name(name: str) -> tuple[int, str] | None:
    """(layer, role) of a standard tensor name; None for any other name."""
    prefix, _, rest = name.partition(".")
    layer, _, role = rest.partition(".")
    if prefix != "layers" or not layer.isdigit() or role not in ROLES:
        return None
    return int(layer), role


@dataclass
class AttentionLayer:
    """One layer's attention in the standard layout (see `toolkit.families.base`)."""

    index: int
    wq: np.ndarray  # [n_heads, d_model, d_head]
    wk: np.ndarray  # [n_kv_heads, d_model, d_head]
    wv: np.ndarray  # [n_kv_heads, d_model, d_head]
    w0: np.ndarray  # [n_heads, d_head, d_model]
    bq: np.ndarray | None = None  # [n_heads, d_head]; None: the model has no such bias
    bk: np.ndarray | None = None  # [n_kv_heads, d_head]
    bv: np.ndarray | None = None  # [n_kv_heads, d_head]
    b0: np.ndarray | None = None  # [d_model]

    def tensors(self) -> dict[str, np.ndarray]:
        """role -> tensor, for the weights and the biases the model has."""
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}

    def full(self, role: str) -> np.ndarray:
        """A weight as one x @ W matrix: wq/wk/wv [d_model, h*d_head], w0 [h*d_head, d_model]."""
        weight = getattr(self, role)
        if role == "w0":
            return weight.reshape(-1, weight.shape[-1])
        return weight.transpose(1, 0, 2).reshape(weight.shape[1], -1)

    def as_torch(self) -> dict[str, torch.Tensor]:  # noqa: F821
        import torch

        return {
            role: torch.from_numpy(np.ascontiguousarray(t)) for role, t in self.tensors().items()
        }


@dataclass
class AttentionModel:
    """A checkpoint's attention, described by its dimensions and read one layer at a time."""

    source: ModelSource
    family: Family
    dims: Dimensions
    config: dict
    checkpoint: Checkpoint = field(repr=False)
    prefix: str = ""
    layer_indices: tuple[int, ...] = ()
    bias_roles: tuple[str, ...] = BIAS_ROLES  # the biases the model has (others are absent)

    def __repr__(self) -> str:  # short: the config (a long dict) is one attribute away
        d = self.dims
        return (
            f"AttentionModel({self.name!r}, family={self.family.name!r}, "
            f"layers={len(self.layer_indices)}, heads={d.n_heads}, kv_heads={d.n_kv_heads}, "
            f"d_model={d.d_model}, "
            f"d_head={d.d_head})"
        )

    @property
    def name(self) -> str:
        return self.source.name

    def layer(self, index: int, half: bool = False, mapped: bool = False) -> AttentionLayer:
        """One layer's standard tensors, float32. `half`: tensors stored in BF16 or F16 come as
        stored (uint16 bits for BF16, float16; see `storage_dtype`), for a bit-exact copy; the
        families' conversions only split and transpose, so no value changes. `mapped`: read-only
        views of the checkpoint file's pages where no conversion is needed (`Checkpoint.get`),
        for a caller that copies them once (extract's layout)."""
        if index not in self.layer_indices:
            raise ToolkitError(self._layer_range_message(index))
        if self.source.is_standard_file:
            roles = WEIGHT_ROLES + self.bias_roles
            tensors = {
                role: self.checkpoint.get(standard_name(index, role), half, mapped)
                for role in roles
            }
        else:
            names = self.family.layer_names(index, self.config)
            raw = {
                role: self.checkpoint.get(self.prefix + name, half, mapped)
                for role, name in names.items()
            }
            tensors = self._converted(index, raw)
        return AttentionLayer(index=index, **tensors)

    def _converted(self, index: int, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The family's conversion, checked against the shapes the config implies: a config
        that contradicts its weights is one clear error, never a wrong split into heads."""
        d = self.dims
        said = f"{d.n_heads} heads of {d.d_head} ({d.n_kv_heads} key/value), d_model {d.d_model}"
        try:
            tensors = self.family.convert(raw, d)
        except ValueError:  # a reshape the stored sizes do not allow
            tensors = None
        expected = standard_shapes(d, self.bias_roles)
        if tensors is None or any(t.shape != expected.get(r) for r, t in tensors.items()):
            stored = ", ".join(f"{role} {list(t.shape)}" for role, t in raw.items())
            raise ToolkitError(
                f"layer {index} of {self.name} does not match its config.json ({said}): "
                f"stored {stored}"
            )
        return tensors

    def storage_dtype(self) -> str:
        """The one safetensors dtype all attention tensors are stored in ("BF16", "F16"), else
        "F32" (float32 storage, mixed dtypes, pickled weights, GGUF: read as float32)."""
        if self.source.is_standard_file:
            names = [standard_name(i, r) for i in self.layer_indices for r in WEIGHT_ROLES]
            names += [standard_name(i, r) for i in self.layer_indices for r in self.bias_roles]
        else:
            names = [
                self.prefix + name
                for i in self.layer_indices
                for name in self.family.layer_names(i, self.config).values()
            ]
        dtypes = {self.checkpoint.storage_dtype(name) for name in names}
        return dtypes.pop() if len(dtypes) == 1 and dtypes <= {"BF16", "F16"} else "F32"

    def layers(self, indices: Sequence[int] | None = None) -> Iterator[AttentionLayer]:
        for index in self.select_layers(indices):
            yield self.layer(index)

    def select_layers(self, indices: Sequence[int] | None) -> list[int]:
        """Validate a user's layer selection (None means all) against the model."""
        if not indices:
            return list(self.layer_indices)
        for index in indices:
            if index not in self.layer_indices:
                raise ToolkitError(self._layer_range_message(index))
        return sorted(set(indices))

    def _layer_range_message(self, index: int) -> str:
        if self.layer_indices == tuple(range(self.dims.n_layers)):
            available = f"0-{self.dims.n_layers - 1}"
        else:
            available = ", ".join(map(str, self.layer_indices))
        return f"layer {index} is out of range: {self.name} has layers {available}"

    def attention_parameters(self) -> int:
        """Values in the attention weights and biases of all layers."""
        shapes = standard_shapes(self.dims, self.bias_roles).values()
        return sum(math.prod(shape) for shape in shapes) * self.dims.n_layers

    def positions(self) -> dict:
        """The positional scheme and its parameters (rope theta, scaling, partial rotary)."""
        return self.family.positions(self.config)

    def relative_bias_table(self) -> np.ndarray:
        """The learned relative-position bias [buckets, n_heads], float32, of a family that has
        one (MPNet): a model-wide tensor, so not among a layer's standard tensors."""
        relative_bias = self.family.relative_bias
        if self.source.is_standard_file:
            raise ToolkitError(
                "the relative-position bias is not in a standard-tensor file: pass the model folder"
            )
        table = self.checkpoint.get(self.prefix + relative_bias.table)
        if table.shape[0] < relative_bias.num_buckets or table.shape[1] != self.dims.n_heads:
            raise ToolkitError(
                f"{self.name}'s {relative_bias.table} is {list(table.shape)}, not "
                f"[{relative_bias.num_buckets} buckets or more, {self.dims.n_heads} heads]"
            )
        return table

    def total_parameters(self) -> int | None:
        """Values in the whole checkpoint (headers only); None for a standard-tensor file."""
        if self.source.is_standard_file:
            return None
        return self.checkpoint.num_parameters()


def load_attention(
    model: str | Path | None = None, *, revision: str | None = None, allow_pickle: bool = False
) -> AttentionModel:
    """Open a model's attention weights lazily: nothing is read until `layer()` is called.

    `model` is "minilm" (the default, the embedded MiniLM-L6-H384), "smollm2" (the GGUF file
    of SmolLM2-135M-Instruct), a folder written by `save_pretrained`, a `.gguf` file, a
    `.safetensors` file written by `toolkit extract`, or a Hub id.
    """
    source = resolve_source(None if model is None else str(model), revision, allow_pickle)
    if source.is_gguf:
        from toolkit.gguf_checkpoint import GGUFCheckpoint

        return _from_checkpoint(
            source, family_for_config(source.config), GGUFCheckpoint(source.path)
        )
    checkpoint = Checkpoint(source.path, allow_pickle=allow_pickle)
    if source.is_standard_file:
        return _open_standard_file(source, checkpoint)
    family = family_for_checkpoint(source.config, checkpoint.names())
    if family.by_convention:
        _note_by_convention(family.name, family.pattern)
    return _from_checkpoint(source, family, checkpoint)


@functools.cache  # once per process: a fine-tune's report, view and compare each open the model
def _note_by_convention(model_type: str, pattern: str) -> None:
    print(
        f"note: model_type '{model_type}' is not registered; its attention is read by the "
        f"common names ({pattern}): `toolkit verify` tells whether that is right",
        file=sys.stderr,
    )


def family_of_source(source: ModelSource) -> Family:
    """The family a model folder or GGUF file is read with: its model_type's registry line, or
    for an unregistered type the common names its tensors follow (safetensors headers only)."""
    if source.is_gguf or is_registered(source.config):
        return family_for_config(source.config)
    return family_for_checkpoint(source.config, Checkpoint(source.path).names())


def _from_checkpoint(source: ModelSource, family: Family, checkpoint) -> AttentionModel:
    try:
        dims = family.dimensions(source.config)
    except (KeyError, TypeError) as err:
        raise ToolkitError(
            f"{source.path}/config.json lacks {err} for a {family.name} model"
        ) from None
    if not source.config.get("head_dim") and dims.d_model % dims.n_heads:
        raise ToolkitError(
            f"{source.path}/config.json is inconsistent: {dims.n_heads} heads do not divide "
            f"d_model {dims.d_model}"
        )
    if dims.n_heads % dims.n_kv_heads:
        raise ToolkitError(
            f"{source.path}/config.json is inconsistent: {dims.n_heads} query heads do not "
            f"form groups over {dims.n_kv_heads} key/value heads"
        )
    prefix = _find_prefix(checkpoint, family, source.config)
    layers = tuple(range(dims.n_layers))
    for layer in layers:  # names only: every command fails here, before writing anything
        for name in family.layer_names(layer, source.config).values():
            if prefix + name not in checkpoint:
                raise ToolkitError(
                    f"tensor {prefix + name} is missing from {checkpoint.path}: the checkpoint "
                    "is incomplete"
                )
    biases = family.bias_roles(source.config)
    return AttentionModel(source, family, dims, source.config, checkpoint, prefix, layers, biases)


def attention_from_state_dict(
    state_dict: dict, config: dict, name: str = "<in-memory model>", frozen: bool = False
) -> AttentionModel:
    """The standard tensors of an in-memory model: `state_dict` name -> torch tensor, `config`
    as in config.json (`model.config.to_dict()`). Used to track a model while it trains.
    `frozen`: the tensors are private copies (see `Checkpoint.from_state_dict`)."""
    checkpoint = Checkpoint.from_state_dict(state_dict, name, frozen)
    source = ModelSource(name=name, path=Path(name), config=config)
    return _from_checkpoint(source, family_for_checkpoint(config, checkpoint.names()), checkpoint)


def _find_prefix(checkpoint: Checkpoint, family: Family, config: dict) -> str:
    """Base and task models prefix the same names differently (`bert.`, `transformer.`)."""
    probe = next(iter(family.layer_names(0, config).values()))
    prefixes = {
        name[: -len(probe)]
        for name in checkpoint.names()
        if name.endswith(probe) and (name == probe or name[-len(probe) - 1] == ".")
    }
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(sorted(prefixes))
        raise ToolkitError(
            f"cannot find the {family.name} attention tensors in {checkpoint.path} "
            f"(looked for '*{probe}', found prefixes: {found}): the checkpoint does not match "
            "its config.json"
        )
    return prefixes.pop()


def _open_standard_file(source: ModelSource, checkpoint: Checkpoint) -> AttentionModel:
    meta = checkpoint.metadata
    if meta.get("format") != STANDARD_FORMAT:
        raise ToolkitError(
            f"{source.path} is not a standard-tensor file written by 'toolkit extract': "
            "pass a model folder instead"
        )
    config = json.loads(meta.get("config", "{}"))
    family = family_by_name(meta["family"], meta.get("pattern"))
    # Files written before grouped-query attention have no n_kv_heads: one per query head.
    n_kv_heads = int(meta.get("n_kv_heads", meta["n_heads"]))
    dims = Dimensions(
        int(meta["n_layers"]),
        int(meta["n_heads"]),
        int(meta["d_model"]),
        int(meta["d_head"]),
        n_kv_heads,
    )
    parsed = [name for name in map(parse_standard_name, checkpoint.names()) if name is not None]
    layers = tuple(sorted({layer for layer, _ in parsed}))
    biases = tuple(role for role in BIAS_ROLES if any(found == role for _, found in parsed))
    named = ModelSource(name=meta.get("source", source.name), path=source.path, config=config)
    return AttentionModel(named, family, dims, config, checkpoint, "", layers, biases)


def standard_shapes(
    dims: Dimensions, biases: Sequence[str] = BIAS_ROLES
) -> dict[str, tuple[int, ...]]:
    """The shape of each standard tensor of one layer (the weights and the given biases)."""
    h, h_kv, d_model, d_head = dims.n_heads, dims.n_kv_heads, dims.d_model, dims.d_head
    shapes = {
        "wq": (h, d_model, d_head),
        "wk": (h_kv, d_model, d_head),
        "wv": (h_kv, d_model, d_head),
        "w0": (h, d_head, d_model),
        "bq": (h, d_head),
        "bk": (h_kv, d_head),
        "bv": (h_kv, d_head),
        "b0": (d_model,),
    }
    return {role: shape for role, shape in shapes.items() if role in WEIGHT_ROLES + tuple(biases)}


def standard_tensor_dict(layers: Sequence[AttentionLayer]) -> dict[str, np.ndarray]:
    """`layers.{l}.{role}` -> contiguous float32 array, the names `extract` writes."""
    return {
        standard_name(layer.index, role): np.ascontiguousarray(tensor, dtype=np.float32)
        for layer in layers
        for role, tensor in layer.tensors().items()
    }


READERS = 2  # layers read at once, each on its thread, by inspect and extract
EXTRACT_DTYPES = ("source", "float32")


def write_standard_file(
    path: str | Path,
    model: AttentionModel,
    layers: Sequence[int] | None = None,
    dtype: str = "source",
) -> tuple[int, str]:
    """`write_laid_out`, with a failed write (a full disk, a read-only folder) as one line
    (ToolkitError); no file is left behind."""
    try:
        return write_laid_out(path, model, layers, dtype)
    except OSError as err:
        raise ToolkitError(
            f"cannot write {path} ({err.strerror or err}): free space or choose another folder"
        ) from None


def write_laid_out(
    path: str | Path,
    model: AttentionModel,
    layers: Sequence[int] | None = None,
    dtype: str = "source",
    readers: int = READERS,
    buffers: BlockBuffers | None = None,
) -> tuple[int, str]:
    """Write the standard tensors of `layers` (default all) as a safetensors file, atomically,
    at most `readers` layers at a time, each on its thread (a background writer beside training
    takes one): each layer is laid out per head from views of the checkpoint's mapped pages into
    a page-aligned buffer that goes to the disk by direct I/O (`safetensors_format.write_direct`;
    `buffers`: kept between files), or, on a file system without direct I/O, straight into the
    new file's memory-mapped pages. Returns (bytes of tensor data, storage dtype: "F32", "BF16"
    or "F16").

    dtype "source": in the checkpoint's own storage when all its attention tensors share a half
    precision (BF16 or F16: bit-exact, half the bytes), else float32; "float32": always float32
    (files numpy's safetensors loader reads: it has no bfloat16)."""
    from concurrent.futures import ThreadPoolExecutor

    if dtype not in EXTRACT_DTYPES:
        raise ToolkitError(f"dtype {dtype!r} is not one of {', '.join(EXTRACT_DTYPES)}")
    selected = model.select_layers(layers)
    roles = standard_shapes(model.dims, model.bias_roles)
    shapes = {
        standard_name(index, role): shape for index in selected for role, shape in roles.items()
    }

    storage = model.storage_dtype() if dtype == "source" else "F32"
    half = storage != "F32"

    def copy_layer(index: int, views: dict[str, np.ndarray], release) -> None:
        names = []
        # views of the checkpoint file's pages: the layout is the one copy made of them
        for role, tensor in model.layer(index, half, mapped=True).tensors().items():
            names.append(standard_name(index, role))
            view = views[names[-1]]
            if tensor.shape != view.shape or (half and tensor.dtype != view.dtype):
                raise ToolkitError(
                    f"layer {index} {role}: {tensor.dtype} {tensor.shape} does not "
                    f"fit the file's {view.dtype} {view.shape}"
                )
            copy_into(view, tensor)  # the per-head layout
        release(names)

    def fill(views: dict[str, np.ndarray], release) -> None:
        # Layers on READERS threads: reading and numpy copies release the GIL, and the layout
        # copies (a transpose per head: the slow part) of two layers use two cores.
        with ThreadPoolExecutor(max_workers=readers) as pool:
            for done in [pool.submit(copy_layer, index, views, release) for index in selected]:
                done.result()

    from toolkit.fileio import write_atomic
    from toolkit.layout import copy_into
    from toolkit.safetensors_format import write_direct, write_mapped

    metadata = standard_metadata(model)
    groups = [[standard_name(index, role) for role in roles] for index in selected]

    def write(tmp: Path) -> None:
        # straight from the layout buffers to the disk where the file system allows it, else
        # into the file's mapped pages
        def lay_out(group: int, views: dict[str, np.ndarray]) -> None:
            copy_layer(selected[group], views, lambda names: None)

        if not write_direct(tmp, shapes, metadata, storage, groups, lay_out, readers, buffers):
            write_mapped(tmp, shapes, metadata, storage, fill)

    write_atomic(path, write)
    return sum(math.prod(shape) * (2 if half else 4) for shape in shapes.values()), storage


def write_standard_tensors(
    path: str | Path,
    model: AttentionModel,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype: str = "F32",
) -> None:
    """Write a standard-format file from a stream: `tensors` (name -> array in `dtype`'s storage,
    see `safetensors_format.write_stream`, in the order of `shapes`) and `model`'s metadata as
    safetensors, atomically. `tensors` may be a generator,
    so that only one array is held at a time (tracking's snapshots; `write_standard_file` lays a
    checkpoint's layers out in place instead)."""
    from toolkit.fileio import write_atomic
    from toolkit.safetensors_format import write_stream

    write_atomic(
        path, lambda tmp: write_stream(tmp, shapes, tensors, standard_metadata(model), dtype)
    )


def standard_metadata(model: AttentionModel) -> dict[str, str]:
    d = model.dims
    return {
        "format": STANDARD_FORMAT,
        "family": model.family.name,
        "pattern": model.family.pattern,
        "source": str(model.name),
        "n_layers": str(d.n_layers),
        "n_heads": str(d.n_heads),
        "d_model": str(d.d_model),
        "d_head": str(d.d_head),
        "n_kv_heads": str(d.n_kv_heads),
        "biases": ",".join(model.bias_roles) or "none",
        "positions": json.dumps(model.positions(), sort_keys=True),
        "config": json.dumps(model.config, sort_keys=True),
    }


_AXES = "abcdefghijklmnopqrstuvwxyz"  # einsum subscripts, one per axis


def frobenius(array: np.ndarray) -> float:
    """Frobenius norm of the whole array, summed in float64."""
    return math.sqrt(_squares(array))


def head_frobenius(array: np.ndarray) -> np.ndarray:
    """[n_heads, ...] -> [n_heads] float64: the Frobenius norm of each head's slice.

    Summed in float64 with numpy (one thread: no wait for torch's worker threads, which on a
    busy machine costs a scheduler time slice per call; tracking calls this ~100 times a step).
    einsum reads a strided view (a family's transposed per-head layout) in place, where a
    reshape would first copy it (that copy was two thirds of `inspect` on a Llama-1B shape).
    An array of half-precision storage as `AttentionModel.layer(index, half=True)` gives it
    (uint16: BF16 bits, or float16) is widened one head at a time, a block that stays in cache,
    instead of the whole layer into fresh memory first (that widening was most of `inspect` on
    a fused-qkv Pythia-1.4B shape); its squares are exact in float32 (8- or 11-bit significands
    squared), summed in float32 along each contiguous run and the runs in float64 (half the
    time of casting every square to float64; at most ~1e-6 relative, 1e-7 measured).
    """
    axes = _AXES[1 : array.ndim]  # h is not among them
    if array.dtype in (np.uint16, np.float16):
        storage = "BF16" if array.dtype == np.uint16 else "F16"
        squares = [_half_squares(widened(head, storage)) for head in array]
        return np.sqrt(np.array(squares, dtype=np.float64))
    return np.sqrt(np.einsum(f"h{axes},h{axes}->h", array, array, dtype=np.float64))


def _half_squares(widened_head: np.ndarray) -> float:
    """The sum of squares of a widened half-precision block (a fresh float32 array, contiguous in
    some axis order, squared in place): exact squares; each run of it along its contiguous axis
    summed in float32 by numpy's pairwise sum (relative error below ~20 float32 epsilons for
    positive terms: 8 accumulators over runs up to 128, pairs of halves above), the runs in
    float64."""
    np.square(widened_head, out=widened_head)
    run = widened_head.shape[int(np.argmin(widened_head.strides))] if widened_head.ndim else 1
    runs = widened_head.ravel(order="K").reshape(-1, run)  # no copy: memory order
    return float(runs.sum(axis=1, dtype=np.float32).sum(dtype=np.float64))


def _squares(array: np.ndarray) -> float:
    """The sum of squares of all values, in float64 (a strided view read in place)."""
    axes = _AXES[: array.ndim]
    return float(np.einsum(f"{axes},{axes}->", array, array, dtype=np.float64))
