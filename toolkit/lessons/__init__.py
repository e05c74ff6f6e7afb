"""Registry of `toolkit explain` lessons: each answers one of the student's questions with numbers
computed from the model at hand.

A lesson is a module in this package with one function `(attention, **options) -> result
dataclass`; its view lives in `toolkit.render.lessons`. Adding a lesson means one module here, one
presenter there, and one line in each registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import import_module

from toolkit.errors import LessonDoesNotApply, ToolkitError

# lesson name -> "module:function"; imported on use so that the registry costs nothing to read.
LESSONS: dict[str, str] = {
    "w0": "toolkit.lessons.w0:explain_w0",
    "softmax": "toolkit.lessons.softmax:explain_softmax",
    "qkv": "toolkit.lessons.qkv:explain_qkv",
    "pretrained": "toolkit.lessons.pretrained:explain_pretrained",
    "lora": "toolkit.lessons.lora:explain_lora",
}


@dataclass
class NotApplicable:
    """A lesson `explain all` left out: the model's attention has a feature it cannot show."""

    reason: str  # in English
    applies: bool = False
    key: str | None = None  # the reason in the lessons' prose, for the report's language
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def lesson_function(name: str) -> Callable:
    module, function = LESSONS[name].split(":")
    return getattr(import_module(module), function)


def explain_all(
    model: str | None = None,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    skip: Sequence[str] = (),
    on_lesson: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Every registered lesson but those in `skip`, with its defaults, on one model: name -> result
    (`NotApplicable`, with the reason, for a lesson the model's attention does not fit).

    `on_lesson(name)` is called before each lesson starts (the CLI advances a progress bar).
    """
    from toolkit.attention import load_attention

    unknown = sorted(set(skip) - set(LESSONS))
    if unknown:
        raise ToolkitError(f"no lesson {unknown[0]}: the lessons are {', '.join(LESSONS)}")
    attention = load_attention(model, revision=revision, allow_pickle=allow_pickle)
    results = {}
    for name in (name for name in LESSONS if name not in skip):
        if on_lesson is not None:
            on_lesson(name)
        try:
            results[name] = lesson_function(name)(attention=attention, allow_pickle=allow_pickle)
        except LessonDoesNotApply as err:
            results[name] = NotApplicable(str(err), key=err.key, values=err.values)
    return results
