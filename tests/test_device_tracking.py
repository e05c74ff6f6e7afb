"""Shift tracking on the device (torch ops where the weights live) gives the numpy route's
numbers and snapshots: both run here on CPU tensors of tiny real models."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from toolkit.training.device_tracking import DeviceShiftTracker
from toolkit.training.tracking import ShiftTracker, SnapshotSchedule, Trajectory, snapshot_name


def _perturbed(model, seed: int) -> dict:
    """A copy of the state dict with every weight moved by noise of a different size per tensor."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (name, tensor) in enumerate(model.state_dict().items()):
        scale = 0.01 * (1 + index % 5)
        state[name] = tensor + scale * torch.randn(tensor.shape, generator=generator)
    return state


@pytest.mark.parametrize("family", ["bert-classifier", "gpt2-lm", "llama-gqa"])
def test_device_route_equals_numpy_route(
    family, tiny_bert_classifier, tiny_gpt2_lm_scaled, tiny_llama, tmp_path
):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if family == "bert-classifier":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_classifier)
    elif family == "gpt2-lm":
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm_scaled)
    else:  # grouped-query attention: wk, wv have fewer heads than wq, w0; no biases
        model = AutoModel.from_pretrained(tiny_llama)
    config = model.config.to_dict()
    runs = {}
    for name, tracker_class in (("numpy", ShiftTracker), ("device", DeviceShiftTracker)):
        folder = tmp_path / name
        folder.mkdir()
        trajectory = Trajectory(model="m", task="t")
        schedule = SnapshotSchedule(total_steps=6, track_every=3)  # snapshots at 0, 3 and 6
        tracker = tracker_class.begin(folder, model.state_dict(), config, trajectory, schedule)
        for step in (3, 6):
            tracker.flush()  # the writer is idle: step 6's snapshot is not skipped
            tracker.record(trajectory, step, _perturbed(model, step), 0.5, {})
        tracker.close()
        runs[name] = (folder, trajectory)
    (numpy_dir, expected), (device_dir, got) = runs["numpy"], runs["device"]
    assert [p.step for p in got.shift] == [0, 3, 6]
    for want, have in zip(expected.shift[1:], got.shift[1:], strict=True):
        for role in ("wq", "wk", "wv", "w0"):
            assert np.max(np.array(want.head_change[role])) > 0.01  # the noise moved every head
            # torch's reductions against numpy's on float32 weights: relative changes ~0.01 agree
            # to ~1e-7; atol 1e-6
            np.testing.assert_allclose(have.head_change[role], want.head_change[role], atol=1e-6)
            np.testing.assert_allclose(have.layer_change[role], want.layer_change[role], atol=1e-6)
    for step in (0, 3, 6):
        want = load_file(str(numpy_dir / snapshot_name(step)))
        have = load_file(str(device_dir / snapshot_name(step)))
        assert want.keys() == have.keys()
        for name in want:
            np.testing.assert_array_equal(have[name], want[name], err_msg=name)


def test_device_numbers_reach_their_points_later_and_all_by_close(tiny_llama, tmp_path):
    """The device route does not wait for a step's numbers: a point is filled in by a later
    record (here at once: CPU tensors are already on the host), a snapshot, or close; the
    trajectory file then holds every step's numbers, equal to the numpy route's."""
    import json

    from transformers import AutoModel

    from toolkit.training.tracking import TRAJECTORY_FILE

    model = AutoModel.from_pretrained(tiny_llama)
    config = model.config.to_dict()
    schedule = SnapshotSchedule(total_steps=8, track_every=1)  # snapshots at 0, 1, 2, 4, 8
    runs = {}
    for name, tracker_class in (("numpy", ShiftTracker), ("device", DeviceShiftTracker)):
        folder = tmp_path / name
        folder.mkdir()
        trajectory = Trajectory(model="m", task="t")
        tracker = tracker_class.begin(folder, model.state_dict(), config, trajectory, schedule)
        tracker.flush()
        for step in (3, 5, 6, 8):  # 8, the last, writes a snapshot and the trajectory file
            point = tracker.record(trajectory, step, _perturbed(model, step), 0.5, {})
            if tracker_class is DeviceShiftTracker and step != 8:
                # its own numbers come later; every earlier point's are in
                assert point.head_change == {}
                assert all(p.head_change for p in trajectory.shift[:-1])
        tracker.close()
        runs[name] = trajectory
    for want, have in zip(runs["numpy"].shift, runs["device"].shift, strict=True):
        for role in ("wq", "wk", "wv", "w0"):
            # torch's float64 sums against numpy's of the same float32 weights (see above)
            np.testing.assert_allclose(have.head_change[role], want.head_change[role], atol=1e-6)
    written = json.loads((tmp_path / "device" / TRAJECTORY_FILE).read_text())
    assert [bool(p["head_change"]) for p in written["shift"]] == [True] * 5
