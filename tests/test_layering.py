"""The package's layering: no import cycle, and each layer imports only from layers below
it (README, Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"repfuse": ROOT / "repfuse", "repfuse.cli": ROOT / "cli",
           "repfuse.models": ROOT / "models"}

#: Layers bottom to top; a module may import its own layer and the ones listed before it.
LAYERS = [
    ("repfuse.errors", "repfuse.report", "repfuse.io", "repfuse.threads", "repfuse.pristine",
     "repfuse.heap"),
    ("repfuse.core",),
    ("repfuse.algebra",),
    ("repfuse.region",),
    ("repfuse.proofs",),
    ("repfuse.fx", "repfuse.onnx", "repfuse.optim", "repfuse.finetune"),
    ("repfuse.quant",),
    ("repfuse.api", "repfuse.models"),
    ("repfuse", "repfuse.cli"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("repfuse"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("repfuse")}
    return {m for m in found if m in known}


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (
                    best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, module
    return best[0]


def test_no_import_cycle():
    known = _modules()
    graph = {m: _imports(p, known) - {m} for m, p in known.items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [m, d]))
            if d not in state:
                visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_layers_import_only_downwards():
    known = _modules()
    upward = [f"{m} imports {d}" for m, p in known.items() for d in _imports(p, known)
              if _layer(d) > _layer(m)]
    assert upward == []
