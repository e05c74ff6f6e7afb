"""DIR/report.md of a fine-tuning run, with PNG plots of the attention shift and the loss.

Plots: relative change by layer over steps (one panel per weight), the final layer x head
heatmaps, and the training/validation loss with the task's metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.attention import WEIGHT_ROLES
from toolkit.fileio import write_atomic

if TYPE_CHECKING:
    from toolkit.analysis.compare import Comparison
    from toolkit.analysis.snapshot_intruders import SnapshotIntruders
    from toolkit.training.loop import FinetuneResult
    from toolkit.training.tracking import Trajectory

PLOTS = {
    "shift": "shift_by_layer.png",
    "heads": "final_head_shift.png",
    "loss": "loss.png",
    "intruders": "intruders_by_step.png",
}
TOP_HEADS = 5


def write_training_report(
    run_dir: Path,
    trajectory: Trajectory,
    result: FinetuneResult,
    start_vs_end: Comparison | None = None,
    intruders: list[SnapshotIntruders] | None = None,
) -> Path:
    """Write the plots and DIR/report.md; return the report's path.

    `start_vs_end`: the step-0 snapshot compared with the final model (its figures go into
    DIR/compare/); None when tracking was off. `intruders`: each snapshot's intruder dimensions
    against step 0 (`analysis.snapshot_intruders.run_intruders`), shown when there are any.
    """
    lines = [
        f"# Fine-tuning report: {result.model} on {result.dataset}",
        "",
        f"- task: {result.task}; {result.steps} optimizer steps on {result.processes} process(es), "
        f"{result.seconds:.0f} s"
        + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
        + (
            f"; {result.train_samples_per_second:.1f} training samples/s"
            if result.train_samples_per_second
            else ""
        )
        + (
            f", {result.train_tokens_per_second:.0f} tokens/s"
            if result.train_tokens_per_second
            else ""
        )
        + (f", MFU {result.mfu:.1%}" if result.mfu is not None else ""),
        f"- learning rate {result.learning_rate:.1e}, {result.epochs} epoch(s)"
        + "".join(
            f"; {name} from the default rule ({why})" for name, why in result.defaults.items()
        )
        + ("; torch.compile" if result.compiled else ""),
        f"- final training loss: {_number(result.train_loss)}",
        "- final validation: " + ", ".join(f"{k} {_number(v)}" for k, v in result.metrics.items()),
        *(
            [
                "- starting model on the same rows: "
                + ", ".join(f"{k} {_number(v)}" for k, v in result.start_metrics.items())
            ]
            if result.start_metrics
            else []
        ),
        *([f"- **Warning: {result.warning}**"] if result.warning else []),
        *_baseline_table(result),
        f"- final model: `{Path(result.final_dir).name}/`{_which_step(result)}; trajectory: "
        "`shift/trajectory.json`",
        "",
        "## Training",
        "",
        f"![loss and metrics]({_plot_loss(run_dir / PLOTS['loss'], trajectory)})",
        "",
    ]
    if trajectory.shift:
        lines += _shift_section(run_dir, trajectory)
        lines += _intruder_section(run_dir, intruders or [])
    else:
        lines += ["Shift tracking was off (--track-every 0).", ""]
    if start_vs_end is not None:
        lines.append(_start_vs_end_section(run_dir, result, start_vs_end))
    report = run_dir / "report.md"
    write_atomic(report, lambda tmp: tmp.write_text("\n".join(lines).rstrip() + "\n"))
    return report


def _start_vs_end_section(run_dir: Path, result: FinetuneResult, comparison: Comparison) -> str:
    """The full `toolkit compare` of the step-0 snapshot against the final model, with its
    figures in DIR/compare/ (every number is in DIR/compare.json)."""
    from toolkit.render.compare_plots import comparison_markdown
    from toolkit.training.tracking import snapshot_name

    start = run_dir / "shift" / snapshot_name(0)
    section = comparison_markdown(comparison, run_dir / "compare", link_base=run_dir)
    return "\n".join(
        [
            "## Start against end: `toolkit compare`",
            "",
            f"Every number below is in `compare.json`; rerun it with `toolkit compare "
            f"{start.relative_to(run_dir)} {Path(result.final_dir).name}` in this folder.",
            "",
            "#" + section,
        ]
    )  # its "## " heading nests one level down


def _shift_section(run_dir: Path, trajectory: Trajectory) -> list[str]:
    final = trajectory.final_point()
    lines = [
        "## How the attention weights moved",
        "",
        "Relative change against step 0: ||W_t - W_start||_F / ||W_start||_F, per layer (whole "
        f"matrix) and per head, measured at {len(trajectory.shift)} steps. "
        + _snapshots_sentence(trajectory),
        "",
        f"![relative change by layer]({_plot_shift(run_dir / PLOTS['shift'], trajectory)})",
        "",
        f"### At step {final.step}, by layer",
        "",
        "| layer | " + " | ".join(WEIGHT_ROLES) + " |",
        "|---|" + "---|" * len(WEIGHT_ROLES),
    ]
    for layer in range(trajectory.n_layers):
        lines.append(
            f"| {layer} | "
            + " | ".join(f"{final.layer_change[role][layer]:.4g}" for role in WEIGHT_ROLES)
            + " |"
        )
    lines += [
        "",
        f"![final per-head change]({_plot_heads(run_dir / PLOTS['heads'], trajectory)})",
        "",
        f"### Heads that moved most at step {final.step}",
        "",
        "| weight | layer | head | relative change |",
        "|---|---|---|---|",
    ]
    moved = sorted(
        (
            (change, role, layer, head)
            for role in WEIGHT_ROLES
            for layer, heads in enumerate(final.head_change[role])
            for head, change in enumerate(heads)
        ),
        reverse=True,
    )
    lines += [
        f"| {role} | {layer} | {head} | {change:.4g} |"
        for change, role, layer, head in moved[:TOP_HEADS]
    ]
    return lines + [""]


def _snapshots_sentence(trajectory: Trajectory) -> str:
    """Which steps have a snapshot in shift/, and which scheduled ones are missing and why."""
    steps = [str(step) for step, _ in trajectory.snapshots()]
    sentence = f"Snapshots of the standard tensors are in `shift/` (steps {', '.join(steps)})."
    missing = [f"{p.step} ({p.snapshot_missing})" for p in trajectory.shift if p.snapshot_missing]
    if missing:
        sentence += f" Missing: step {'; '.join(missing)}."
    return sentence


def _intruder_section(run_dir: Path, found: list[SnapshotIntruders]) -> list[str]:
    """Intruder dimensions of each snapshot against step 0
    (`analysis.snapshot_intruders.run_intruders`: empty unless the run ends with some)."""
    from toolkit.analysis.intruders import DEFAULT_EPSILON, DEFAULT_K

    if not found:
        return []
    lines = [
        "## Intruder dimensions",
        "",
        f"Singular vectors among each matrix's top {DEFAULT_K} with max |cos| < "
        f"{DEFAULT_EPSILON:g} to every singular vector of the same matrix at step 0 (Shuttleworth "
        "et al. 2024), summed over layers.",
        "",
        f"![intruders by step]({_plot_intruders(run_dir / PLOTS['intruders'], found)})",
        "",
        "| step | " + " | ".join(WEIGHT_ROLES) + " |",
        "|---|" + "---|" * len(WEIGHT_ROLES),
    ]
    lines += [
        f"| {point.step} | "
        + " | ".join(str(sum(point.counts[role])) for role in WEIGHT_ROLES)
        + " |"
        for point in found
    ]
    return lines + [""]


def _plot_intruders(path: Path, found: list) -> str:
    """Intruder dimensions summed over layers, one line per weight, against the step."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.4))
    steps = [point.step for point in found]
    for role in WEIGHT_ROLES:
        axis.plot(steps, [sum(point.counts[role]) for point in found], "o-", label=role)
    axis.set_xlabel("step")
    axis.set_ylabel("intruder dimensions (all layers)")
    axis.legend(fontsize="small")
    return _save(figure, path)


LEGEND_LAYERS = 8  # up to this many layers are named in a legend, more by a colour bar


def _plot_shift(path: Path, trajectory: Trajectory) -> str:
    """One panel per weight: relative change of each layer against the step."""
    plt = _pyplot()
    steps = [p.step for p in trajectory.shift]
    figure, axes = plt.subplots(
        1,
        len(WEIGHT_ROLES),
        figsize=(4 * len(WEIGHT_ROLES), 3.4),
        sharey=True,
        layout="constrained",
    )
    colors = plt.cm.viridis(
        [i / max(trajectory.n_layers - 1, 1) for i in range(trajectory.n_layers)]
    )
    for axis, role in zip(axes, WEIGHT_ROLES, strict=True):
        for layer in range(trajectory.n_layers):
            axis.plot(
                steps,
                [p.layer_change[role][layer] for p in trajectory.shift],
                color=colors[layer],
                label=f"layer {layer}",
            )
        axis.set_title(role)
        axis.set_xlabel("step")
    axes[0].set_ylabel("||W_t - W_start|| / ||W_start||")
    if trajectory.n_layers <= LEGEND_LAYERS:
        axes[-1].legend(fontsize="small")
    else:  # a legend of every layer would be taller than the panels: a colour bar of depth
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        depth = ScalarMappable(Normalize(0, trajectory.n_layers - 1), plt.cm.viridis)
        figure.colorbar(depth, ax=axes, label="layer", shrink=0.9)
    return _save(figure, path)


def _plot_heads(path: Path, trajectory: Trajectory) -> str:
    """One heatmap per weight: layer x head relative change of the final model."""
    plt = _pyplot()
    final = trajectory.final_point()
    top = max(max(max(row) for row in final.head_change[role]) for role in WEIGHT_ROLES) or 1.0
    figure, axes = plt.subplots(
        1, len(WEIGHT_ROLES), figsize=(3.6 * len(WEIGHT_ROLES), 3.4), layout="constrained"
    )
    for axis, role in zip(axes, WEIGHT_ROLES, strict=True):
        image = axis.imshow(final.head_change[role], vmin=0, vmax=top, cmap="magma", aspect="auto")
        axis.set_title(f"{role} at step {final.step}")
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
    figure.colorbar(image, ax=list(axes), label="relative change")
    return _save(figure, path)


def _plot_loss(path: Path, trajectory: Trajectory) -> str:
    """Training loss per step and validation loss; the task's metric on a second panel."""
    plt = _pyplot()
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 3.4))
    if trajectory.train_loss:
        steps, losses = zip(*trajectory.train_loss, strict=True)
        loss_axis.plot(steps, losses, lw=0.8, label="training loss")
    evaluations = trajectory.evaluations
    eval_steps = [e["step"] for e in evaluations]
    loss_axis.plot(eval_steps, [e["eval_loss"] for e in evaluations], "o-", label="validation loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy loss")
    loss_axis.set_title("training and validation loss")
    loss_axis.legend()
    for name in sorted({k for e in evaluations for k in e} - {"step", "eval_loss"}):
        metric_axis.plot(eval_steps, [e.get(name) for e in evaluations], "o-", label=name)
    metric_axis.set_xlabel("step")
    metric_axis.set_title("validation metrics")
    metric_axis.legend()
    return _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> str:
    """Save a figure atomically as PNG; return its file name (the report links it relatively)."""
    import matplotlib.pyplot as plt

    if not figure.get_constrained_layout():
        figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return path.name


def _which_step(result: FinetuneResult) -> str:
    """Which step final/ holds, when the run kept its best evaluation."""
    if result.best_step is None:
        return ""
    stopped = "; training stopped early" if result.stopped_early else ""
    return (
        f", the weights of step {result.best_step} of {result.steps} (the best validation "
        f"macro-F1{stopped}); the metrics above are that step's"
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _baseline_table(result: FinetuneResult) -> list[str]:
    """The fine-tuned model beside the majority class and the bag of words, same rows."""
    if not result.baselines or "accuracy" not in result.metrics:
        return []
    majority, words = result.baselines["majority"], result.baselines["bag_of_words"]
    rows = [
        ("always the most common training class", majority),
        ("bag of words (TF-IDF 1-2-grams + logistic regression)", words),
        ("fine-tuned model", result.metrics),
    ]
    return [
        "",
        "| on the validation rows | accuracy | macro-F1 |",
        "|---|---|---|",
        *(f"| {name} | {_number(r['accuracy'])} | {_number(r.get('f1'))} |" for name, r in rows),
        "",
    ]
