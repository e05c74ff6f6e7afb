"""Functions that compose a computation with its rendering: a fine-tuning run and its report
and interactive page.

They live above both layers (training returns results, render formats them), so that neither
imports the other.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.training.loop import FinetuneResult, finetune
from toolkit.training.recipe import FinetuneConfig


def finetune_with_report(config: FinetuneConfig | dict) -> FinetuneResult:
    """`toolkit finetune`: `toolkit.finetune(config)`, then on the main process the report.

    The report: the step-0 snapshot compared with the final model (every number in
    DIR/compare.json, figures in DIR/compare/), plots of the shift and the loss, and
    DIR/report.md, whose path is set as `result.report`; then DIR/view.html, the same numbers as
    one interactive page (`result.view`; it reads compare.json, so it comes second).
    """
    from accelerate import PartialState

    from toolkit.view import write_run_view

    result = finetune(config)
    if PartialState().is_main_process:
        result.report = str(write_finetune_report(result))
        result.view = str(write_run_view(result.output_dir))
    return result


def write_finetune_report(result: FinetuneResult) -> Path:
    """Compare the run's step-0 snapshot with its final model and write DIR/report.md."""
    from toolkit.analysis.compare import compare
    from toolkit.analysis.snapshot_intruders import run_intruders
    from toolkit.fileio import write_json
    from toolkit.render.training_report import write_training_report
    from toolkit.training.tracking import snapshot_name

    run_dir = Path(result.output_dir)
    trajectory = result.trajectory_record
    start = run_dir / "shift" / snapshot_name(0)
    comparison, intruders = None, []
    if start.is_file():  # tracking was on
        comparison = compare(start, result.final_dir)
        write_json(run_dir / "compare.json", comparison.to_dict())
        intruders = run_intruders(run_dir / "shift", trajectory.snapshots())
    return write_training_report(run_dir, trajectory, result, comparison, intruders)
