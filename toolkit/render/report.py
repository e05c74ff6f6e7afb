"""A report as a list of plain blocks (heading, paragraph, table, figure), shown in the terminal
with rich or written as Markdown with PNG figures beside it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from toolkit.fileio import write_atomic


@dataclass
class Heading:
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file name part: the PNG is <report stem>-<name>.png
    caption: str
    draw: Callable[[Path], None]  # writes a PNG to the given path


Block = Heading | Paragraph | Table | Figure


def print_blocks(blocks: Sequence[Block], console: Console) -> None:
    """Headings, prose and tables in the terminal; figures exist only in the Markdown report."""
    for block in blocks:
        if isinstance(block, Heading):
            console.rule(f"[bold]{escape(block.text)}[/bold]")
        elif isinstance(block, Paragraph):
            console.print(escape(block.text))
            console.print()
        elif isinstance(block, Table):
            table = RichTable(title=escape(block.title) if block.title else None)
            for i, column in enumerate(block.columns):
                table.add_column(escape(column), justify="left" if i == 0 else "right")
            for row in block.rows:
                table.add_row(*map(escape, row))
            console.print(table)


def write_markdown(blocks: Sequence[Block], path: str | Path) -> list[Path]:
    """Write the report to `path` and its figures beside it, each atomically; return the figures."""
    path = Path(path)
    lines: list[str] = []
    figures: list[Path] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f"## {block.text}", ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            if block.title:
                lines += [f"**{block.title}**", ""]
            lines.append("| " + " | ".join(block.columns) + " |")
            lines.append("|:---|" + "---:|" * (len(block.columns) - 1))
            lines += [
                "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                for row in block.rows
            ]
            lines.append("")
        elif isinstance(block, Figure):
            figure = path.with_name(f"{path.stem}-{block.name}.png")
            write_atomic(figure, block.draw)
            figures.append(figure)
            lines += [f"![{block.caption}]({figure.name})", "", f"*{block.caption}*", ""]
    write_atomic(path, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
    return figures
