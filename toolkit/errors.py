"""The one exception type that carries a user-facing message."""


class ToolkitError(Exception):
    """Bad input or an unusable model: the message says what was wrong and what to do.

    The CLI prints it as one line on stderr and exits non-zero, without a traceback.
    """


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (at most `limit` characters), or its type's name when
    it has none: enough to say why inside a one-line ToolkitError."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
