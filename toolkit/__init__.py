"""Look inside the attention of real pretrained Transformers.

The public API is imported lazily so that `toolkit --help` starts without loading torch.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "load_attention": "toolkit.attention",
    "AttentionModel": "toolkit.attention",
    "AttentionLayer": "toolkit.attention",
    "inspect_model": "toolkit.analysis.summary",
    "extract": "toolkit.analysis.summary",
    "verify": "toolkit.analysis.verify",
    "compare": "toolkit.analysis.compare",
    "Comparison": "toolkit.analysis.compare",
    "explain_w0": "toolkit.lessons.w0",
    "explain_softmax": "toolkit.lessons.softmax",
    "explain_qkv": "toolkit.lessons.qkv",
    "explain_pretrained": "toolkit.lessons.pretrained",
    "explain_lora": "toolkit.lessons.lora",
    "intruder_dimensions": "toolkit.analysis.intruders",
    "explain_all": "toolkit.lessons",
    "ToolkitError": "toolkit.errors",
    "finetune": "toolkit.training.loop",
    "finetune_with_report": "toolkit.workflows",
    "FinetuneConfig": "toolkit.training.recipe",
    "FinetuneResult": "toolkit.training.loop",
    "load_recipe": "toolkit.training.recipe",
}

__all__ = sorted(_PUBLIC)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
