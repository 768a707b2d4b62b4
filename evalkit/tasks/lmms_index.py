"""lmms-eval's task folder, indexed by lmms-eval's rules.

lmms-eval 0.7 reads a YAML as a task when its ``task`` is a string and as a group when ``task`` is
a list; a task's ``tag`` and ``group`` values both become tags (a name that is already a group
stays a group). lm-eval reads any YAML with a ``group`` key as a group, so under lm-eval's rules
lmms-eval's older task form (``group: coco2014_cap`` beside ``task: coco2014_cap_test``) would lose
its task. Later files win over earlier ones, as in lmms-eval; files are read in sorted order.

Names from this folder are given as ``lmms:NAME``; a name that lm-eval does not have also
resolves without the prefix (``TaskLibrary`` decides).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

from lm_eval.tasks._index import Entry, Kind
from lm_eval.tasks._yaml_loader import load_yaml

PREFIX = "lmms:"
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def tasks_dir() -> Path | None:
    """lmms-eval's installed task folder, found without importing lmms-eval; None when absent."""
    try:
        spec = importlib.util.find_spec("lmms_eval")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "tasks"
        if folder.is_dir():
            return folder.resolve()
    return None


def strip_prefix(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _yaml_paths(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.glob("**/*.yaml") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts)),
        key=lambda p: p.as_posix(),
    )


def build(root: Path) -> dict[str, Entry]:
    """lmms-eval's index of one task folder: task, group, python-task and tag entries."""
    index: dict[str, Entry] = {}
    tags: dict[str, set[str]] = {}
    for path in _yaml_paths(root):
        try:
            cfg = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as err:  # noqa: BLE001 - lmms-eval skips a file it cannot read, and so does the index
            log.debug("skip %s (%s)", path, err)
            continue
        if not isinstance(cfg, dict):
            continue
        task = cfg.get("task")
        if "class" in cfg and isinstance(task, str):
            index[task] = Entry(name=task, kind=Kind.PY_TASK, yaml_path=path, cfg=cfg)
        elif isinstance(task, list) and isinstance(cfg.get("group"), str):
            name = cfg["group"]
            index[name] = Entry(name=name, kind=Kind.GROUP, yaml_path=path, tags=set(_names(cfg.get("tag"))), cfg=cfg)
        elif isinstance(task, str):
            index[task] = Entry(name=task, kind=Kind.TASK, yaml_path=path, cfg=cfg)
            for tag in _names(cfg.get("tag")) + _names(cfg.get("group")):
                tags.setdefault(tag, set()).add(task)
    for tag, members in tags.items():
        if tag not in index:
            index[tag] = Entry(name=tag, kind=Kind.TAG, yaml_path=None, tags=members)
    return index
