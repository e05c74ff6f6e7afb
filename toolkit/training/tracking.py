"""How far Wq/Wk/Wv/W0 move from step 0: the trajectory JSON, a few snapshots, their schedule.

At step 0 and every `track_every` steps the relative change of each weight against step 0 is
appended to DIR/shift/trajectory.json:

    layer change  ||W_t - W_start||_F / ||W_start||_F            over a layer's whole matrix
    head change   ||W_t[h] - W_start[h]||_F / ||W_start[h]||_F   per head

W_start is the weight at step 0 (named apart from w0, the output projection); W[h] is one head's
[d_model, d_head] slice (w0: [d_head, d_model]).

The standard per-head tensors themselves are written to DIR/shift/step_XXXXXX.safetensors (each a
valid model spec for `toolkit inspect`) only at the steps `SnapshotSchedule` names: step 0, the
tracked steps whose count is a power of two (1, 2, 4, 8, ... times `track_every`), evaluations,
every `snapshot_every` steps if asked, and the last step. They are stored in the model's 16-bit
dtype when its step-0 weights are exact in it (a bf16 model or checkpoint), float32 otherwise.

For a snapshot the training thread only copies the raw attention parameters (one memcpy each);
one background thread lays them out per head straight into the file's mapped pages (one pass over
the data) and writes the trajectory, atomically. Training never waits for it: a snapshot due
while the previous one is still being written is skipped and counted (an evaluated step's and
the last step's wait for it instead: training has stopped there), and a write that fails (a
full disk) warns once.
Either way the shift point says which snapshot is missing and why. `flush()` waits (before a
checkpoint and at the end). This module measures on the host with numpy, spreading the weights
over as many threads as torch uses (its workers sit idle meanwhile);
`device_tracking.DeviceShiftTracker` measures on the device (CUDA) with the same numbers.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from toolkit.attention import (
    WEIGHT_ROLES,
    attention_from_state_dict,
    head_frobenius,
    load_attention,
    standard_name,
    standard_tensor_dict,
    write_laid_out,
    write_standard_tensors,
)
from toolkit.errors import ToolkitError
from toolkit.fileio import write_json
from toolkit.progress import stderr_console
from toolkit.safetensors_format import BlockBuffers, widened

TRAJECTORY_FILE = "trajectory.json"
HALF_PRECISION = {"bfloat16": "BF16", "float16": "F16"}  # torch dtype name -> safetensors dtype
SKIPPED = "skipped: the previous snapshot was still being written"
TRACK_EVERY = 10  # steps, when not given (capped at a shorter run's length)


def snapshot_name(step: int) -> str:
    return f"step_{step:06d}.safetensors"


@dataclass(frozen=True)
class SnapshotSchedule:
    """Which steps are tracked (per-head numbers) and which of those write a full snapshot."""

    total_steps: int
    track_every: int
    snapshot_every: int = 0  # 0: only the default steps

    @classmethod
    def for_run(
        cls, total_steps: int, track_every: int | None, snapshot_every: int = 0
    ) -> SnapshotSchedule:
        """The schedule of a run of `total_steps`; `track_every` None: TRACK_EVERY, or the run's
        length when shorter. A given value outside [0, total_steps] is refused (ToolkitError)."""
        if track_every is None:
            track_every = min(TRACK_EVERY, total_steps)
        return cls(total_steps, track_every, snapshot_every)

    def __post_init__(self) -> None:
        for name in ("track_every", "snapshot_every"):
            every = getattr(self, name)
            if every < 0 or every > self.total_steps:
                raise ToolkitError(
                    f"{name.replace('_', '-')} must be between 0 (off) and the run's "
                    f"{self.total_steps} steps, not {every}"
                )

    def tracks(self, step: int) -> bool:
        """Whether the shift is measured at `step` (after the update that ends it)."""
        if not self.track_every:
            return False
        every = (self.track_every, self.snapshot_every)
        return step == self.total_steps or any(n and step % n == 0 for n in every)

    def snapshots(self, step: int, evaluated: bool = False) -> bool:
        """Whether a tracked `step` writes its weights: step 0, the last step, an evaluation, a
        multiple of `snapshot_every`, or the 1st, 2nd, 4th, 8th, ... multiple of `track_every`."""
        if step in (0, self.total_steps) or evaluated:
            return True
        if self.snapshot_every and step % self.snapshot_every == 0:
            return True
        count, rest = divmod(step, self.track_every)
        return rest == 0 and count & (count - 1) == 0

    def snapshot_steps(self, eval_every: int = 0) -> list[int]:
        """Every step of a whole run that writes a snapshot (evaluating every `eval_every`)."""
        return [
            step
            for step in range(self.total_steps + 1)
            if (step == 0 or self.tracks(step))
            and self.snapshots(step, bool(eval_every) and step % eval_every == 0)
        ]


@dataclass
class ShiftPoint:
    """The relative change of each weight at one step; metrics only when evaluated at that step.
    `snapshot`: the file holding the weights, None when the step has none; `snapshot_missing`:
    why a scheduled snapshot is not there (skipped, or its write failed)."""

    step: int
    loss: float | None
    metrics: dict[str, float]
    layer_change: dict[str, list[float]]  # role -> [n_layers]
    head_change: dict[str, list[list[float]]]  # role -> [n_layers][n_heads]
    snapshot: str | None
    snapshot_missing: str | None = None


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
    best_step: int | None = None  # the step final/ holds if the run kept its best; None: last

    def truncate(self, step: int) -> None:
        """Forget everything after `step` (a resumed run redoes those steps)."""
        self.shift = [p for p in self.shift if p.step <= step]
        self.train_loss = [(s, loss) for s, loss in self.train_loss if s <= step]
        self.evaluations = [e for e in self.evaluations if e["step"] <= step]

    def final_point(self) -> ShiftPoint:
        """The shift point of the model saved as final/: the best step's when the run kept its
        best evaluation, else the last one."""
        return next((p for p in self.shift if p.step == self.best_step), self.shift[-1])

    def snapshots(self) -> list[tuple[int, str]]:
        """(step, file name) of every snapshot written, in step order."""
        return [(p.step, p.snapshot) for p in self.shift if p.snapshot]

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
    """Keeps the step-0 weights in memory and measures each tracked step against them.

    `seconds`: the time `record` took on the training thread; `skipped`: snapshots skipped
    because the previous one was still being written."""

    def __init__(
        self,
        shift_dir: Path,
        model_config: dict,
        start: dict[str, np.ndarray],
        schedule: SnapshotSchedule,
        dtype: str,
    ):
        self.shift_dir = shift_dir
        self.model_config = model_config  # config.json of the model being trained
        self.weights_at_start = start  # standard name -> float32 array, weights only
        # from contiguous copies: the same sums from a raw copy's views or a snapshot's arrays
        self.head_norms_at_start = {
            name: head_frobenius(np.ascontiguousarray(t)) for name, t in start.items()
        }
        self.schedule = schedule
        self.dtype = dtype  # the snapshots' safetensors dtype: F32, BF16 or F16
        self.seconds = 0.0
        self.skipped = 0
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._write_buffers = BlockBuffers()  # the writer's, reused by every snapshot
        self._copies: dict = {}  # the parameters' copy a snapshot is written from, reused
        self._pending: Future | None = None
        self._warned = False
        self._measure_pool: ThreadPoolExecutor | None = None
        self._scratch = threading.local()  # each measuring thread's difference buffers

    @classmethod
    def begin(
        cls,
        shift_dir: Path,
        state_dict: dict,
        model_config: dict,
        trajectory: Trajectory,
        schedule: SnapshotSchedule,
    ) -> ShiftTracker:
        """Snapshot step 0 and start a trajectory that is zero there."""
        name = f"{trajectory.model} at step 0"
        attention = attention_from_state_dict(state_dict, model_config, name)
        trajectory.n_layers, trajectory.n_heads = attention.dims.n_layers, attention.dims.n_heads
        # views of a copy of the raw parameters: later steps' live views have the same strides,
        # so their difference runs in memory order
        start = _live_weights(attention, state_dict, copy=True)
        dtype = snapshot_dtype(_parameter_dtype(state_dict), model_config, start)
        tracker = cls(shift_dir, model_config, start, schedule, dtype)
        layer_change, head_change = tracker._relative_change(start, trajectory.n_layers)
        point = ShiftPoint(0, None, {}, layer_change, head_change, snapshot_name(0))
        snapshot = snapshot_source(attention, state_dict, model_config, name, tracker._copies)
        tracker._append_point(trajectory, point, lambda: snapshot)
        return tracker

    @classmethod
    def resume(
        cls, shift_dir: Path, model_config: dict, schedule: SnapshotSchedule
    ) -> ShiftTracker:
        """Measure against the step-0 snapshot a previous run wrote."""
        attention = load_attention(shift_dir / snapshot_name(0))
        start = {
            standard_name(layer.index, role): getattr(layer, role)
            for layer in attention.layers()
            for role in WEIGHT_ROLES
        }
        return cls(shift_dir, model_config, start, schedule, attention.storage_dtype())

    def record(
        self,
        trajectory: Trajectory,
        step: int,
        state_dict: dict,
        loss: float | None,
        metrics: dict[str, float],
    ) -> ShiftPoint:
        """Append the shift at `step` (and write its snapshot when due); timed in `seconds`."""
        started = time.perf_counter()
        try:
            return self._record(trajectory, step, state_dict, loss, metrics)
        finally:
            self.seconds += time.perf_counter() - started

    def _record(self, trajectory, step, state_dict, loss, metrics) -> ShiftPoint:
        name = f"{trajectory.model} at step {step}"
        attention = attention_from_state_dict(state_dict, self.model_config, name)
        live = _live_weights(attention, state_dict)
        layer_change, head_change = self._relative_change(live, trajectory.n_layers)
        point = ShiftPoint(step, loss, metrics, layer_change, head_change, None)
        snapshot = None
        if self._snapshot_wanted(point):
            # the writer is idle (`_snapshot_wanted`): the last snapshot's copy is free
            source = snapshot_source(attention, state_dict, self.model_config, name, self._copies)
            snapshot = lambda: source  # noqa: E731
        return self._append_point(trajectory, point, snapshot)

    def flush(self) -> None:
        """Wait until every snapshot and trajectory so far is on disk."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.flush()
        self._writer.shutdown()
        if self._measure_pool is not None:
            self._measure_pool.shutdown()

    def _snapshot_wanted(self, point: ShiftPoint) -> bool:
        """Whether to write `point`'s snapshot now: its step is due one (step 0 always) and the
        writer is idle; a due one the writer is too busy for is skipped, counted and noted.
        An evaluated step's and the last step's are never skipped: training has stopped for the
        evaluation (or is over), so waiting for the previous write costs it nothing, and those
        are the snapshots a kept best model and the report are read from."""
        if point.step and not self.schedule.snapshots(point.step, bool(point.metrics)):
            return False
        if point.metrics or point.step == self.schedule.total_steps:
            self.flush()
        if self._pending is not None and not self._pending.done():
            self.skipped += 1
            point.snapshot_missing = SKIPPED
            return False
        return True

    def _append_point(self, trajectory, point, snapshot) -> ShiftPoint:
        """Add `point`; with `snapshot`, write its weights: `snapshot()` (the AttentionModel of a
        copy of the parameters) runs on the writer thread, which is idle (`_snapshot_wanted`)."""
        trajectory.shift.append(point)
        if snapshot is None:
            return point
        point.snapshot = snapshot_name(point.step)
        self.flush()  # done already: collects its result
        # a shallow copy: the writer serialises the points so far while training appends more
        record = dataclasses.replace(trajectory, shift=list(trajectory.shift))
        self._pending = self._writer.submit(self._write, snapshot, record, point)
        return point

    def _relative_change(self, tensors: dict, n_layers: int):
        names = [standard_name(layer, role) for layer in range(n_layers) for role in WEIGHT_ROLES]
        # each weight on its own: numpy releases the GIL in these loops, so the cores that the
        # training step's torch threads use (idle while this runs) share the work; every weight's
        # sums run alike whatever thread takes them, so the numbers do not depend on the count
        moved = dict(
            zip(
                names,
                self._measurers().map(self._moved, names, [tensors[n] for n in names]),
                strict=True,
            )
        )
        layer_change = {role: [] for role in WEIGHT_ROLES}
        head_change = {role: [] for role in WEIGHT_ROLES}
        for layer in range(n_layers):
            for role in WEIGHT_ROLES:
                name = standard_name(layer, role)
                at_start = self.head_norms_at_start[name]
                head_change[role].append((moved[name] / at_start).tolist())
                layer_change[role].append(
                    float(np.sqrt(np.square(moved[name]).sum() / np.square(at_start).sum()))
                )
        return layer_change, head_change

    def _moved(self, name: str, live: np.ndarray) -> np.ndarray:
        """||W_t[h] - W_start[h]||_F of one weight [n_heads, a, b]: [n_heads] float64. The
        difference takes the live view's layout, whatever W_start's (a copy, or read from a
        snapshot when resuming), so that the sums run in one order: a resumed run's numbers are
        bit for bit those of an uninterrupted one."""
        # order "K": the live parameter's strides. One buffer per layout and thread, reused
        # every step: fresh ones cost page faults, and returning them to the system interrupts
        # the training threads (TLB shootdowns)
        buffers = self._scratch.__dict__.setdefault("buffers", {})
        key = (live.shape, live.strides, live.dtype)
        if key not in buffers:
            buffers[key] = np.empty_like(live)
        difference = buffers[key]
        np.subtract(live, self.weights_at_start[name], out=difference)
        return head_frobenius(difference)

    def _measurers(self) -> ThreadPoolExecutor:
        """The threads `_relative_change` spreads its weights over: as many as torch's."""
        if self._measure_pool is None:
            import torch

            self._measure_pool = ThreadPoolExecutor(max_workers=torch.get_num_threads())
        return self._measure_pool

    def _write(self, snapshot, trajectory: Trajectory, point: ShiftPoint) -> None:
        """On the writer thread: the snapshot, then the trajectory; a failed write (a full
        disk) leaves no file, marks the point and warns once, and training goes on."""
        try:
            self._write_snapshot(snapshot(), self.shift_dir / point.snapshot)
        except OSError as err:
            point.snapshot, point.snapshot_missing = None, f"not written: {err.strerror or err}"
            self._warn(f"snapshot of step {point.step} {point.snapshot_missing}")
        try:
            write_json(self.shift_dir / TRAJECTORY_FILE, trajectory.to_dict())
        except OSError as err:
            self._warn(f"{TRAJECTORY_FILE} not updated at step {point.step}: {err.strerror}")

    def _write_snapshot(self, source, path: Path) -> None:
        """Lay `source`'s heads out straight into the file's mapped pages (one pass over the
        data) when it is stored in the snapshots' dtype or they are float32; else (a float32
        model whose checkpoint is 16-bit) convert each tensor and stream it."""
        if self.dtype == "F32" or source.storage_dtype() == self.dtype:
            # one thread: the writer must not take the cores the training step is using
            write_laid_out(
                path,
                source,
                dtype="float32" if self.dtype == "F32" else "source",
                readers=1,
                buffers=self._write_buffers,
            )
            return
        tensors = standard_tensor_dict(list(source.layers()))
        shapes = {name: tensor.shape for name, tensor in tensors.items()}
        stored = ((name, stored_as(tensor, self.dtype)) for name, tensor in tensors.items())
        write_standard_tensors(path, source, shapes, stored, self.dtype)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            stderr_console().print(
                f"warning: {message}; training goes on, the trajectory names every missing "
                "snapshot",
                highlight=False,
            )


def snapshot_dtype(parameter_dtype: str, model_config: dict, start: dict[str, np.ndarray]) -> str:
    """The snapshots' safetensors dtype: the 16-bit dtype the model is trained in; else the one
    its checkpoint stores (config `dtype`) when every step-0 weight is exact in it (so step 0,
    the reference a resumed run measures against, loses nothing); else F32."""
    if parameter_dtype in HALF_PRECISION:
        return HALF_PRECISION[parameter_dtype]
    configured = model_config.get("dtype") or model_config.get("torch_dtype")
    half = HALF_PRECISION.get(str(configured))
    if half is None:
        return "F32"
    exact = all(np.array_equal(widened(stored_as(t, half), half), t) for t in start.values())
    return half if exact else "F32"


def stored_as(array: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 array in `dtype`'s safetensors storage: float32, float16, or BF16 as its uint16
    bits (rounded to nearest even, by torch); `safetensors_format.widened` is its inverse."""
    if dtype == "F32":
        return array
    if dtype == "F16":
        return array.astype(np.float16)
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).bfloat16().view(torch.uint16).numpy()


def _parameter_dtype(state_dict: dict) -> str:
    """The torch dtype name of the first floating tensor ("float32", "bfloat16", ...)."""
    return next(
        str(t.dtype).removeprefix("torch.") for t in state_dict.values() if t.is_floating_point()
    )


def _live_weights(attention, state_dict: dict, copy: bool = False) -> dict[str, np.ndarray]:
    """Standard name -> the weight [n_heads, a, b] as a float32 view of the live parameter on the
    CPU (the family's `convert` only splits, reshapes and transposes): measured at once, no copy
    first. `copy`: views of a copy instead (the parameters will move)."""
    weights = {}
    for layer in attention.layer_indices:
        names = attention.family.layer_names(layer, attention.config)
        raw = {}
        for role, name in names.items():
            array = state_dict[attention.prefix + name].detach().float().cpu().numpy()
            raw[role] = array.copy() if copy else array
        standard = attention.family.convert(raw, attention.dims)
        weights.update({standard_name(layer, role): standard[role] for role in WEIGHT_ROLES})
    return weights


def snapshot_source(
    attention, state_dict: dict, model_config: dict, name: str, copies: dict | None = None
):
    """The AttentionModel of a copy of `attention`'s parameters in `state_dict`, their own dtype
    and layout: one memcpy per tensor is all the training thread does for a snapshot (the writer
    reads the copy while the next steps move the parameters, and lays it out per head).
    `copies`: the tensors of an earlier copy that nothing reads any more, copied into and kept
    (fresh memory costs the training thread page faults, and freeing it interrupts the other
    cores' threads to flush their address translations)."""
    raw = {}
    for layer in attention.layer_indices:
        for tensor in attention.family.layer_names(layer, attention.config).values():
            key = attention.prefix + tensor
            live = state_dict[key].detach()
            copy = None if copies is None else copies.get(key)
            if copy is None or copy.shape != live.shape or copy.dtype != live.dtype:
                copy = live.clone()
                if copies is not None:
                    copies[key] = copy
            else:
                copy.copy_(live)
            raw[key] = copy
    return attention_from_state_dict(raw, model_config, name, frozen=True)
