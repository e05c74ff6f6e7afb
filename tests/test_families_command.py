"""`toolkit families`: every registered architecture, by pattern, and the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.families import ARCHITECTURES

README = Path(__file__).resolve().parent.parent / "README.md"


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, ["families", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_every_architecture_is_listed_once_under_its_pattern():
    text = _run()
    for architecture in ARCHITECTURES:
        block = text.split(architecture.pattern.name + "\n", 1)[1].split("\n\n", 1)[0]
        listed = block.splitlines()[0].removeprefix("  architectures: ").split(", ")
        assert listed.count(architecture.name) == 1
    supported = {a.name for a in ARCHITECTURES if not a.refused}
    refused = {a.name for a in ARCHITECTURES if a.refused} - supported  # not just a variant
    assert f"{len(supported)} architectures" in text
    assert len(refused) <= 3


def test_markdown_has_one_row_per_pattern():
    rows = [line for line in _run("--markdown").splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len({a.pattern.name for a in ARCHITECTURES})
    listed = [name for row in rows for name in row.split(" | ")[1].split(", ")]
    assert sorted(listed) == sorted({a.name for a in ARCHITECTURES})


def test_readme_table_is_the_commands_output():
    """The README's block between the families markers is `toolkit families --markdown`
    (regenerate it with that command when the registry changes)."""
    block = re.search(
        r"<!-- families:begin -->\n(.*?)\n<!-- families:end -->", README.read_text(), re.S
    )
    if block is None:
        pytest.skip("README.md has no <!-- families:begin/end --> block yet")
    assert block.group(1).strip() == _run("--markdown").strip()
