"""`toolkit finetune`: the training run, in three phases read top to bottom.

    prepare  data, tokenizer, model -> loaders, optimizer, scheduler (Accelerate) -> resume
    train    for each step: forward, backward, clip, step; on schedule: log, evaluate, track
             the shift, checkpoint (`Evaluation`, `Tracking`, `Checkpointing`, each owning
             its schedule and state)
             `BestModel` keeps the weights of the best evaluation and stops early
    finish   throughput, the final metrics; save DIR/final (the best evaluation's weights when
             kept, else the last step's) and the trajectory

Runs the same in one process or several (`torchrun --nproc_per_node N -m toolkit finetune ...`):
every process trains, the main process alone writes files. The run's report (DIR/report.md) is
composed above training, by `toolkit.workflows.finetune_with_report`. `--fsdp` shards the model
across the processes (training/sharding.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.fileio import give_plain_permissions, write_json
from toolkit.progress import stderr_console
from toolkit.training.baseline import (
    BASELINES_FILE,
    baseline_warning,
    check_labels,
    class_baselines,
    describe_baselines,
    learning_warning,
    majority_class,
    reference_baselines,
)
from toolkit.training.batching import LengthGroupedSampler
from toolkit.training.compiling import (
    WHEN_TO_COMPILE,
    compiler_missing,
    describe_fixed_shapes,
    dropped_rows,
    settle_forward_config,
)
from toolkit.training.data import (
    data_collator,
    group_for_causal_lm,
    load_text_data,
    tokenize_for_classification,
)
from toolkit.training.defaults import (
    SELECTION_METRIC,
    Selection,
    choose_class_weights,
    choose_max_length,
    choose_schedule,
    choose_selection,
    describe_schedule,
)
from toolkit.training.device_tracking import DeviceShiftTracker
from toolkit.training.lora import (
    ADAPTER_DIR,
    base_model,
    is_lora_model,
    merged_state_dict,
    save_adapter,
    trainable_parameters,
    wrap_with_lora,
)
from toolkit.training.models import (
    build_model,
    resolve_model,
    save_final,
    training_tokenizer,
)
from toolkit.training.recipe import FinetuneConfig, check_config
from toolkit.training.sharding import (
    accelerate_fsdp_plugin,
    check_sharding,
    checkpoint_shards,
    full_state_dict,
    shard_on_cpu,
)
from toolkit.training.throughput import model_flops_utilisation
from toolkit.training.tracking import (
    TRAJECTORY_FILE,
    ShiftTracker,
    SnapshotSchedule,
    Trajectory,
    snapshot_name,
)

METRICS_DIR = Path(__file__).resolve().parents[1] / "metrics"
TASK_METRICS = {"classification": ("accuracy", "f1"), "causal-lm": ("perplexity",)}
CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"  # written last: a checkpoint without it was cut short and is ignored
KEEP_CHECKPOINTS = 2
BEST_WEIGHTS = "best_model.safetensors"  # in a checkpoint: BestModel's weights
# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"resume", "output_dir", "log_every", "description", "checkpoint_every"}


@dataclass
class FinetuneResult:
    """What a run produced; paths are strings so that `to_dict()` is plain JSON."""

    output_dir: str
    final_dir: str
    report: str | None  # DIR/report.md once `finetune_with_report` wrote it; None from `finetune`
    trajectory: str  # DIR/shift/trajectory.json
    model: str
    task: str
    dataset: str
    steps: int
    resumed_from: int
    train_loss: float | None
    metrics: dict[str, float]
    processes: int
    seconds: float
    # Training throughput over every update after the first (a warm-up), tracking included,
    # evaluation and checkpoint writes excluded; None when fewer than two updates ran.
    train_samples_per_second: float | None
    train_tokens_per_second: float | None  # text tokens (padding excluded), same updates
    mfu: float | None  # model FLOP utilisation on CUDA (training/throughput.py), else None
    learning_rate: float
    epochs: int
    # The settings the default rule chose (training/defaults.py): name -> why; the others given.
    defaults: dict[str, str]
    compiled: bool  # torch.compile
    # The step-0 evaluation on the same rows (causal LM: the starting model's perplexity), or {}.
    start_metrics: dict[str, float]
    # False when the final model is no better than its baseline; `warning` then says so.
    learned: bool
    warning: str | None
    # The run's Trajectory in memory (not in to_dict: trajectory.json holds it). Complete on the
    # main process; on the others it lacks the shift points, which only the main process tracks.
    trajectory_record: Trajectory | None = field(default=None, repr=False, compare=False)
    method: str = "full"  # or "lora"
    trainable_parameters: int = 0  # what the optimizer updates (LoRA: B, A and the task head)
    total_parameters: int = 0
    adapter_dir: str | None = None  # LoRA: the adapter in PEFT format
    view: str | None = None  # DIR/view.html once `finetune_with_report` wrote it
    # Time the training thread spent in the shift tracker's record() (main process), and the
    # snapshots skipped because the previous one was still being written (trajectory: which).
    tracking_seconds: float = 0.0
    skipped_snapshots: int = 0
    # Classification: majority and bag_of_words scores on the same validation rows
    # (training/baseline.py), computed by the main process before training; else {}.
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    # The step whose weights final/ holds when the run kept its best evaluation (`metrics` are
    # that evaluation's), else None: final/ is the last step's model. `stopped_early`: training
    # ended before its last epoch because the metric stopped improving.
    best_step: int | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["trajectory_record"]
        return data


def finetune(config: FinetuneConfig | dict) -> FinetuneResult:
    """Fine-tune `config.model` on `config.dataset`, tracking how its Wq/Wk/Wv/W0 move.

    Writes what training owns into `config.output_dir`: config.json, checkpoints/, shift/
    (snapshots, trajectory.json) and final/ (the model). No report: see `finetune_with_report`.
    """
    config = check_config(FinetuneConfig(**config) if isinstance(config, dict) else config)
    started = time.perf_counter()
    run = _prepare(config)
    try:
        step, clock = _train(run)
        return _finish(run, step, clock, time.perf_counter() - started)
    finally:
        run.tracking.close()  # the last snapshot's write is over, whatever stopped the run


@dataclass
class PreparedRun:
    """Everything the train phase needs, built once by `_prepare`."""

    config: FinetuneConfig
    accelerator: object  # accelerate.Accelerator
    model: object  # prepared (wrapped, maybe compiled)
    tokenizer: object
    dataset: str  # where the data came from (FinetuneResult.dataset)
    train_loader: object
    optimizer: object
    scheduler: object
    schedule: object  # training/defaults.Schedule
    trajectory: Trajectory
    class_weights: list[float] | None  # a weighted loss (imbalanced labels), or None
    baselines: dict  # classification: majority and bag-of-words scores; else {}
    evaluation: Evaluation
    best: BestModel
    tracking: Tracking
    checkpointing: Checkpointing
    resume_step: int
    updates_per_epoch: int
    compiled: bool
    trainable_parameters: int
    total_parameters: int

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)


# ---------------------------------------------------------------------------------------------
# prepare: data, model, loaders, optimizer; resume; the step-0 evaluation and snapshot


def _prepare(config: FinetuneConfig) -> PreparedRun:
    """Build the run; nothing is written before the data and the model are known to load."""
    import torch
    from accelerate.utils import set_seed

    _quiet_libraries()
    run_dir = Path(config.output_dir)
    # --fsdp: Accelerate shards on GPUs; on CPU it would use DDP, so the model is sharded here.
    shard_here = config.fsdp and not torch.cuda.is_available()
    accelerator = _accelerator(config, shard_here)
    compiled = _compiled(config, accelerator.device.type)  # before anything is written
    # Data, tokenizer, model. The main process goes first so that dataset caches and a trained
    # tokenizer are written once and then reused by the others. Bad data or a bad model name
    # stops the run before it writes anything into the output folder.
    with accelerator.main_process_first():
        start = resolve_model(config.model)
        data = load_text_data(config)
    baselines = _classification_baselines(data, config, accelerator.is_main_process)
    checkpoint, resume_step = _resume_point(run_dir, config, accelerator)
    with accelerator.main_process_first():
        tokenizer = training_tokenizer(config, data.train["text"], run_dir, start)
        max_length = choose_max_length(
            config.max_length, config.task, tokenizer, data.train["text"]
        )
        config = replace(config, max_length=max_length[0])
        train_set, eval_set = _tokenized(config, data, tokenizer)
    majority, class_weights, weights_why = _label_balance(config, train_set, data.label_names)
    set_seed(config.seed)
    model, (trainable, total) = _model(config, tokenizer, data, start, shard_here, compiled)
    train_loader, eval_loader = _loaders(
        config, accelerator, tokenizer, train_set, eval_set, fixed_shapes=compiled
    )
    updates_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    schedule = choose_schedule(
        config.learning_rate,
        config.epochs,
        config.max_steps,
        d_model=model.config.hidden_size,
        pretrained=config.init == "pretrained" and start.pretrained_checkpoint,
        updates_per_epoch=updates_per_epoch,
        method=config.method,
        max_length=max_length,
        class_weights=weights_why,
    )
    selection = choose_selection(
        config.eval_every,
        config.early_stopping_patience,
        config.task,
        config.max_steps,
        config.fsdp,
        updates_per_epoch,
    )
    config = replace(config, eval_every=selection.eval_every)
    if accelerator.is_main_process:
        _announce(config, schedule, selection, compiled, len(train_set), accelerator.device.type)
    schedule.chosen.update(selection.chosen)  # the run's defaults, as FinetuneResult.defaults
    model, optimizer, scheduler = _optimization(config, accelerator, model, schedule, shard_here)
    if checkpoint:
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG states
    trajectory = _start_trajectory(run_dir / "shift", config, resume_step, accelerator)
    evaluation = Evaluation(accelerator, model, eval_loader, config, majority, trajectory, compiled)
    best = BestModel.start(accelerator, model, selection, trajectory, checkpoint)
    if config.task == "causal-lm" and not resume_step:  # the perplexity to beat
        evaluation.run(0)
    tracking = Tracking.start(
        accelerator, model, config, trajectory, resume_step, schedule.total_steps
    )
    return PreparedRun(
        config=config,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        dataset=data.source,
        train_loader=train_loader,
        optimizer=optimizer,
        scheduler=scheduler,
        schedule=schedule,
        trajectory=trajectory,
        class_weights=class_weights,
        baselines=baselines,
        evaluation=evaluation,
        best=best,
        tracking=tracking,
        checkpointing=Checkpointing(
            accelerator, run_dir, config.checkpoint_every, trajectory, best
        ),
        resume_step=resume_step,
        updates_per_epoch=updates_per_epoch,
        compiled=compiled,
        trainable_parameters=trainable,
        total_parameters=total,
    )


def _model(config: FinetuneConfig, tokenizer, data, start, shard_here: bool, compiled: bool):
    """The model to train (LoRA-wrapped, sharded on CPU, compiled as asked) and its (trainable,
    total) parameter counts, counted before sharding."""
    model = build_model(config, tokenizer, data.label_names, start)
    if config.method == "lora":
        model = wrap_with_lora(model, config)
    counts = trainable_parameters(model)
    if shard_here:
        model = shard_on_cpu(model)
    if compiled:
        settle_forward_config(model, config.task)
        model.compile()  # in place: parameter names and the state dict stay the same
    return model, counts


def _resume_point(run_dir: Path, config: FinetuneConfig, accelerator) -> tuple[Path | None, int]:
    """The checkpoint a run resumes from and its step (None, 0 for a new run); says so."""
    checkpoint = _open_run_dir(run_dir, config, accelerator)
    resume_step = json.loads((checkpoint / COMPLETE).read_text())["step"] if checkpoint else 0
    if accelerator.is_main_process and config.resume:
        stderr_console().print(
            _resume_line(run_dir, checkpoint, resume_step), highlight=False, markup=False
        )
    return checkpoint, resume_step


def _label_balance(config: FinetuneConfig, train_set, label_names):
    """(majority class, class weights or None, why the weights were chosen or None).

    The majority is the baseline every evaluation is read against: the most common TRAINING
    label; causal LM: (None, None, None)."""
    if config.task != "classification":
        return None, None, None
    class_weights, why = choose_class_weights(
        config.class_weights, train_set["labels"], len(label_names)
    )
    return majority_class(train_set["labels"]), class_weights, why


def _classification_baselines(data, config: FinetuneConfig, main: bool) -> dict:
    """Check the training labels (one class stops the run; a single-example class is warned
    about) and, on the main process, score the baselines before any training."""
    if config.task != "classification":
        return {}
    notes = check_labels(data.train["label"], data.label_names)
    if not main:
        return {}
    baselines = reference_baselines(
        data.train["text"],
        data.train["label"],
        data.validation["text"],
        data.validation["label"],
    )
    for line in [*(f"warning: {note}" for note in notes), describe_baselines(baselines)]:
        stderr_console().print(line, highlight=False, soft_wrap=True)
    return baselines


def _announce(
    config, schedule, selection: Selection, compiled: bool, rows: int, device_type: str
) -> None:
    """The schedule line, and what torch.compile changes (or when to turn it on)."""
    stderr_console().print(describe_schedule(schedule, selection), highlight=False)
    if compiled:
        dropped = dropped_rows(rows, config.batch_size)
        stderr_console().print(describe_fixed_shapes(config.max_length, dropped), highlight=False)
    elif config.compile is None and device_type == "cuda":
        stderr_console().print(WHEN_TO_COMPILE, highlight=False)


def _quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the new-head notice is expected for fine-tuning
    datasets.disable_progress_bars()  # one progress bar: the training steps
    transformers_logging.disable_progress_bar()
    # save_state drops GPT-2's tied lm_head.weight and warns each time; loading re-ties it.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def _accelerator(config: FinetuneConfig, shard_here: bool):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        # torchrun on a machine without GPUs: ask for CPU explicitly, or every process runs alone.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # A seeded sampler: the same data order in every process and every resumed run.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        fsdp_plugin=accelerate_fsdp_plugin() if config.fsdp and not shard_here else None,
    )
    if config.fsdp:
        check_sharding(accelerator, shard_here, config.mixed_precision)
    return accelerator


def _tokenized(config: FinetuneConfig, data, tokenizer):
    """(train rows, validation rows), tokenized for the task."""
    if config.task == "classification":
        return (
            tokenize_for_classification(data.train, tokenizer, config.max_length),
            tokenize_for_classification(data.validation, tokenizer, config.max_length),
        )
    return (
        group_for_causal_lm(data.train, tokenizer, config.max_length),
        group_for_causal_lm(data.validation, tokenizer, config.max_length),
    )


def _compiled(config: FinetuneConfig, device_type: str) -> bool:
    """Whether to torch.compile: only when asked (see compiling.WHEN_TO_COMPILE), and only with
    a compiler at hand."""
    if not config.compile:
        return False
    missing = compiler_missing(device_type)
    if missing:
        raise ToolkitError(
            f"--compile needs {missing}, which this machine lacks: install it, or drop --compile"
        )
    return True


def _loaders(
    config: FinetuneConfig, accelerator, tokenizer, train_set, eval_set, fixed_shapes: bool
):
    """The prepared (train, validation) loaders; `fixed_shapes` (torch.compile): every training
    batch `batch_size` x `max_length`, the partial last batch dropped."""
    import torch
    from torch.utils.data import DataLoader

    pad_to = config.max_length if fixed_shapes else None
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=_length_grouped(train_set, config) if config.group_by_length else None,
        shuffle=not config.group_by_length,
        collate_fn=data_collator(config.task, tokenizer, pad_to),
        drop_last=fixed_shapes and dropped_rows(len(train_set), config.batch_size) > 0,
        # its own generator: iterating never draws from the global (dropout) RNG
        generator=torch.Generator().manual_seed(config.seed),
        **_loading_off_the_training_thread(accelerator.device.type == "cuda"),
    )
    eval_collate = data_collator(config.task, tokenizer)
    eval_loader = DataLoader(eval_set, batch_size=config.batch_size, collate_fn=eval_collate)
    return accelerator.prepare(train_loader, eval_loader)


def _optimization(config: FinetuneConfig, accelerator, model, schedule, shard_here: bool):
    """(model, optimizer, scheduler), prepared; under CPU sharding the model stays outside."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay),
        lr=schedule.learning_rate,
        fused=accelerator.device.type in ("cpu", "cuda"),  # several times faster
    )
    # A prepared scheduler steps once per process per update, so count its steps that way.
    processes, total_steps = accelerator.num_processes, schedule.total_steps
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps) * processes, total_steps * processes
    )
    if shard_here:  # model and optimizer stay outside Accelerate; their shards go through DCP
        scheduler = accelerator.prepare(scheduler)
        checkpoint_shards(accelerator, model, optimizer)
        return model, optimizer, scheduler
    return accelerator.prepare(model, optimizer, scheduler)


# ---------------------------------------------------------------------------------------------
# train: forward, backward, step; on schedule: log, evaluate, track, checkpoint


def _train(run: PreparedRun) -> tuple[int, StepClock]:
    """The training loop; returns the last step and the throughput clock."""
    config, accelerator, trajectory = run.config, run.accelerator, run.trajectory
    total_steps = run.schedule.total_steps
    label = config.dataset + (" from random weights" if config.init == "random" else "")
    progress = _progress(accelerator.is_main_process, total_steps, run.resume_step, label)
    clock = StepClock()
    # Reading a loss waits for the device to finish the step; losses are read together when a
    # log line, evaluation, snapshot or checkpoint needs them, so the GPU keeps a queue of work.
    losses = UnreadLosses(trajectory, run.run_dir)
    step, step_loss = run.resume_step, None
    try:
        run.model.train()
        for epoch, batches in _epochs(run):
            micro_losses = []
            for batch in batches:
                clock.count(batch, accelerator.num_processes)
                update_loss = _micro_step(run, batch, micro_losses)
                if update_loss is None:  # accumulating: no update yet
                    continue
                step += 1
                losses.add(step, update_loss)
                # The first update's end starts the clock, so wait for the device to reach it.
                if (
                    not clock.started
                    or _loss_needed(config, step, total_steps)
                    or run.tracking.due(step, total_steps)
                ):
                    step_loss = losses.read()
                clock.update_done()
                progress.update(progress.task_ids[0], completed=step)
                if step % config.log_every == 0 or step == total_steps:
                    _log(
                        progress,
                        f"step {step}/{total_steps}  epoch {epoch + 1}  loss {step_loss:.4f}  "
                        f"lr {run.scheduler.get_last_lr()[0]:.2e}",
                    )
                evaluation = {}
                if run.evaluation.due(step, total_steps):
                    with clock.paused():
                        evaluation = run.evaluation.run(step)
                    _log(progress, run.evaluation.describe(step, evaluation))
                if evaluation:
                    with clock.paused():
                        run.best.consider(step, evaluation)
                stopping = run.best.stops()
                # a kept model's evaluations are tracked: final/ may be any of them
                if run.tracking.due(step, total_steps) or (evaluation and run.best.active):
                    run.tracking.run(step, step_loss, evaluation)
                if stopping:
                    _log(progress, run.best.describe_stop(step, epoch))
                    run.best.stopped_early = True
                    return step, clock
                if run.checkpointing.due(step, total_steps):
                    with clock.paused():
                        run.checkpointing.run(step, run.tracking)
                if step == total_steps:
                    return step, clock
    finally:
        progress.stop()
    return step, clock


def _epochs(run: PreparedRun):
    """(epoch, batches) from where the run starts; a resumed epoch skips the batches done."""
    accumulation = run.config.gradient_accumulation_steps
    start_epoch, updates_done = divmod(run.resume_step, run.updates_per_epoch)
    for epoch in range(start_epoch, run.schedule.epochs):
        run.train_loader.set_epoch(epoch)
        batches = run.train_loader
        if epoch == start_epoch and updates_done:
            batches = run.accelerator.skip_first_batches(
                run.train_loader, updates_done * accumulation
            )
            batches.set_epoch(epoch)
        yield epoch, batches


def _micro_step(run: PreparedRun, batch, micro_losses: list):
    """Forward and backward one batch; at the end of an accumulation, clip and step. Returns the
    update's loss (averaged over micro-batches and processes, left on the device), or None."""
    import torch

    accelerator, model = run.accelerator, run.model
    with accelerator.accumulate(model):
        loss = _training_loss(model, batch, run.class_weights)
        accelerator.backward(loss)
        micro_losses.append(loss.detach())
        # Step only when gradients sync: --fsdp on CPU uses a plain optimizer, which (unlike
        # Accelerate's) does not skip accumulation micro-steps by itself.
        if not accelerator.sync_gradients:
            return None
        update_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean")
        micro_losses.clear()
        accelerator.clip_grad_norm_(model.parameters(), run.config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return update_loss


# ---------------------------------------------------------------------------------------------
# finish: throughput, final metrics, the final model and the trajectory


def _finish(run: PreparedRun, step: int, clock: StepClock, seconds: float) -> FinetuneResult:
    """Write DIR/final (and the LoRA adapter) while the last snapshot is being written, then the
    trajectory; return the run's result."""
    config, accelerator, trajectory = run.config, run.accelerator, run.trajectory
    run_dir, shift_dir = run.run_dir, run.run_dir / "shift"
    # the clock stops with the last update and its record(): the last snapshot, a once-a-run
    # write like final/, is written by the tracker's thread while final/ is saved
    samples_per_second, tokens_per_second, mfu = clock.throughput(accelerator, run.model)
    final_step = run.best.step if run.best.step is not None else step
    trajectory.best_step = run.best.step
    final_metrics = next(
        {k: v for k, v in e.items() if k != "step"}
        for e in reversed(trajectory.evaluations)
        if e["step"] == final_step
    )
    start_metrics = next(
        (
            {k: v for k, v in e.items() if k != "step"}
            for e in trajectory.evaluations
            if not e["step"]
        ),
        {},
    )
    not_learned = learning_warning(final_metrics, start_metrics)
    behind = baseline_warning(final_metrics, run.baselines)
    warning = "; ".join(w for w in (not_learned, behind) if w) or None
    accelerator.wait_for_everyone()
    run.best.restore(step)  # final/ and the adapter hold the best evaluation's weights
    state_dict = _weights(accelerator, run.model)
    result = FinetuneResult(
        output_dir=str(run_dir),
        final_dir=str(run_dir / "final"),
        report=None,
        trajectory=str(shift_dir / TRAJECTORY_FILE),
        model=config.model,
        task=config.task,
        dataset=run.dataset,
        steps=step,
        resumed_from=run.resume_step,
        train_loss=trajectory.train_loss[-1][1] if trajectory.train_loss else None,
        metrics=final_metrics,
        processes=accelerator.num_processes,
        seconds=seconds,
        train_samples_per_second=samples_per_second,
        train_tokens_per_second=tokens_per_second,
        mfu=mfu,
        learning_rate=run.schedule.learning_rate,
        epochs=run.schedule.epochs,
        defaults=run.schedule.chosen,
        compiled=run.compiled,
        start_metrics=start_metrics,
        learned=not_learned is None,
        warning=warning,
        trajectory_record=trajectory,
        method=config.method,
        trainable_parameters=run.trainable_parameters,
        total_parameters=run.total_parameters,
        adapter_dir=str(run_dir / ADAPTER_DIR) if config.method == "lora" else None,
        tracking_seconds=run.tracking.seconds,
        skipped_snapshots=run.tracking.skipped,
        baselines=run.baselines,
        best_step=run.best.step,
        stopped_early=run.best.stopped_early,
    )
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        save_final(base_model(unwrapped), run.tokenizer, state_dict, run_dir / "final")
        if result.adapter_dir:
            save_adapter(unwrapped, run.tokenizer, Path(result.adapter_dir))
        run.tracking.close()  # its last write of the trajectory comes before the final one
        write_json(shift_dir / TRAJECTORY_FILE, trajectory.to_dict())
        if run.baselines:
            write_json(run_dir / BASELINES_FILE, run.baselines)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------
# the side work inside the train phase, each owning its schedule and state


class Evaluation:
    """Validation loss and metrics on schedule (`--eval-every`, and the last step), appended to
    the trajectory."""

    def __init__(self, accelerator, model, eval_loader, config, majority, trajectory, compiled):
        self.accelerator, self.model, self.eval_loader = accelerator, model, eval_loader
        self.every, self.task, self.majority = config.eval_every, config.task, majority
        self.metrics = _load_metrics(config.task)
        self.trajectory = trajectory
        self.compiled = compiled  # then evaluate eager: no graph for other shapes or no-grad

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == total_steps

    def run(self, step: int) -> dict[str, float]:
        import torch

        with torch.compiler.set_stance("force_eager" if self.compiled else "default"):
            evaluation = _evaluate(
                self.accelerator,
                self.model,
                self.eval_loader,
                self.metrics,
                self.task,
                self.majority,
            )
        self.trajectory.evaluations.append({"step": step, **evaluation})
        return evaluation

    @staticmethod
    def describe(step: int, evaluation: dict[str, float]) -> str:
        return f"eval at step {step}: " + "  ".join(
            f"{name} {value:.4f}" for name, value in evaluation.items()
        )


class Tracking:
    """The attention shift on schedule (`--track-every`, and the last step); the tracker (and
    its files) lives on the main process, but every process takes part in gathering weights."""

    def __init__(self, accelerator, model, schedule: SnapshotSchedule, trajectory, tracker):
        self.accelerator, self.model, self.schedule = accelerator, model, schedule
        self.trajectory, self.tracker = trajectory, tracker

    @classmethod
    def start(
        cls,
        accelerator,
        model,
        config: FinetuneConfig,
        trajectory,
        resume_step: int,
        total_steps: int,
    ):
        """Snapshot step 0 (or reload it when resuming); no tracker when tracking is off."""
        schedule = SnapshotSchedule.for_run(total_steps, config.track_every, config.snapshot_every)
        tracker = None
        if schedule.track_every:
            shift_dir = Path(config.output_dir) / "shift"
            tracker = _start_tracker(
                accelerator, model, shift_dir, trajectory, resume_step, schedule
            )
        return cls(accelerator, model, schedule, trajectory, tracker)

    def due(self, step: int, total_steps: int) -> bool:
        return self.schedule.tracks(step)

    @property
    def seconds(self) -> float:
        """Time the training thread spent in the tracker's record() (main process)."""
        return self.tracker.seconds if self.tracker is not None else 0.0

    @property
    def skipped(self) -> int:
        """Snapshots skipped because the previous one was still being written."""
        return self.tracker.skipped if self.tracker is not None else 0

    def run(self, step: int, loss: float, evaluation: dict[str, float]) -> None:
        state_dict = _weights(self.accelerator, self.model)  # every process, before the main one
        if self.tracker is not None:
            self.tracker.record(self.trajectory, step, state_dict, loss, evaluation)

    def flush(self) -> None:
        """Wait until every snapshot is on disk."""
        if self.tracker is not None:
            self.tracker.flush()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


class BestModel:
    """The evaluation with the best validation macro-F1 so far (equal ones: the lower validation
    loss; a small validation set often ties) and a CPU copy of its weights, and early stopping
    after `patience` evaluations without a better one.

    Patience counts only once the best model tells classes apart: a model that still answers
    one class for every row has learned nothing to keep yet, and small classifiers often sit
    there for several epochs before they learn (training/defaults.py).

    Every process keeps its own copy (each holds the whole model): the parameters' size in host
    memory, 91 MB for MiniLM's 22.7 M float32 parameters. A checkpoint saves it beside the
    training state (BEST_WEIGHTS), so a resumed run keeps the same best model. Inactive (keeps
    nothing, never stops) when the run keeps its last model (`Selection.keep_best`)."""

    def __init__(self, accelerator, model, selection: Selection):
        self.accelerator, self.model = accelerator, model
        self.active, self.patience = selection.keep_best, selection.patience
        self.step: int | None = None
        self.score = (-math.inf, -math.inf)  # (macro-F1, -validation loss)
        self.weights: dict | None = None
        self.waited = 0  # evaluations since the best one
        self.one_class = True  # the best model so far answers one class for every row
        self.stopped_early = False

    @classmethod
    def start(cls, accelerator, model, selection, trajectory, checkpoint: Path | None):
        """A new record, or the resumed run's: its evaluations so far, its best weights."""
        best = cls(accelerator, model, selection)
        if best.active and checkpoint is not None and (checkpoint / BEST_WEIGHTS).is_file():
            from safetensors.torch import load_file

            for evaluation in trajectory.evaluations:
                best._score(evaluation["step"], evaluation)
            best.weights = load_file(checkpoint / BEST_WEIGHTS)
        return best

    def _score(self, step: int, evaluation: dict[str, float]) -> bool:
        """Count one evaluation; whether it is the best so far (full ties keep the earlier)."""
        score = (evaluation[SELECTION_METRIC], -evaluation["eval_loss"])
        if score > self.score:
            self.step, self.score, self.waited = step, score, 0
            self.one_class = evaluation["top_prediction_share"] >= 1.0
            return True
        if not self.one_class:
            self.waited += 1
        return False

    def consider(self, step: int, evaluation: dict[str, float]) -> None:
        if self.active and self._score(step, evaluation):
            state = self.accelerator.unwrap_model(self.model).state_dict()
            self.weights = {name: t.detach().to("cpu", copy=True) for name, t in state.items()}

    def stops(self) -> bool:
        return self.active and self.patience > 0 and self.waited >= self.patience

    def describe_stop(self, step: int, epoch: int) -> str:
        return (
            f"stopping early at step {step} (epoch {epoch + 1}): validation macro-F1 has not "
            f"beaten step {self.step}'s {self.score[0]:.4f} in {self.waited} evaluations "
            f"(--early-stopping-patience {self.patience}); final/ holds step {self.step}"
        )

    def save(self, folder: Path) -> None:
        """Write the best weights into a checkpoint folder (main process)."""
        if self.weights is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.weights.items()}, folder / BEST_WEIGHTS)

    def restore(self, last_step: int) -> None:
        """Load the best weights back into the model, when they are not the last step's."""
        if self.weights is not None and self.step != last_step:
            self.accelerator.unwrap_model(self.model).load_state_dict(self.weights)


class Checkpointing:
    """Full training state every `--checkpoint-every` steps (never at the last: DIR/final is),
    with the best model so far."""

    def __init__(
        self, accelerator, run_dir: Path, every: int, trajectory: Trajectory, best: BestModel
    ):
        self.accelerator, self.run_dir, self.every = accelerator, run_dir, every
        self.trajectory, self.best = trajectory, best

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def run(self, step: int, tracking: Tracking) -> None:
        _save_checkpoint(self.accelerator, self.run_dir, step, self.trajectory, tracking, self.best)


class StepClock:
    """Training throughput over every update after the first (a warm-up), tracking included,
    evaluation and checkpoint writes (`paused()`) excluded. Token counts stay device tensors
    until `throughput()` reads them once."""

    def __init__(self):
        self.started_at: float | None = None
        self.paused_seconds = 0.0
        self.samples = self.tokens = 0  # timed updates
        self.update_samples = self.update_tokens = 0  # the update in progress

    @property
    def started(self) -> bool:
        return self.started_at is not None

    def count(self, batch, processes: int) -> None:
        self.update_samples += len(batch["labels"]) * processes
        self.update_tokens += _text_tokens(batch) * processes

    def update_done(self) -> None:
        """After the update (its loss read if needed): the first update starts the clock."""
        if self.started_at is None:
            self.started_at = time.perf_counter()
        else:
            self.samples += self.update_samples
            self.tokens += self.update_tokens
        self.update_samples = self.update_tokens = 0

    @contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - began

    def throughput(self, accelerator, model) -> tuple[float | None, float | None, float | None]:
        """(samples/s, text tokens/s, MFU on CUDA else None); all None before two updates."""
        import torch

        if not self.samples:
            return None, None, None
        seconds = time.perf_counter() - self.started_at - self.paused_seconds
        tokens_per_second = float(self.tokens) / seconds
        mfu = None
        if accelerator.device.type == "cuda":
            parameters = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
            device_name = torch.cuda.get_device_name(accelerator.device)
            mfu = model_flops_utilisation(parameters, tokens_per_second, device_name)
        return self.samples / seconds, tokens_per_second, mfu


class UnreadLosses:
    """(step, device loss) pairs not yet brought to the host; `read()` brings them in one
    transfer, records them in the trajectory and stops at the first NaN or infinity."""

    def __init__(self, trajectory: Trajectory, run_dir: Path):
        self.trajectory, self.run_dir = trajectory, run_dir
        self.unread: list = []

    def add(self, step: int, loss) -> None:
        self.unread.append((step, loss))

    def read(self) -> float:
        """The last step's loss."""
        import torch

        losses = torch.stack([loss for _, loss in self.unread]).tolist()
        steps = [step for step, _ in self.unread]
        self.unread.clear()
        for step, loss in zip(steps, losses, strict=True):
            _check_finite(loss, step, self.run_dir)
            self.trajectory.train_loss.append((step, loss))
        return losses[-1]


def _open_run_dir(run_dir: Path, config: FinetuneConfig, accelerator):
    """Check the output folder (new, or a run to resume); return the checkpoint to resume from."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ToolkitError(f"--output-dir {run_dir} is a file: give a folder")
    settings = run_dir / "config.json"
    holds_run = any(
        p.exists()
        for p in (run_dir / "shift" / TRAJECTORY_FILE, run_dir / CHECKPOINTS, run_dir / "final")
    )
    checkpoint = None
    if config.resume and settings.is_file():
        _check_same_run(json.loads(settings.read_text()), asdict(config), run_dir)
        checkpoint = latest_checkpoint(run_dir)
    elif holds_run:
        raise ToolkitError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another "
            "--output-dir"
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        if checkpoint is None:  # starting afresh: a tokenizer trained by an earlier start is stale
            shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
        (run_dir / "shift").mkdir(parents=True, exist_ok=True)
        write_json(settings, asdict(config))
    accelerator.wait_for_everyone()
    return checkpoint


def _check_same_run(before: dict, now: dict, run_dir: Path) -> None:
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
    if changed:
        name = changed[0]
        raise ToolkitError(
            f"{run_dir} was started with {name}={before.get(name)!r}, not {now[name]!r}: resume "
            "with the same settings (see its config.json), or start a new --output-dir"
        )


def _resume_line(run_dir: Path, checkpoint: Path | None, step: int) -> str:
    """What --resume does: the run, the step it continues from, the checkpoint it reads."""
    if checkpoint is None:
        return f"--resume: no complete checkpoint in {run_dir}; starting the run from step 0"
    return f"resuming run {run_dir} from step {step} (checkpoint {checkpoint})"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    complete = sorted((run_dir / CHECKPOINTS).glob(f"step_*/{COMPLETE}"))
    return complete[-1].parent if complete else None


def _start_trajectory(
    shift_dir: Path, config: FinetuneConfig, resume_step: int, accelerator
) -> Trajectory:
    """A new trajectory, or the resumed run's cut back to its checkpoint: no step appears twice."""
    if not resume_step:
        return Trajectory(model=config.model, task=config.task)
    trajectory = Trajectory.from_dict(json.loads((shift_dir / TRAJECTORY_FILE).read_text()))
    trajectory.truncate(resume_step)
    if (
        accelerator.is_main_process
    ):  # snapshots past the checkpoint belong to steps that will be redone
        for snapshot in shift_dir.glob("step_*.safetensors"):
            if snapshot.name > snapshot_name(resume_step):
                snapshot.unlink()
    return trajectory


def _start_tracker(accelerator, model, shift_dir, trajectory, resume_step, schedule):
    """Snapshot step 0 (or reload it when resuming); the tracker lives on the main process only."""
    model_config = accelerator.unwrap_model(model).config.to_dict()
    if resume_step:
        if accelerator.is_main_process:
            return _tracker_class(accelerator).resume(shift_dir, model_config, schedule)
        return None
    state_dict = _weights(accelerator, model)
    if accelerator.is_main_process:
        return _tracker_class(accelerator).begin(
            shift_dir, state_dict, model_config, trajectory, schedule
        )
    return None


def _tracker_class(accelerator) -> type[ShiftTracker]:
    """On CUDA the shift is measured on the GPU; elsewhere numpy measures it for free."""
    return DeviceShiftTracker if accelerator.device.type == "cuda" else ShiftTracker


def _weights(accelerator, model) -> dict:
    """The whole weights to track and save, complete on the main process; call it on EVERY
    process (under sharding it is a collective). A LoRA model gives its effective weights
    W + (alpha/r)·B·A under the base model's names."""
    unwrapped = accelerator.unwrap_model(model)
    if is_lora_model(unwrapped):
        return merged_state_dict(unwrapped)
    return full_state_dict(accelerator, model)


def _save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    trajectory: Trajectory,
    tracking: Tracking,
    best: BestModel,
) -> None:
    """Full training state in DIR/checkpoints/step_N; the marker file last; keep the newest two."""
    folder = run_dir / CHECKPOINTS / f"step_{step:06d}"
    if accelerator.is_main_process:
        tracking.flush()
        # The trajectory on disk must cover this step before the checkpoint counts.
        write_json(run_dir / "shift" / TRAJECTORY_FILE, trajectory.to_dict())
        shutil.rmtree(folder, ignore_errors=True)  # a partial one left by a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()  # every process's RNG state is written
    if accelerator.is_main_process:
        best.save(folder)
        give_plain_permissions(folder)  # safetensors writes owner-only files
        write_json(folder / COMPLETE, {"step": step})
        keep = {
            p.parent
            for p in sorted((run_dir / CHECKPOINTS).glob(f"step_*/{COMPLETE}"))[-KEEP_CHECKPOINTS:]
        }
        for old in (run_dir / CHECKPOINTS).glob("step_*"):
            if old not in keep:
                shutil.rmtree(old)


def _loss_needed(config: FinetuneConfig, step: int, total_steps: int) -> bool:
    """Whether this step logs, evaluates or checkpoints (and so needs its loss)."""
    every = (config.log_every, config.eval_every, config.checkpoint_every)
    return step == total_steps or any(n and step % n == 0 for n in every)


def _check_finite(loss: float, step: int, run_dir: Path) -> None:
    """Stop the run on a NaN or infinite loss, naming the checkpoint to resume from."""
    if not math.isfinite(loss):
        kept = latest_checkpoint(run_dir)
        where = (
            f"the last good checkpoint is {kept} (continue with --resume, after lowering "
            "--learning-rate)"
            if kept
            else "no checkpoint was written (see --checkpoint-every)"
        )
        raise ToolkitError(
            f"the training loss became {loss} at step {step}, so training stopped; {where}"
        )


def _parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices, none on biases and normalisation weights
    (LayerNorm's, and RMSNorm's: torch's or a model's own class such as LlamaRMSNorm)."""
    import torch

    no_decay = {
        id(p)
        for module in model.modules()
        if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm)
        or type(module).__name__.endswith("RMSNorm")
        for p in module.parameters()
    }
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def _load_metrics(task: str) -> dict:
    """The task's `evaluate` metrics, loaded by path from toolkit/metrics (no Hub access)."""
    import evaluate

    return {
        name: evaluate.load(str(METRICS_DIR / name / f"{name}.py"), keep_in_memory=True)
        for name in TASK_METRICS[task]
    }


def _evaluate(
    accelerator, model, eval_loader, metrics: dict, task: str, majority: int | None
) -> dict[str, float]:
    """Validation loss and the task's metrics, over the whole validation set on all processes;
    for classification also the baselines of the same rows (see training/baseline.py)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    model.eval()
    total_loss, total_count = 0.0, 0
    all_predictions, all_references = [], []
    for batch in eval_loader:
        with torch.no_grad():
            logits = model(**batch).logits.float()
        labels = batch["labels"]
        if task == "classification":
            losses = F.cross_entropy(logits, labels, reduction="none")  # [batch]
            predictions, references, losses = accelerator.gather_for_metrics(
                (logits.argmax(-1), labels, losses)
            )
            predictions, references = predictions.cpu().numpy(), references.cpu().numpy()
            for metric in metrics.values():
                metric.add_batch(predictions=predictions, references=references)
            all_predictions.append(predictions)
            all_references.append(references)
            total_loss += losses.sum().item()
            total_count += len(losses)
        else:
            # token t predicts token t+1: logits [batch, T-1, vocab] against labels [batch, T-1]
            token_nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"
            )
            counts = torch.full((len(labels),), labels.shape[1] - 1, device=labels.device)
            nll, counts = accelerator.gather_for_metrics((token_nll.sum(1), counts))
            metrics["perplexity"].add_batch(nll=nll.cpu().numpy(), tokens=counts.cpu().numpy())
            total_loss += nll.sum().item()
            total_count += counts.sum().item()
    model.train()
    results = {"eval_loss": total_loss / total_count}
    for metric in metrics.values():
        results.update(metric.compute())
    if task == "classification":
        results.update(
            class_baselines(
                np.concatenate(all_predictions), np.concatenate(all_references), majority
            )
        )
    return results


def _training_loss(model, batch, class_weights: list[float] | None):
    """The model's own loss, or (class weights given) cross-entropy weighted per class."""
    import torch
    import torch.nn.functional as F

    outputs = model(**batch)
    if class_weights is None:
        return outputs.loss
    weights = torch.tensor(class_weights, device=outputs.logits.device)
    return F.cross_entropy(outputs.logits.float(), batch["labels"], weight=weights)


def _text_tokens(batch):
    """The batch's text tokens, padding excluded (a device tensor: no wait for the device)."""
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


def _length_grouped(train_set, config: FinetuneConfig) -> LengthGroupedSampler:
    lengths = [len(ids) for ids in train_set["input_ids"]]
    return LengthGroupedSampler(lengths, config.batch_size, config.seed)


def _loading_off_the_training_thread(cuda: bool) -> dict:
    """DataLoader options: on CUDA, worker processes collate and pin the next batches while the
    GPU trains; on CPU the cores are busy training, and workers would only compete for them.

    The batch order is drawn in the main process (sampler), so workers change no number.
    """
    if not cuda:
        return {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after tokenizing
    return {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}


def _progress(main: bool, total: int, done: int, label: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn(f"fine-tuning on {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=not main,
    )
    progress.add_task("steps", total=total, completed=done)
    progress.start()
    return progress


def _log(progress, line: str) -> None:
    if not progress.disable:
        progress.console.print(line)
