"""Shift tracking where the weights live: the per-head relative change by torch ops on the
parameters' device; only the [n_layers, n_heads] numbers cross to the host, by a non-blocking
copy that a later record, snapshot or flush collects: the training thread never waits for the
device to finish a step because of tracking.

    flat_l  = concat(layer l's attention parameters, flattened)          on the device
    W_t[h]  = flat_l[index[role][h]]     index: [n_heads, rows*cols], from the family's own
                                          `convert` applied once to element positions
    change  = ||W_t[h] - W_0[h]||_F / ||W_0[h]||_F                        float64 sums

At a scheduled snapshot (when the writer is idle) the flats are copied into pinned host buffers on
a side stream (non-blocking), and the writer thread waits for that copy's CUDA event, lays the
tensors out and writes the file, so the next training step waits for neither. The same code runs
on CPU tensors (the copy is then the flat itself), which is how the tests check it against the
numpy route.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.attention import WEIGHT_ROLES, attention_from_state_dict, standard_name
from toolkit.training.tracking import ShiftPoint, ShiftTracker


def layer_gather_index(attention, state_dict: dict, layer: int) -> dict[str, np.ndarray]:
    """role -> [n_heads, rows * cols] int64: where each standard weight's elements sit in the
    flattened concatenation of the layer's parameters (in `layer_names` order)."""
    offset, positions = 0, {}
    for raw_role, name in attention.family.layer_names(layer, attention.config).items():
        shape = tuple(state_dict[attention.prefix + name].shape)
        count = int(np.prod(shape))
        positions[raw_role] = np.arange(offset, offset + count, dtype=np.int64).reshape(shape)
        offset += count
    standard = attention.family.convert(positions, attention.dims)  # layout ops only
    # wk, wv have h_kv heads under grouped-query attention, wq and w0 h
    return {
        role: np.ascontiguousarray(standard[role]).reshape(len(standard[role]), -1)
        for role in WEIGHT_ROLES
    }


def layer_flat(attention, state_dict: dict, layer: int):
    """The layer's attention parameters, flattened and concatenated: a float32 copy, on the
    parameters' device."""
    import torch

    names = attention.family.layer_names(layer, attention.config).values()
    return torch.cat(
        [state_dict[attention.prefix + name].detach().reshape(-1).float() for name in names]
    )


@dataclass
class UnreadChange:
    """One step's per-head numbers on their way to the host: `values` (heads of each role, then
    each role's layers, float64) is complete once `arrived` has happened (None: already)."""

    values: object  # torch.Tensor, on the host
    arrived: object  # torch.cuda.Event | None
    n_layers: int
    heads: list[int]  # per role

    def arrived_already(self) -> bool:
        return self.arrived is None or self.arrived.query()

    def read(self) -> tuple[dict, dict]:
        """(layer_change, head_change): role -> [n_layers], role -> [n_layers][n_heads]."""
        if self.arrived is not None:
            self.arrived.synchronize()
        counts = [self.n_layers * size for size in self.heads] + [self.n_layers] * len(self.heads)
        pieces = self.values.split(counts)
        heads = [
            piece.reshape(self.n_layers, size).tolist()
            for piece, size in zip(pieces[: len(self.heads)], self.heads, strict=True)
        ]
        layers = [piece.tolist() for piece in pieces[len(self.heads) :]]
        return (
            dict(zip(WEIGHT_ROLES, layers, strict=True)),
            dict(zip(WEIGHT_ROLES, heads, strict=True)),
        )


class DeviceShiftTracker(ShiftTracker):
    """A ShiftTracker that measures on the device of the state dict it is given; a step's numbers
    reach its ShiftPoint later (by the next record, snapshot or `flush`), so that the training
    thread never waits for the device to finish the step."""

    _index: dict | None = None  # role -> LongTensor [n_heads, rows * cols], per layer alike

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unread: list[tuple[ShiftPoint, UnreadChange]] = []  # in step order

    def _record(self, trajectory, step, state_dict, loss, metrics) -> ShiftPoint:
        name = f"{trajectory.model} at step {step}"
        attention = attention_from_state_dict(state_dict, self.model_config, name)
        if self._index is None:
            self._prepare(attention, state_dict)
        self._collect(wait=False)  # earlier steps' numbers that have reached the host
        flats = [layer_flat(attention, state_dict, layer) for layer in range(trajectory.n_layers)]
        point = ShiftPoint(step, loss, metrics, {}, {}, None)
        self._unread.append((point, self._device_change(flats)))
        if not self._snapshot_wanted(point):
            return self._append_point(trajectory, point, None)
        self._collect(wait=True)  # the snapshot's trajectory file holds every number so far
        # the writer is idle, so the pinned buffers are free: the last write has read them
        copied = self._copy_to_host(flats)
        shapes = {
            attention.prefix + name: tuple(state_dict[attention.prefix + name].shape)
            for layer in range(trajectory.n_layers)
            for name in attention.family.layer_names(layer, attention.config).values()
        }

        def snapshot():
            host_flats = copied()
            raw = {}
            for layer, flat in enumerate(host_flats):
                position = 0
                for tensor_name in attention.family.layer_names(layer, attention.config).values():
                    shape = shapes[attention.prefix + tensor_name]
                    count = int(np.prod(shape))
                    raw[attention.prefix + tensor_name] = flat[position : position + count].view(
                        shape
                    )
                    position += count
            return attention_from_state_dict(raw, self.model_config, name)

        return self._append_point(trajectory, point, snapshot)

    def _prepare(self, attention, state_dict: dict) -> None:
        """Per-role gather indices and the step-0 weights [n_layers, n_heads, rows * cols] on the
        device, with their per-head norms [n_layers, n_heads] in float64."""
        import torch

        device = next(iter(state_dict.values())).device
        n_layers = attention.dims.n_layers
        index = layer_gather_index(attention, state_dict, 0)  # every layer has one layout
        self._index = {role: torch.from_numpy(i).to(device) for role, i in index.items()}
        self._start = {
            role: torch.stack(
                [
                    torch.from_numpy(start).reshape(len(start), -1)  # [heads of the role, ...]
                    for start in (
                        self.weights_at_start[standard_name(layer, role)]
                        for layer in range(n_layers)
                    )
                ]
            ).to(device)
            for role in WEIGHT_ROLES
        }
        self._start_norm = {
            role: start.double().square().sum(-1).sqrt() for role, start in self._start.items()
        }
        self._buffers = None
        if device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)

    def _device_change(self, flats: list) -> UnreadChange:
        """Start computing (layer_change, head_change) as ShiftPoint holds them, and copying them
        to the host: one small transfer that the training thread does not wait for."""
        import torch

        heads, layers = [], []
        for role in WEIGHT_ROLES:
            current = torch.stack([flat[self._index[role]] for flat in flats])  # [L, H, N]
            moved = (current - self._start[role]).double().square().sum(-1).sqrt()  # [L, H]
            start = self._start_norm[role]
            heads.append(moved / start)
            layers.append((moved.square().sum(-1) / start.square().sum(-1)).sqrt())  # [L]
        # wq/w0 have h heads, wk/wv h_kv under grouped-query attention
        sizes = [len(change[0]) for change in heads]
        flat = torch.cat([change.reshape(-1) for change in heads + layers])
        if flat.device.type != "cuda":
            return UnreadChange(flat, None, len(flats), sizes)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return UnreadChange(host, arrived, len(flats), sizes)

    def _collect(self, wait: bool) -> None:
        """Fill in the numbers of the points whose transfer is done, in step order; `wait`: of
        every point (waiting for the device)."""
        while self._unread:
            point, change = self._unread[0]
            if not (wait or change.arrived_already()):
                return
            point.layer_change, point.head_change = change.read()
            self._unread.pop(0)

    def flush(self) -> None:
        self._collect(wait=True)
        super().flush()

    def _copy_to_host(self, flats: list):
        """Start copying the flats to the host; return a function that waits and gives them."""
        import torch

        if flats[0].device.type != "cuda":
            return lambda: flats  # already host memory, and a copy of the parameters
        if self._buffers is None:
            self._buffers = [
                torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True) for flat in flats
            ]
        ready = torch.cuda.Event()
        ready.record()  # after the flats are made on the training stream
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(ready)
            for flat, buffer in zip(flats, self._buffers, strict=True):
                buffer.copy_(flat, non_blocking=True)
                flat.record_stream(self._copy_stream)  # not reused until the copy is done
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        buffers = self._buffers

        def wait():
            done.synchronize()
            return buffers

        return wait
