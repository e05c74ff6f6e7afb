"""How far Wq/Wk/Wv/W0 move from step 0: snapshots in DIR/shift/ and the trajectory JSON.

At step 0 and every `track_every` steps the standard per-head tensors of the model are written to
DIR/shift/step_XXXXXX.safetensors (each a valid model spec for `toolkit inspect`), and the
relative change of each weight against step 0 is appended to DIR/shift/trajectory.json:

    layer change  ||W_t - W_start||_F / ||W_start||_F            over a layer's whole matrix
    head change   ||W_t[h] - W_start[h]||_F / ||W_start[h]||_F   per head

W_start is the weight at step 0 (named apart from w0, the output projection); W[h] is one head's
[d_model, d_head] slice (w0: [d_head, d_model]).

Snapshots and the trajectory are written atomically by one background thread, so training does
not wait for the disk; `flush()` waits for it (before a checkpoint and at the end). This module
measures on the host with numpy; `device_tracking.DeviceShiftTracker` measures on the device
(CUDA) with the same numbers.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from toolkit.attention import (
    WEIGHT_ROLES,
    attention_from_state_dict,
    head_frobenius,
    load_attention,
    parse_standard_name,
    standard_name,
    standard_tensor_dict,
    write_standard_tensors,
)
from toolkit.fileio import write_json

TRAJECTORY_FILE = "trajectory.json"


def snapshot_name(step: int) -> str:
    return f"step_{step:06d}.safetensors"


@dataclass
class ShiftPoint:
    """The relative change of each weight at one step; metrics only when evaluated at that step."""

    step: int
    loss: float | None
    metrics: dict[str, float]
    layer_change: dict[str, list[float]]  # role -> [n_layers]
    head_change: dict[str, list[list[float]]]  # role -> [n_layers][n_heads]
    snapshot: str


@dataclass
class Trajectory:
    """The record of a run: shift points, the training loss of every step, and evaluations."""

    model: str
    task: str
    n_layers: int = 0
    n_heads: int = 0
    shift: list[ShiftPoint] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    evaluations: list[dict[str, float]] = field(default_factory=list)  # {"step": s, metric: value}

    def truncate(self, step: int) -> None:
        """Forget everything after `step` (a resumed run redoes those steps)."""
        self.shift = [p for p in self.shift if p.step <= step]
        self.train_loss = [(s, loss) for s, loss in self.train_loss if s <= step]
        self.evaluations = [e for e in self.evaluations if e["step"] <= step]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        return cls(
            **{
                **data,
                "shift": [ShiftPoint(**p) for p in data["shift"]],
                "train_loss": [tuple(item) for item in data["train_loss"]],
            }
        )


class ShiftTracker:
    """Keeps the step-0 weights in memory and measures each later snapshot against them."""

    def __init__(self, shift_dir: Path, model_config: dict, start: dict[str, np.ndarray]):
        self.shift_dir = shift_dir
        self.model_config = model_config  # config.json of the model being trained
        self.weights_at_start = start  # standard name -> float32 array, weights only
        self.head_norms_at_start = {name: head_frobenius(t) for name, t in start.items()}
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    @classmethod
    def begin(
        cls, shift_dir: Path, state_dict: dict, model_config: dict, trajectory: Trajectory
    ) -> ShiftTracker:
        """Snapshot step 0 and start a trajectory that is zero there."""
        name = f"{trajectory.model} at step 0"
        attention, tensors = _standard_tensors(state_dict, model_config, name)
        trajectory.n_layers, trajectory.n_heads = attention.dims.n_layers, attention.dims.n_heads
        tracker = cls(
            shift_dir,
            model_config,
            {n: t for n, t in tensors.items() if parse_standard_name(n)[1] in WEIGHT_ROLES},
        )
        tracker._append(trajectory, 0, None, {}, attention, tensors)
        return tracker

    @classmethod
    def resume(cls, shift_dir: Path, model_config: dict) -> ShiftTracker:
        """Measure against the step-0 snapshot a previous run wrote."""
        attention = load_attention(shift_dir / snapshot_name(0))
        start = {
            standard_name(layer.index, role): getattr(layer, role)
            for layer in attention.layers()
            for role in WEIGHT_ROLES
        }
        return cls(shift_dir, model_config, start)

    def record(
        self,
        trajectory: Trajectory,
        step: int,
        state_dict: dict,
        loss: float | None,
        metrics: dict[str, float],
    ) -> ShiftPoint:
        name = f"{trajectory.model} at step {step}"
        attention, tensors = _standard_tensors(state_dict, self.model_config, name)
        return self._append(trajectory, step, loss, metrics, attention, tensors)

    def flush(self) -> None:
        """Wait until every snapshot and trajectory so far is on disk."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.flush()
        self._writer.shutdown()

    def _append(self, trajectory, step, loss, metrics, attention, tensors) -> ShiftPoint:
        layer_change, head_change = self._relative_change(tensors, trajectory.n_layers)
        point = ShiftPoint(step, loss, metrics, layer_change, head_change, snapshot_name(step))
        return self._append_point(trajectory, point, attention, lambda: tensors)

    def _append_point(self, trajectory, point, attention, make_tensors) -> ShiftPoint:
        """Add `point` and write its snapshot; `make_tensors()` runs on the writer thread."""
        trajectory.shift.append(point)
        self._write(make_tensors, attention, trajectory.to_dict(), point.snapshot)
        return point

    def _relative_change(self, tensors: dict, n_layers: int):
        layer_change = {role: [] for role in WEIGHT_ROLES}
        head_change = {role: [] for role in WEIGHT_ROLES}
        for layer in range(n_layers):
            for role in WEIGHT_ROLES:
                name = standard_name(layer, role)
                # [n_heads, a, b] -> ||W_t[h] - W_start[h]||_F: [n_heads]
                moved = head_frobenius(tensors[name] - self.weights_at_start[name])
                at_start = self.head_norms_at_start[name]
                head_change[role].append((moved / at_start).tolist())
                layer_change[role].append(
                    float(np.sqrt(np.square(moved).sum() / np.square(at_start).sum()))
                )
        return layer_change, head_change

    def _write(self, make_tensors, attention, trajectory: dict, snapshot: str) -> None:
        def write():
            tensors = make_tensors()
            shapes = {name: tensor.shape for name, tensor in tensors.items()}
            write_standard_tensors(self.shift_dir / snapshot, attention, shapes, tensors.items())
            write_json(self.shift_dir / TRAJECTORY_FILE, trajectory)

        self.flush()  # one write in flight at most: bounded memory, snapshots land in order
        self._pending = self._writer.submit(write)


def _standard_tensors(state_dict: dict, config: dict, name: str):
    """(AttentionModel, contiguous float32 copies of every layer's standard tensors).

    `Checkpoint.get` copies each tensor out of the state dict, so nothing here is a view of a
    live parameter that the next optimizer step would overwrite.
    """
    attention = attention_from_state_dict(state_dict, config, name)
    return attention, standard_tensor_dict(list(attention.layers()))
