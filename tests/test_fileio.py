"""Output files and folders get the permissions plain open()/mkdir give under the user's umask."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import toolkit
from toolkit.fileio import atomic_folder, write_atomic, write_json
from toolkit.training.recipe import FinetuneConfig


@contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain_modes(tmp_path: Path) -> tuple[int, int]:
    """What open() and mkdir give under the current umask: the independent reference."""
    reference_file, reference_dir = tmp_path / "plain.txt", tmp_path / "plain"
    reference_file.write_text("x")
    reference_dir.mkdir()
    return _mode(reference_file), _mode(reference_dir)


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_atomic_writes_get_the_umask_permissions(mask, file_mode, dir_mode, tmp_path):
    tensors = {"a": np.zeros(3, dtype=np.float32)}
    with umask(mask):
        assert _plain_modes(tmp_path) == (file_mode, dir_mode)
        write_json(tmp_path / "data.json", {"a": 1})
        # safetensors itself writes owner-only (0600) files
        write_atomic(tmp_path / "t.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        with atomic_folder(tmp_path / "model") as folder:  # mkdtemp makes 0700 folders
            save_file(tensors, str(folder / "model.safetensors"))
            (folder / "sub").mkdir()
            (folder / "sub" / "notes.txt").write_text("x")
    assert _mode(tmp_path / "data.json") == file_mode
    assert _mode(tmp_path / "t.safetensors") == file_mode
    assert _mode(tmp_path / "model") == dir_mode
    assert _mode(tmp_path / "model" / "sub") == dir_mode
    assert _mode(tmp_path / "model" / "model.safetensors") == file_mode
    assert _mode(tmp_path / "model" / "sub" / "notes.txt") == file_mode


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_every_file_of_a_finetune_run_is_readable_by_others_under_umask_022(
    toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path
):
    run = tmp_path / "run"
    config = FinetuneConfig(
        model=str(tiny_bert_with_tokenizer),
        dataset=str(toy_sentiment_csv),
        output_dir=str(run),
        max_length=16,
        max_steps=3,
        track_every=1,
        checkpoint_every=2,
        max_eval_samples=8,
    )
    with umask(0o022):
        toolkit.finetune(config)
    written = list(run.rglob("*"))
    assert any(p.match("final/model.safetensors") for p in written)
    assert any(p.match("shift/step_*.safetensors") for p in written)
    assert any(p.match("checkpoints/step_*/model.safetensors") for p in written)
    wrong = {
        str(p.relative_to(run)): oct(_mode(p))
        for p in written
        if _mode(p) != (0o755 if p.is_dir() else 0o644)
    }
    assert wrong == {}
