"""README.md says what the code does: its Python examples (and docs/architecture.md's) run, its
transcripts match the commands' output, its command lines exist, and its first screen shows
`make demo` and `make test`."""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TEXT = README.read_text()
ARCHITECTURE = REPO / "docs" / "architecture.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
BLOCKS = PYTHON_BLOCK.findall(TEXT) + PYTHON_BLOCK.findall(ARCHITECTURE.read_text())


def _load_transcripts_module():
    spec = importlib.util.spec_from_file_location("transcripts", REPO / "docs" / "transcripts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


transcripts = _load_transcripts_module()
TRANSCRIPTS = transcripts.find_transcripts(TEXT)
FAST = [t for t in TRANSCRIPTS if not t.slow]


@pytest.fixture
def fine_tuned_minilm(tmp_path):
    """./my-finetuned-minilm, as the README assumes: MiniLM with its attention weights moved."""
    import torch
    from transformers import AutoModel

    from toolkit.sources import embedded_model_path

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(embedded_model_path())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".attention." in name:
                parameter.add_(0.01 * parameter.std() * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "my-finetuned-minilm")


def test_the_readme_has_python_examples():
    assert PYTHON_BLOCK.findall(TEXT)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread", "fine_tuned_minilm")
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs_and_its_shape_comments_hold(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "python example", "exec"), namespace)
    # `expr  # (12, 384, 32)`: a tuple in the comment is what the expression gives
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        claim = comment.split(":")[0].strip()
        if claim.startswith("(") and "=" not in code:
            assert eval(code, namespace) == ast.literal_eval(claim), line


def test_the_readme_is_at_most_400_lines():
    assert len(TEXT.splitlines()) <= 400


def test_make_demo_and_make_test_are_on_the_first_80x24_screen():
    screen_rows = 0
    for line in TEXT.splitlines():
        screen_rows += max(1, math.ceil(len(line) / 80))  # a long line wraps in a terminal
        if line.startswith("make test"):
            break
    assert "make demo" in TEXT.split("make test")[0]
    assert screen_rows <= 24


def format_signature(text: str) -> str:
    """The text with its numbers, spacing and table-rule lengths left out: what stays the same
    when the same command runs on another CPU (other round-off) or at another terminal width."""
    text = re.sub(r"[-+]?\d[\d,]*(\.\d+)?([eE][-+]?\d+)?%?", "#", text)
    text = re.sub(r"\s+", "", text)
    return re.sub(r"([━─═┏┓┗┛┡┩┳┻╇╈┃│┯┷┼#])\1+", r"\1", text)


def test_the_format_signature_ignores_numbers_and_widths_only():
    assert format_signature("│  7.15e-07 │ ok │\n  12,345  ━━━") == format_signature(
        "│ 1.07e-04 │ ok │ 9 ━"
    )
    assert format_signature("│ 7.15e-07 │ ok │") != format_signature("│ 7.15e-07 │ FAILED │")


def test_every_transcript_shows_its_own_command():
    assert len(TRANSCRIPTS) >= 4 and FAST
    for transcript in TRANSCRIPTS:
        assert transcript.body.startswith(f"$ {transcript.command}\n"), transcript.command


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("transcript", FAST, ids=[t.command for t in FAST])
def test_a_fast_transcript_matches_what_its_command_prints(transcript, tmp_path):
    # Numbers may differ in the last digits on another CPU, so the check is on the format.
    # The slow ones (a fine-tuning run and the commands that read it: minutes) are checked by
    # the option test below only; `python docs/transcripts.py` reruns them all.
    output = transcripts.shown(transcript, transcripts.run_command(transcript.command, tmp_path))
    shown = transcript.body.split("\n", 1)[1]
    assert format_signature(output) == format_signature(shown), (
        f"README's transcript of `{transcript.command}` no longer matches the command's output: "
        "run `python docs/transcripts.py`"
    )


def _shown_command_lines() -> list[str]:
    """Every `toolkit ...` command line the README shows: in code blocks and inline code."""
    lines = []
    for block in re.findall(r"^```(?:bash|console)\n(.*?)^```", TEXT, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.removeprefix("$ ").split("  #")[0].strip()
            if line.startswith("toolkit "):
                lines.append(line)
    lines += [code for code in re.findall(r"`([^`\n]+)`", TEXT) if code.startswith("toolkit ")]
    return lines


def _command_and_options(words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command a command line names, and the options given to it."""
    from toolkit.cli import main

    command, position = main, 0
    while isinstance(command, click.Group) and position < len(words):
        if words[position].startswith("-"):  # a group option such as --threads N
            option = next(o for o in command.params if words[position] in o.opts)
            position += 1 if option.is_flag else 2
            continue
        command = command.commands[words[position]]
        position += 1
    options = [word.split("=")[0] for word in words[position:] if word.startswith("--")]
    return command, options


@pytest.mark.parametrize("line", _shown_command_lines())
def test_every_command_line_shown_names_a_command_and_options_that_exist(line):
    words = [word for word in shlex.split(line)[1:] if word not in ("...", "…")]
    command, options = _command_and_options(words)
    known = {
        name for parameter in command.params for name in parameter.opts + parameter.secondary_opts
    }
    known |= {"--help"}
    for option in options:
        assert option in known, f"`{line}`: {command.name} has no option {option}"


def _make_recipe(target: str) -> str:
    """The commands of one Makefile target (the lines indented under `target:`)."""
    makefile = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \?= (.+)$", makefile, flags=re.M))
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)[1]
    return re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], m[0]), recipe)


def test_the_install_commands_shown_are_what_make_setup_runs():
    block = re.search(r"does this, quietly:\n\n```bash\n(.*?)```", TEXT, flags=re.S)[1]
    setup = _make_recipe("$(VENV)/.installed")
    shown = [line.split("#")[0].strip() for line in block.splitlines()]
    installs = [line.split("pip install ", 1)[1] for line in shown if "pip install " in line]
    assert installs == re.findall(r"\$\(PIP\) install (.+)", setup.replace('"', ""))
    assert shown[0].startswith("python3 -m venv .venv ") and "python3 -m venv .venv\n" in setup


def test_the_test_command_shown_is_what_make_test_and_ci_run():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "$(BIN)/python -m pytest" in _make_recipe("test")
    assert "`make test` then runs `.venv/bin/python -m pytest`" in TEXT


def test_a_benchmark_rerun_keeps_the_notes_moved_from_the_readme(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# old tables\n\n{bench_run.NOTES_MARKER}\n\nhow it was measured\n")
    assert bench_run.hand_written_notes(results) == (
        f"\n\n{bench_run.NOTES_MARKER}\n\nhow it was measured\n"
    )
    assert bench_run.hand_written_notes(tmp_path / "missing.md") == ""
    # the real file holds the notes below its tables, with the README's old benchmark figures
    notes = bench_run.hand_written_notes(REPO / "bench" / "RESULTS.md")
    assert "compare **23.4 s (2.2x)**" in notes and "(**1.31x**" in notes
