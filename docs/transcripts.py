"""The README's command transcripts: find them, run their commands, write the output back.

A transcript in README.md is a console block between two markers:

    <!-- transcript: toolkit inspect --layer 0 -->
    ```console
    $ toolkit inspect --layer 0
    ...what the command printed...
    ```
    <!-- /transcript -->

`python docs/transcripts.py` runs every command, in README order, in one scratch folder (so a
later command can read what an earlier one wrote, e.g. a fine-tuning run), and rewrites the blocks
in place. `<!-- transcript slow: ... -->` marks a command of a minute or more (fine-tuning) or one
that reads a slow command's output; `--fast` reruns only the others and keeps the recorded output
of slow ones; `--only TEXT` reruns only those whose command contains TEXT. tests/test_readme.py
reruns the fast ones and checks the README still shows their output format.
`<!-- transcript slow, first N lines: ... -->` shows only the first N lines of a long output and
says how many more the command prints.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The width the transcripts are rendered at: wide enough for the tables, narrow enough to read
# on GitHub without scrolling.
COLUMNS = 100
TRANSCRIPT = re.compile(
    r"<!-- transcript(?P<slow> slow)?(?:, first (?P<lines>\d+) lines)?: (?P<command>.+?) -->\n"
    r"```console\n(?P<body>.*?)```\n<!-- /transcript -->",
    flags=re.S,
)


@dataclass(frozen=True)
class Transcript:
    command: str  # as shown, starting with "toolkit"
    slow: bool
    lines: int | None  # show only the first `lines` lines of the output, or all (None)
    body: str  # the block's text: "$ command" and the output lines
    span: tuple[int, int]  # where the whole marked block lies in the README's text


def find_transcripts(text: str) -> list[Transcript]:
    """Every marked transcript block of a README's text, in order."""
    return [
        Transcript(
            m["command"],
            bool(m["slow"]),
            int(m["lines"]) if m["lines"] else None,
            m["body"],
            m.span(),
        )
        for m in TRANSCRIPT.finditer(text)
    ]


def run_command(command: str, workdir: Path) -> str:
    """What `command` prints (stdout and stderr together), run in `workdir` with this checkout."""
    program, *arguments = shlex.split(command)
    if program != "toolkit":
        raise ValueError(f"a transcript runs a toolkit command, not {program!r}")
    env = {
        **os.environ,
        "COLUMNS": str(COLUMNS),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "LANG": "C.UTF-8",  # the lessons' language follows the locale: English here
    }
    env.pop("LC_ALL", None)
    env.pop("LC_MESSAGES", None)
    done = subprocess.run(
        [sys.executable, "-m", "toolkit", *arguments],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # in the order a terminal shows them
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`{command}` exited {done.returncode}:\n{done.stdout}")
    output = done.stdout
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines()) + "\n"


def shown(transcript: Transcript, output: str) -> str:
    """The part of `output` the README shows: all of it, or its first lines and a count of the
    rest."""
    lines = output.splitlines()
    if transcript.lines is None or len(lines) <= transcript.lines:
        return output
    rest = len(lines) - transcript.lines
    return "\n".join([*lines[: transcript.lines], f"… ({rest} more lines)"]) + "\n"


def block_body(transcript: Transcript, output: str) -> str:
    return f"$ {transcript.command}\n{shown(transcript, output)}"


def rewrite(text: str, bodies: dict[int, str]) -> str:
    """The README's text with transcript number i's body replaced by bodies[i]."""
    pieces, position = [], 0
    for index, transcript in enumerate(find_transcripts(text)):
        start, end = transcript.span
        pieces.append(text[position:start])
        slow = (" slow" if transcript.slow else "") + (
            f", first {transcript.lines} lines" if transcript.lines else ""
        )
        body = bodies.get(index, transcript.body)
        pieces.append(
            f"<!-- transcript{slow}: {transcript.command} -->\n```console\n{body}```\n"
            "<!-- /transcript -->"
        )
        position = end
    return "".join(pieces) + text[position:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="keep the slow transcripts as they are")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="rerun only the transcripts whose command contains TEXT (in README order, in one "
        "scratch folder: a run and the commands that read it), keeping the others as they are",
    )
    options = parser.parse_args()
    text = README.read_text()
    bodies = {}
    with tempfile.TemporaryDirectory(prefix="readme-transcripts-") as workdir:
        for index, transcript in enumerate(find_transcripts(text)):
            if options.fast and transcript.slow:
                continue
            if options.only and options.only not in transcript.command:
                continue
            print(f"running: {transcript.command}", file=sys.stderr, flush=True)
            try:
                output = run_command(transcript.command, Path(workdir))
            except (RuntimeError, ValueError) as error:  # the README is left as it was
                sys.exit(f"error: {error}")
            bodies[index] = block_body(transcript, output)
    README.write_text(rewrite(text, bodies))
    print(f"rewrote {len(bodies)} transcripts in {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
