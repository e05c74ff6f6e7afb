"""`toolkit view`: gather a run's or a comparison's numbers, render them as one HTML page, write it.

Composes `toolkit.analysis.view_data` (the computation) with `toolkit.render.html_view` (the
page); the CLI, `compare --html` and the fine-tuning report call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from toolkit.analysis.compare import Comparison
from toolkit.analysis.view_data import comparison_view_data, run_view_data
from toolkit.fileio import check_output_path, write_atomic
from toolkit.render.html_view import render_view_html

VIEW_FILE = "view.html"  # a run's page, beside its report.md


def write_run_view(
    run_dir: str | Path, output: str | Path | None = None, texts: Sequence[str] | None = None
) -> Path:
    """Write the page of a fine-tuning run (default: RUN_DIR/view.html); return its path."""
    if output is not None:
        check_output_path(output)
    page = render_view_html(run_view_data(run_dir, texts))  # fails first when it is no run
    return _write(Path(output or Path(run_dir) / VIEW_FILE), page)


def write_comparison_view(
    comparison: Comparison,
    model_a: str | Path,
    model_b: str | Path,
    output: str | Path,
    texts: Sequence[str] | None = None,
) -> Path:
    """Write the page of `compare(model_a, model_b)`; return its path."""
    output = check_output_path(output)
    return _write(
        output, render_view_html(comparison_view_data(comparison, model_a, model_b, texts))
    )


def _write(path: Path, page: str) -> Path:
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path
