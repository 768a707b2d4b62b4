"""Reading lm-eval task YAML files: ``include`` merging and ``!function`` references.

``include`` paths are relative to the including file's folder and the including file's keys
override the included ones. ``!function module.name`` names a callable in ``module.py`` next to
the YAML file; it is kept as a reference and imported only when the task is built.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from evalkit.errors import UsageError


@dataclass(frozen=True)
class FunctionRef:
    """A ``!function module.name`` value: resolved lazily, relative to ``folder``."""

    spec: str
    folder: Path

    def resolve(self) -> Callable[..., Any]:
        module_name, _, attr = self.spec.rpartition(".")
        if not module_name:
            raise UsageError(f"!function {self.spec}: expected 'module.function' ({self.folder})")
        module = _import_file(self.folder / (module_name.replace(".", "/") + ".py"))
        try:
            return getattr(module, attr)
        except AttributeError:
            raise UsageError(f"!function {self.spec}: {module.__file__} has no attribute '{attr}'") from None

    def __str__(self) -> str:
        return f"!function {self.spec}"


@cache
def _import_file(path: Path):
    if not path.is_file():
        raise UsageError(f"!function refers to {path}, which does not exist")
    name = f"evalkit_task_module_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _loader_for(folder: Path) -> type[yaml.SafeLoader]:
    class TaskLoader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> FunctionRef:
        return FunctionRef(loader.construct_scalar(node), folder)

    TaskLoader.add_constructor("!function", function)
    return TaskLoader


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a dict, with a one-line error for unreadable or malformed files."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read task file {path}: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_loader_for(path.parent))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"task file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def load_task_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task file with its ``include`` chain merged (later keys override earlier ones)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise UsageError(f"include cycle in task files: {chain}")
    data = read_yaml(path)
    includes = data.pop("include", None)
    if includes is None:
        return data
    merged: dict[str, Any] = {}
    for name in [includes] if isinstance(includes, str) else includes:
        target = Path(name) if Path(name).is_absolute() else path.parent / name
        if not target.is_file():
            raise UsageError(f"{path}: include '{name}' not found (looked for {target})")
        merged.update(load_task_yaml(target, (*_seen, path)))
    merged.update(data)
    return merged
