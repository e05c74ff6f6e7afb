"""The one progress console: rich, on stderr, at the bottom layer so that computations (the
training loop, compare) show progress without importing the render layer."""

from __future__ import annotations

from functools import cache


@cache
def stderr_console():
    """The one rich console on stderr for progress bars: a bar started while another is live (the
    fine-tuning runs inside `explain all`) then nests under it instead of fighting over the line."""
    from rich.console import Console

    return Console(stderr=True)
