"""Task names to lm-eval task objects: lm-evaluation-harness is evalkit's task library.

lm-eval's ``TaskManager`` resolves task, tag and group names and YAML paths; evalkit only keeps
its index on disk. Indexing lm-eval's 14,000 names parses every YAML file (about 10 s), a cost
every run and every rank would pay; the cached index is keyed by lm-eval's version and by the
path, size and modification time of every YAML file under the indexed folders, so an edited or
added task file rebuilds it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lm_eval.tasks
import lm_eval.utils
import yaml
from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.tasks._index import Entry, Kind, TaskIndex
from lm_eval.tasks._yaml_loader import load_yaml

from evalkit.errors import UsageError, did_you_mean, one_line
from evalkit.tasks.lmms import LmmsTask, is_lmms_config
from evalkit.tasks.problems import TaskLoadError, dataset_label, explain

BUNDLED = Path(__file__).resolve().parent.parent / "bundled_tasks"
LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent
INDEX_FORMAT = 1
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}


def cache_dir() -> Path:
    root = os.environ.get("EVALKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evalkit"
    )
    return Path(root)


def _yaml_files(root: Path) -> Iterator[tuple[str, int, int]]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith(".yaml"):
                path = os.path.join(folder, name)
                stat = os.stat(path)
                yield os.path.relpath(path, root), stat.st_mtime_ns, stat.st_size


def index_fingerprint(roots: Iterable[Path]) -> str:
    """What the index depends on: lm-eval's version and every YAML file's path, size and mtime."""
    digest = hashlib.sha256(f"{INDEX_FORMAT} lm_eval {version('lm_eval')}".encode())
    for root in roots:
        digest.update(f"\0root {root}".encode())
        for rel, mtime, size in _yaml_files(root):
            digest.update(f"\0{rel} {mtime} {size}".encode())
    return digest.hexdigest()


def _to_json(index: dict[str, Entry]) -> dict[str, Any]:
    return {name: [e.kind.name, str(e.yaml_path) if e.yaml_path else None, sorted(e.tags)] for name, e in index.items()}


def _from_json(data: dict[str, Any]) -> dict[str, Entry]:
    return {
        name: Entry(name=name, kind=Kind[kind], yaml_path=Path(path) if path else None, tags=set(tags))
        for name, (kind, path, tags) in data.items()
    }


def cached_index(roots: list[Path]) -> dict[str, Entry]:
    """lm-eval's index of ``roots`` (later roots override earlier ones), from the cache when fresh."""
    key = index_fingerprint(roots)
    path = cache_dir() / f"task-index-{key[:32]}.json"
    try:
        return _from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # lm-eval logs a warning for every duplicate name in its own library; that is not the user's news.
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    index = TaskIndex.build(roots)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_to_json(index)))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder costs only time
    return index


class _Factory(TaskFactory):
    """lm-eval's factory, with three additions: a failure names the task it happened in; a
    relative ``data_files`` path that is not in the working folder is looked up beside its YAML
    (so a task folder such as evalkit's bundled demo runs from anywhere); and a task YAML in
    lmms-eval's form (``doc_to_visual``, ``lmms_eval_specific_kwargs``, ...) is built as an
    ``LmmsTask`` instead of a plain ``ConfigurableTask``."""

    def _build_task(self, entry: Entry, overrides: dict[str, Any] | None) -> Any:
        name = (overrides or {}).get("task") or entry.name
        try:
            return super()._build_task(entry, overrides)
        except TaskLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside lm-eval is reported with its task
            raise TaskLoadError(str(name), exc, dataset=_dataset_of(entry, overrides)) from exc

    def _build_group(self, group_name: str, raw_cfg: dict[str, Any], overrides: Any, registry: Any) -> Any:
        try:
            return super()._build_group(group_name, raw_cfg, overrides, registry)
        except TaskLoadError as exc:
            raise exc.inside(group_name) from exc.__cause__
        except Exception as exc:  # noqa: BLE001
            raise TaskLoadError(group_name, exc) from exc

    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = super()._load_full_config(entry, overrides)
        kwargs = cfg.get("dataset_kwargs")
        if entry.yaml_path and isinstance(kwargs, dict) and "data_files" in kwargs:
            kwargs["data_files"] = _beside(kwargs["data_files"], Path(entry.yaml_path).parent)
        if entry.kind is Kind.TASK and "class" not in cfg and is_lmms_config(cfg):
            cfg["class"] = LmmsTask
        return cfg


def _dataset_of(entry: Entry, overrides: dict[str, Any] | None) -> str | None:
    try:
        cfg = {**load_yaml(entry.yaml_path, resolve_func=False), **(overrides or {})} if entry.yaml_path else {}
    except Exception:  # noqa: BLE001 - only used to word an error
        return None
    return dataset_label(cfg)


def _beside(files: Any, folder: Path) -> Any:
    if isinstance(files, str):
        relative = "://" not in files and not Path(files).is_absolute()
        if relative and not Path(files).exists() and (folder / files).exists():
            return str(folder / files)
        return files
    if isinstance(files, list):
        return [_beside(f, folder) for f in files]
    if isinstance(files, dict):
        return {split: _beside(f, folder) for split, f in files.items()}
    return files


def compile_templates_once() -> None:
    """lm-eval compiles a ``doc_to_text`` Jinja template anew for every doc and every few-shot
    example (95% of request building for mmlu 5-shot, measured); a compiled template renders any
    doc, so each template string is compiled once. Same templates, same environment, same text."""
    env = lm_eval.utils.env
    if getattr(env.from_string, "evalkit_cached", False):
        return
    compile_once = functools.lru_cache(maxsize=4096)(env.from_string)
    original = env.from_string

    def from_string(source: Any, *args: Any, **kwargs: Any) -> Any:
        return original(source, *args, **kwargs) if args or kwargs else compile_once(source)

    from_string.evalkit_cached = True  # type: ignore[attr-defined]
    env.from_string = from_string


class TaskLibrary(TaskManager):
    """lm-eval's TaskManager over its own tasks, evalkit's bundled tasks and ``include_path``.

    Built from the cached index instead of re-parsing every YAML file; everything else (loading
    tasks, tags, groups and YAML paths) is lm-eval's own code.
    """

    def __init__(self, include_path: Iterable[Path] = (), metadata: dict[str, Any] | None = None) -> None:
        compile_templates_once()
        self.include_path = [Path(p) for p in include_path]
        self.metadata = metadata
        self._factory = _Factory(meta=metadata)
        roots = [LM_EVAL_TASKS, BUNDLED, *(p.resolve() for p in self.include_path)]
        self._index = cached_index(roots)
        buckets: dict[Kind, list[str]] = defaultdict(list)
        for name, entry in self._index.items():
            buckets[entry.kind].append(name)
        self._all_tasks = sorted(self._index)
        self._all_subtasks = sorted(buckets[Kind.TASK] + buckets[Kind.PY_TASK])
        self._all_groups = sorted(buckets[Kind.GROUP])
        self._all_tags = sorted(buckets[Kind.TAG])

    def check_names(self, names: Iterable[str]) -> None:
        """Every name must be a known task, tag, group or an existing YAML file."""
        for name in names:
            if name in self._index:
                continue
            if name.endswith((".yaml", ".yml")):
                if not Path(name).is_file():
                    raise UsageError(f"task file {name} does not exist")
                continue
            raise UsageError(
                f"unknown task '{name}'{did_you_mean(name, self._all_tasks)}; "
                f"see python -m evalkit tasks list, or add --include-path DIR for your own task YAMLs"
            )

    def load_checked(self, names: list[str]) -> dict[str, Any]:
        """lm-eval's ``load`` (tasks, groups, group_map); any failure is one line naming the task."""
        self.check_names(names)
        try:
            return self.load(list(names))
        except TaskLoadError as exc:
            raise UsageError(explain(exc)) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" {mark.name} at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or one_line(exc)
            raise UsageError(f"malformed YAML in{where}: {problem}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot load tasks {', '.join(names)}: {exc}") from None
