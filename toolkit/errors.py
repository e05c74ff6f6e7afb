"""The one exception type that carries a user-facing message, and the "did you mean" hint."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ToolkitError(Exception):
    """Bad input or an unusable model: the message says what was wrong and what to do.

    The CLI prints it as one line on stderr and exits non-zero, without a traceback.
    """


class LessonDoesNotApply(ToolkitError):
    """A lesson whose numbers this model's attention cannot show as the lesson shows them (the
    softmax lesson's row on an ALiBi model): `explain all` says so in one line and goes on.

    The message is the English line; `key` and `values` name the same sentence in the lessons'
    prose (`toolkit.render.text`), so that a report in another language says it in that one."""

    def __init__(self, message: str, key: str | None = None, **values):
        super().__init__(message)
        self.key, self.values = key, values


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (at most `limit` characters), or its type's name when
    it has none: enough to say why inside a one-line ToolkitError."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def close_match(name: str, known: Iterable[str]) -> str | None:
    """The known name that `name` is clearly a typo of (case ignored), or None.

    The cutoff accepts one or two letters missing, extra or swapped in a short name
    ('minilmm', 'empthy') and nothing that merely shares a few letters ('gpt2' vs 'minilm').
    """
    by_lower = {k.lower(): k for k in known}
    found = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.8)
    return by_lower[found[0]] if found else None
