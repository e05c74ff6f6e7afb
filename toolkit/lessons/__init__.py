"""Registry of `toolkit explain` lessons: each answers one of the student's questions with numbers
computed from the model at hand.

A lesson is a module in this package with one function `(attention, **options) -> result
dataclass`; its view lives in `toolkit.render.lessons`. Adding a lesson means one module here, one
presenter there, and one line in each registry.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

# lesson name -> "module:function"; imported on use so that the registry costs nothing to read.
LESSONS: dict[str, str] = {
    "w0": "toolkit.lessons.w0:explain_w0",
    "softmax": "toolkit.lessons.softmax:explain_softmax",
    "qkv": "toolkit.lessons.qkv:explain_qkv",
}


def lesson_function(name: str) -> Callable:
    module, function = LESSONS[name].split(":")
    return getattr(import_module(module), function)
