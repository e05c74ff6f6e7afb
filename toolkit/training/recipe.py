"""Fine-tuning settings: the `FinetuneConfig` dataclass, read from a YAML recipe or set by options.

A recipe is a flat YAML mapping whose keys are the field names below (`max_steps` or
`max-steps`); command-line options override recipe fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from toolkit.attention import WEIGHT_ROLES
from toolkit.errors import ToolkitError, close_match, first_line
from toolkit.sources import check_local_spec
from toolkit.training.data import local_data_file
from toolkit.training.models import CONFIG_SPECS

TASKS = ("classification", "causal-lm")
MIXED_PRECISION = ("no", "fp16", "bf16")
INITS = ("pretrained", "random")
METHODS = ("full", "lora")
# toolkit/recipes links to the repository's recipes/, so the recipes ship inside the wheel too
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs; `toolkit finetune --help` documents each field."""

    dataset: str | None = None
    output_dir: str | None = None
    model: str = "minilm"
    init: str = "pretrained"  # or "random": the checkpoint's architecture, freshly initialised
    task: str = "classification"
    dataset_config: str | None = None
    split: str = "train"
    text_column: str | None = None
    label_column: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    validation_fraction: float = 0.1
    # None: classification takes the training texts' 95th-percentile token length, causal-lm
    # 128-token blocks (training/defaults.py)
    max_length: int | None = None
    epochs: int | None = None  # None: enough for a minimum of steps (training/defaults.py)
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # None: the rule of training/defaults.py
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    fsdp: bool = False  # shard the model across processes (FSDP2); see training/sharding.py
    seed: int = 42
    compile: bool | None = None  # torch.compile the model; None: off (training/compiling.py)
    group_by_length: bool = False  # batches of similar length (less padding); classification
    # classification: weigh the loss by inverse class frequency; None: on when the largest class
    # holds more than half the training rows (training/defaults.py)
    class_weights: bool | None = None
    eval_every: int = 0  # 0: classification without max_steps evaluates each epoch
    # evaluations without a better macro-F1 before stopping (0: never stop early); None: 2 when
    # the run keeps its best model (training/defaults.py)
    early_stopping_patience: int | None = None
    track_every: int | None = None  # None: every 10 steps (tracking.TRACK_EVERY), capped
    snapshot_every: int = 0  # 0: snapshots at tracking.SnapshotSchedule's default steps only
    checkpoint_every: int = 0
    log_every: int = 10
    resume: bool = False
    description: str = ""
    method: str = "full"  # or "lora": frozen weights plus a trained (alpha/r)·B·A (peft)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "wq,wk,wv,w0"  # comma-separated roles, mapped per family to modules

    def with_overrides(self, **overrides) -> FinetuneConfig:
        """A copy with the given fields replaced; None means "not given" and keeps the field."""
        given = {name: value for name, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **given)


def load_recipe(path: str | Path) -> FinetuneConfig:
    """Read a YAML recipe: a file path, or the name of a recipe in `recipes/` (without .yaml)."""
    import yaml

    path = _recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ToolkitError(f"{path} is not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ToolkitError(
            f"{path} must be a mapping of settings (key: value), not {type(data).__name__}"
        )
    known = {f.name for f in fields(FinetuneConfig)}
    settings = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ToolkitError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; "
            f"known settings are {', '.join(sorted(known))}"
        )
    return FinetuneConfig(**{name: _checked(path, name, value) for name, value in settings.items()})


def list_recipes(folder: Path = RECIPES_DIR) -> list[tuple[str, FinetuneConfig]]:
    """(name, config) for each recipe in `folder`, sorted by name."""
    return [(path.stem, load_recipe(path)) for path in sorted(folder.glob("*.yaml"))]


def check_config(config: FinetuneConfig) -> FinetuneConfig:
    """Reject settings that cannot run, before any work: one clear message each.

    Cheap (no torch): the command line calls it before importing the training stack, so a bad
    value costs a fraction of a second. Values are checked before the missing settings, so that
    the value the user just typed is the one the message is about.
    """
    if config.task not in TASKS:
        raise ToolkitError(f"unknown task '{config.task}': choose {' or '.join(TASKS)}")
    if config.init not in INITS:
        raise ToolkitError(f"unknown init '{config.init}': choose {' or '.join(INITS)}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ToolkitError(
            f"unknown mixed precision '{config.mixed_precision}': "
            f"choose {', '.join(MIXED_PRECISION)}"
        )
    for name in ("batch_size", "gradient_accumulation_steps", "max_length", "log_every"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ToolkitError(
                f"{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}"
            )
    for name in ("epochs", "max_steps", "max_train_samples", "max_eval_samples"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ToolkitError(f"{name.replace('_', '-')} must be at least 1, not {value}")
    for name in ("eval_every", "track_every", "snapshot_every", "checkpoint_every"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ToolkitError(
                f"{name.replace('_', '-')} must be 0 (off) or a number of steps, not {value}"
            )
    for name in ("track_every", "snapshot_every"):  # the others may simply not fall in a run
        value = getattr(config, name)
        if value and config.max_steps and value > config.max_steps:
            raise ToolkitError(
                f"{name.replace('_', '-')} {value} is longer than the run's max-steps "
                f"{config.max_steps}: choose at most {config.max_steps}"
            )
    _check_patience(config)
    if config.snapshot_every and config.track_every == 0:
        raise ToolkitError("snapshot-every needs tracking: track-every is 0 (off)")
    if not 0 < config.validation_fraction < 1:
        raise ToolkitError(
            f"validation-fraction must be between 0 and 1, not {config.validation_fraction}"
        )
    if config.learning_rate is not None and config.learning_rate <= 0:
        raise ToolkitError(f"learning-rate must be positive, not {config.learning_rate}")
    if config.group_by_length and config.task != "classification":
        raise ToolkitError(
            "--group-by-length is for classification: causal-lm blocks are all --max-length long"
        )
    if config.method not in METHODS:
        raise ToolkitError(f"unknown method '{config.method}': choose {' or '.join(METHODS)}")
    if config.method == "lora":
        _check_lora(config)
    if not config.dataset:
        raise ToolkitError(
            "no dataset given: pass --dataset (a Hub name or a local file) or a recipe"
        )
    if not config.output_dir:
        raise ToolkitError("no output folder given: pass --output-dir DIR")
    local_data_file(config.dataset)
    if config.model.partition(":")[0] not in CONFIG_SPECS:  # a config spec names no files
        check_local_spec(config.model)
    return config


def lora_roles(config: FinetuneConfig) -> list[str]:
    """The roles of `--lora-targets` ("wq,wv" -> ["wq", "wv"]), in the standard order."""
    given = {role.strip().lower() for role in config.lora_targets.split(",") if role.strip()}
    unknown = sorted(given - set(WEIGHT_ROLES))
    if unknown or not given:
        raise ToolkitError(
            f"lora-targets '{config.lora_targets}' must name some of {', '.join(WEIGHT_ROLES)} "
            "(comma-separated, e.g. wq,wv)"
        )
    return [role for role in WEIGHT_ROLES if role in given]


def _check_patience(config: FinetuneConfig) -> None:
    """Early stopping needs a classification run counted in epochs (it keeps the best model)."""
    patience = config.early_stopping_patience
    if patience is None:
        return
    if patience < 0:
        raise ToolkitError(
            f"early-stopping-patience must be 0 (off) or a number of evaluations, not {patience}"
        )
    if patience and config.task != "classification":
        raise ToolkitError("--early-stopping-patience is for classification runs")
    if patience and config.max_steps:
        raise ToolkitError(
            "--early-stopping-patience needs a run counted in epochs: with --max-steps the run "
            "trains to that step and keeps its last model; drop one of them"
        )
    if patience and config.fsdp:
        raise ToolkitError("--early-stopping-patience does not work with --fsdp (no best model)")


def _check_lora(config: FinetuneConfig) -> None:
    if config.lora_rank < 1:
        raise ToolkitError(f"lora-rank must be at least 1, not {config.lora_rank}")
    if config.lora_alpha <= 0:
        raise ToolkitError(f"lora-alpha must be positive, not {config.lora_alpha}")
    if not 0 <= config.lora_dropout < 1:
        raise ToolkitError(f"lora-dropout must be in [0, 1), not {config.lora_dropout}")
    lora_roles(config)


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _checked(path: Path, name: str, value: object) -> object:
    """YAML gives str/int/float/bool: check each against the field's annotation.

    YAML 1.1 reads `5e-5` (no dot) as a string, so float fields also take numeric strings.
    """
    annotation = next(f.type for f in fields(FinetuneConfig) if f.name == name)
    base, _, optional = annotation.partition(" | ")
    if value is None and optional:
        return value
    if base == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and base != "bool" or not isinstance(value, _TYPES[base]):
        raise ToolkitError(f"{path}: {name} must be {base}, not {value!r}")
    return value


def _recipe_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{path}.yaml"
    if path.suffix == "" and named.is_file():
        return named
    names = [p.stem for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    near = close_match(str(path), names) if path.suffix == "" else None
    hint = f"did you mean '{near}'? " if near else ""
    raise ToolkitError(
        f"no recipe file {path}: {hint}give a YAML file or one of the recipes in {RECIPES_DIR}: "
        f"{', '.join(names) or 'none'} (see 'toolkit recipes')"
    )
