"""The package's layers (STYLE.md): data flows one way, and nothing below render imports it.

Every `import` in toolkit/ is read with `ast`, those inside functions included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import toolkit

PACKAGE = Path(toolkit.__file__).parent
# Bottom to top; a module may import its own layer and the ones below, never one above.
LAYERS = [
    ("toolkit.errors", "toolkit.safetensors_format", "toolkit.fileio", "toolkit.progress"),
    ("toolkit.layout",),
    ("toolkit.threads",),
    (
        "toolkit.sources",
        "toolkit.checkpoint",
        "toolkit.gguf_checkpoint",
        "toolkit.gguf_model",
        "toolkit.families",
    ),
    ("toolkit.attention",),
    ("toolkit.runtime", "toolkit.analysis", "toolkit.training", "toolkit.lessons"),
    ("toolkit.render",),
    ("toolkit.workflows", "toolkit.view"),
    ("toolkit.cli", "toolkit.__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if "metrics" not in path.relative_to(PACKAGE).parts  # loaded by path, never imported
    }


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The toolkit modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            # `from toolkit.render import figures` imports the module toolkit.render.figures
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def _layer(name: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(name, path, modules) for name, path in modules.items() if name != "toolkit"
    }


def test_every_import_goes_down_or_sideways():
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if target != "toolkit" and _layer(target) > _layer(name)
    )
    assert upward == []


def test_nothing_below_render_imports_render_or_cli():
    top = ("toolkit.render", "toolkit.workflows", "toolkit.cli")
    reaching_up = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if _layer(name) < _layer("toolkit.render")
        for target in targets
        if target.startswith(top)
    )
    assert reaching_up == []


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                return [*path, name, target]
            if target not in state and (cycle := visit(target, [*path, name])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            assert visit(name, []) is None


def test_importing_the_training_loop_loads_no_render_module():
    code = (
        "import sys, toolkit.training.loop\n"
        "print(sorted(m for m in sys.modules if m.startswith(('toolkit.render', 'toolkit.cli'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(PACKAGE.parent), "OMP_NUM_THREADS": "1"},
    )
    assert done.stdout.strip() == "[]"
