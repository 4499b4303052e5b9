"""The layering of docs/architecture.md, read from the imports: no module imports a higher layer, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "onebox"

# Lowest first; a module may import its own layer or lower ones (docs/architecture.md).
LAYERS = [
    {"errors", "files", "display"},
    {"config", "presets", "device", "host", "tokenizer", "chat"},
    {"distributed", "launch", "model", "rope", "moe"},
    {"data", "checkpoint", "export", "families", "memory", "optim", "adamw", "lowmem", "transforms", "lora"},
    {"plan", "runs"},
    {"training", "infer"},
    {"serve"},
    {"bench"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        name = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onebox."):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("onebox."))
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else module
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it there and to LAYERS")


def test_every_module_imports_only_its_layer_or_lower_ones():
    graph = _imports()
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module != "onebox"
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not wrong, wrong


def test_the_imports_have_no_cycles():
    graph = _imports()
    known = set(graph)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            target = target if target in known else target.rsplit(".", 1)[0]  # `from onebox.x import name`
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, module, target])}")
            if state.get(target) is None and target in known:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [])


def test_a_violation_and_a_cycle_would_be_found(monkeypatch):
    import pytest

    this = __import__(__name__)
    monkeypatch.setattr(this, "_imports", lambda: {"onebox.model": {"onebox.training"}, "onebox.training": set()})
    with pytest.raises(AssertionError, match="onebox.model -> onebox.training"):
        test_every_module_imports_only_its_layer_or_lower_ones()
    monkeypatch.setattr(
        this,
        "_imports",
        lambda: {
            "onebox.data": {"onebox.export"},
            "onebox.export": {"onebox.checkpoint"},
            "onebox.checkpoint": {"onebox.data"},
        },
    )
    with pytest.raises(AssertionError, match="import cycle"):
        test_the_imports_have_no_cycles()
