"""The rich consoles: output that wraps only on a terminal, and the one progress console on stderr,
at the bottom layer so that computations (the training loop, compare) show progress without
importing the render layer."""

from __future__ import annotations

import os
from functools import cache

from rich.console import Console

# Columns for tables when the output is a pipe or a file (rich would assume 80 and cut wide tables
# of numbers); COLUMNS, when set, still wins.
UNWRAPPED_WIDTH = 160


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that breaks lines only for a terminal: into a pipe or
    a file each printed line stays one line (soft wrap), so grep and diff see whole sentences."""
    terminal = Console(stderr=stderr)
    if terminal.is_terminal:
        return terminal
    width = None if os.environ.get("COLUMNS") else UNWRAPPED_WIDTH
    return Console(stderr=stderr, width=width, soft_wrap=True)


@cache
def stderr_console() -> Console:
    """The one rich console on stderr for progress bars: a bar started while another is live (the
    fine-tuning runs inside `explain all`) then nests under it instead of fighting over the line."""
    return console(stderr=True)


def transient_progress():
    """A rich Progress on stderr that clears itself when done; disabled where stderr is not a
    terminal (a log or a pipe), where it would only leave a blank line behind."""
    from rich.progress import Progress

    console = stderr_console()
    return Progress(console=console, transient=True, disable=not console.is_terminal)
