"""The one exception type that carries a user-facing message."""


class ToolkitError(Exception):
    """Bad input or an unusable model: the message says what was wrong and what to do.

    The CLI prints it as one line on stderr and exits non-zero, without a traceback.
    """
