"""Shift tracking where the weights live: the per-head relative change by torch ops on the
parameters' device; only the [n_layers, n_heads] numbers cross to the host.

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

import numpy as np

from toolkit.attention import WEIGHT_ROLES, attention_from_state_dict, standard_name
from toolkit.training.tracking import ShiftPoint, ShiftTracker, _standard_tensors


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


class DeviceShiftTracker(ShiftTracker):
    """A ShiftTracker that measures on the device of the state dict it is given."""

    _index: dict | None = None  # role -> LongTensor [n_heads, rows * cols], per layer alike

    def _record(self, trajectory, step, state_dict, loss, metrics) -> ShiftPoint:
        name = f"{trajectory.model} at step {step}"
        attention = attention_from_state_dict(state_dict, self.model_config, name)
        if self._index is None:
            self._prepare(attention, state_dict)
        flats = [layer_flat(attention, state_dict, layer) for layer in range(trajectory.n_layers)]
        layer_change, head_change = self._device_change(flats)
        point = ShiftPoint(step, loss, metrics, layer_change, head_change, None)
        if not self._snapshot_wanted(point):
            return self._append_point(trajectory, point, attention, None)
        # the writer is idle, so the pinned buffers are free: the last write has read them
        copied = self._copy_to_host(flats)
        shapes = {
            attention.prefix + name: tuple(state_dict[attention.prefix + name].shape)
            for layer in range(trajectory.n_layers)
            for name in attention.family.layer_names(layer, attention.config).values()
        }

        def standard_tensors():
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
            return _standard_tensors(raw, self.model_config, name)[1]

        return self._append_point(trajectory, point, attention, standard_tensors)

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

    def _device_change(self, flats: list) -> tuple[dict, dict]:
        """(layer_change, head_change) as ShiftPoint holds them; one transfer to the host."""
        import torch

        heads, layers = [], []
        for role in WEIGHT_ROLES:
            current = torch.stack([flat[self._index[role]] for flat in flats])  # [L, H, N]
            moved = (current - self._start[role]).double().square().sum(-1).sqrt()  # [L, H]
            start = self._start_norm[role]
            heads.append(moved / start)
            layers.append((moved.square().sum(-1) / start.square().sum(-1)).sqrt())  # [L]
        # one transfer: wq/w0 have h heads, wk/wv h_kv under grouped-query attention
        sizes = [len(change[0]) for change in heads]
        flat = torch.cat([change.reshape(-1) for change in heads + layers]).cpu()
        pieces = flat.split([len(flats) * size for size in sizes] + [len(flats)] * len(layers))
        heads = [
            piece.reshape(len(flats), size).tolist()
            for piece, size in zip(pieces[: len(sizes)], sizes, strict=True)
        ]
        layers = [piece.tolist() for piece in pieces[len(sizes) :]]
        return (
            dict(zip(WEIGHT_ROLES, layers, strict=True)),
            dict(zip(WEIGHT_ROLES, heads, strict=True)),
        )

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
