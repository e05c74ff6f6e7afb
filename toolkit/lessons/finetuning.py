"""What the lessons that fine-tune MODEL twice share: the starting model, the base settings of
both runs, and the folder the runs go to."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from toolkit.attention import AttentionModel, load_attention
from toolkit.errors import ToolkitError
from toolkit.training.recipe import FinetuneConfig


def lesson_start(
    lesson: str,
    model: str | None,
    *,
    steps: int,
    dataset: str,
    max_train_samples: int | None,
    max_eval_samples: int,
    batch_size: int,
    max_length: int,
    seed: int,
    revision: str | None,
    allow_pickle: bool,
    attention: AttentionModel | None,
) -> tuple[AttentionModel, FinetuneConfig]:
    """The model to start from and the settings both runs share.

    The task is classification, or causal-lm for a causal (GPT-2-family) model; training uses
    `max_train_samples` rows (default: steps * batch_size, one pass); tracking snapshots step 0
    and the last step.
    """
    if steps < 1:
        raise ToolkitError(f"--steps must be at least 1, not {steps}")
    attention = attention or load_attention(model, revision=revision, allow_pickle=allow_pickle)
    if attention.source.is_standard_file:
        raise ToolkitError(
            f"explain {lesson} fine-tunes the model: pass the model folder, not a standard-tensor "
            "file"
        )
    return attention, FinetuneConfig(
        model=str(attention.source.path),
        dataset=dataset,
        task="causal-lm" if attention.family.causal else "classification",
        max_steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        max_train_samples=max_train_samples or steps * batch_size,
        max_eval_samples=max_eval_samples,
        track_every=steps,  # the step-0 and the final snapshot
        log_every=steps,
    )


def check_runs_folder(folder: Path, runs: Sequence[str]) -> None:
    """`folder` can take the runs (folder/run for each): a clear error before any training."""
    if folder.exists() and not folder.is_dir():
        raise ToolkitError(f"--output-dir {folder} is a file: give a folder")
    taken = [run for run in runs if (folder / run).exists()]
    if taken:
        raise ToolkitError(
            f"{folder / taken[0]} already exists: choose another --output-dir for the two runs"
        )
