"""The import contract: evalkit's modules form layers that import only downward, with no circles.

The layers are those of the README's code map, top to bottom. A module may import modules of its
own layer or of any layer below; an import of a higher layer, or any import circle (lazy imports
inside functions and TYPE_CHECKING imports included), fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "evalkit"

# Top to bottom. An entry names a module or a package (every module under it not named itself).
LAYERS: list[list[str]] = [
    ["evalkit.__main__", "evalkit.testing"],
    ["evalkit.cli"],
    ["evalkit.runner"],
    ["evalkit.results"],  # score and write
    ["evalkit.rounds"],
    ["evalkit.merge"],
    ["evalkit.execute", "evalkit.monitor"],
    ["evalkit.plan"],
    [
        "evalkit.preflight",
        "evalkit.identity",
        "evalkit.outdir",
        "evalkit.output_lock",
        "evalkit.model_source",
        "evalkit.planner",
        "evalkit.vision_shape",
    ],
    ["evalkit.models.registry"],
    ["evalkit.config"],
    ["evalkit.tasks", "evalkit.sandbox", "evalkit.compat", "evalkit.code_exec", "evalkit.judge"],
    ["evalkit.models"],
    ["evalkit.parallel"],
    [
        "evalkit.errors",
        "evalkit.report",
        "evalkit.timings",
        "evalkit.sharding",
        "evalkit.shards",
        "evalkit.bundled_tasks",
        "evalkit.code_child",
    ],
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every evalkit module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "evalkit":
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "evalkit")
    return found - {"evalkit", "evalkit.models", "evalkit.tasks"}  # package inits hold nothing


def layer_of(module: str) -> int:
    """The layer of the longest entry that names ``module`` or a package above it."""
    best, depth = None, -1
    for number, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = number, entry.count(".")
    assert best is not None, f"{module} is in no layer; add it to LAYERS (and the README's code map)"
    return best


def graph() -> dict[str, set[str]]:
    names = module_names()
    edges = {name: imports_of(path, set(names)) - {name} for name, path in names.items()}
    return {name: targets for name, targets in edges.items() if name not in PACKAGE_INITS}


PACKAGE_INITS = ("evalkit", "evalkit.models", "evalkit.tasks")


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return found


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_no_upward_imports():
    assert upward_imports(graph()) == []


def test_no_import_circles():
    assert circles(graph()) == []


def test_the_contract_catches_an_upward_import_and_a_circle():
    edges = graph()
    planted = {**edges, "evalkit.config": edges["evalkit.config"] | {"evalkit.runner"}}
    assert upward_imports(planted) == ["evalkit.config (layer 10) imports evalkit.runner (layer 2)"]
    looped = {**edges, "evalkit.tasks.images": edges["evalkit.tasks.images"] | {"evalkit.tasks.requests"}}
    assert [set(circle) for circle in circles(looped)] == [{"evalkit.tasks.images", "evalkit.tasks.requests"}]
