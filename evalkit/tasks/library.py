"""Task names to lm-eval task objects: lm-evaluation-harness is evalkit's task library.

lm-eval's ``TaskManager`` resolves task, tag and group names and YAML paths; evalkit only keeps
its index on disk. Indexing lm-eval's 14,000 names parses every YAML file (about 10 s), a cost
every run and every rank would pay. Each folder's index is cached on its own: the installed
library's by its version, evalkit's bundled tasks and every ``--include-path`` folder by the path,
size and modification time of their YAML files, so an edited or added task file of one's own
re-indexes only its folder.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
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
from evalkit.tasks import lmms_index
from evalkit.tasks.lmms import LmmsTask, default_hf_home, is_lmms_config
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


def index_fingerprint(root: Path, rules: str = "lm_eval") -> str:
    """What one folder's index depends on: the indexing rules and their library's version, and,
    unless the folder is that installed library itself (which changes only with its version),
    every YAML file's path, size and mtime."""
    digest = hashlib.sha256(f"{INDEX_FORMAT} {rules} {version(rules)}\0root {root}".encode())
    if root not in _installed_libraries():
        for rel, mtime, size in _yaml_files(root):
            digest.update(f"\0{rel} {mtime} {size}".encode())
    return digest.hexdigest()


def _installed_libraries() -> set[Path]:
    return {LM_EVAL_TASKS, *filter(None, [lmms_index.tasks_dir()])}


def _to_json(index: dict[str, Entry]) -> dict[str, Any]:
    return {name: [e.kind.name, str(e.yaml_path) if e.yaml_path else None, sorted(e.tags)] for name, e in index.items()}


def _from_json(data: dict[str, Any]) -> dict[str, Entry]:
    return {
        name: Entry(name=name, kind=Kind[kind], yaml_path=Path(path) if path else None, tags=set(tags))
        for name, (kind, path, tags) in data.items()
    }


def cached_index(roots: list[Path], rules: str = "lm_eval") -> dict[str, Entry]:
    """The index of ``roots`` (later roots override earlier ones) by lm-eval's rules, or by
    lmms-eval's (``rules="lmms_eval"``, one root). Each folder is indexed and cached on its own, as
    lm-eval's TaskIndex indexes each root before merging them, so a new or edited folder of one's
    own costs only that folder."""
    index: dict[str, Entry] = {}
    for root in roots:
        index.update(_cached_root_index(root, rules))
    return index


def _cached_root_index(root: Path, rules: str) -> dict[str, Entry]:
    key = index_fingerprint(root, rules)
    path = cache_dir() / f"task-index-{key[:32]}.json"
    try:
        return _from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # lm-eval logs a warning for every duplicate name in its own library; that is not the user's news.
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    index = lmms_index.build(root) if rules == "lmms_eval" else TaskIndex.build([root])
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
    (so a task folder such as evalkit's bundled demo runs from anywhere), and for lmms-eval's tasks
    also above the ``lmms_eval`` package (its agentic tasks name ``lmms_eval/tasks/.../x.jsonl``); and a task YAML in
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
        if _in_lmms_eval(entry):
            default_hf_home()
        cfg = super()._load_full_config(entry, overrides)
        kwargs = cfg.get("dataset_kwargs")
        if entry.yaml_path and isinstance(kwargs, dict) and "data_files" in kwargs:
            folders = [Path(entry.yaml_path).parent]
            if _in_lmms_eval(entry):  # its agentic tasks name their data from the package's own parent folder
                folders.append(lmms_index.tasks_dir().parent.parent)
            kwargs["data_files"] = _beside(kwargs["data_files"], folders)
        if entry.kind is Kind.TASK and "class" not in cfg and (is_lmms_config(cfg) or _in_lmms_eval(entry)):
            cfg["class"] = LmmsTask
        return cfg


def _in_lmms_eval(entry: Entry) -> bool:
    """A task from lmms-eval's own folder is an lmms-eval task, whatever keys it has."""
    root = lmms_index.tasks_dir()
    return bool(root and entry.yaml_path and Path(entry.yaml_path).is_relative_to(root))


def _dataset_of(entry: Entry, overrides: dict[str, Any] | None) -> str | None:
    try:
        cfg = {**load_yaml(entry.yaml_path, resolve_func=False), **(overrides or {})} if entry.yaml_path else {}
    except Exception:  # noqa: BLE001 - only used to word an error
        return None
    return dataset_label(cfg)


def _beside(files: Any, folders: list[Path]) -> Any:
    """Relative data files not in the working folder, found in the first of ``folders`` that has them."""
    if isinstance(files, str):
        relative = "://" not in files and not Path(files).is_absolute()
        if relative and not Path(files).exists():
            found = next((folder / files for folder in folders if (folder / files).exists()), None)
            return str(found) if found else files
        return files
    if isinstance(files, list):
        return [_beside(f, folders) for f in files]
    if isinstance(files, dict):
        return {split: _beside(f, folders) for split, f in files.items()}
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


@contextlib.contextmanager
def local_dataset_modules_once() -> Iterator[None]:
    """While tasks load: a local dataset folder's ``datasets`` module is resolved once per set of
    arguments, not once per task. lm-eval builds every task with its own ``load_dataset(path, name)``;
    for one folder with many configs (mmlu's 57 subjects in ``cais/mmlu``) ``datasets`` re-reads and
    re-parses the folder's card (hundreds of YAML lines per config) for each, most of a run's plan
    time. Each caller gets its own copy of the same resolved module."""
    import datasets.load

    original = datasets.load.dataset_module_factory
    resolved: dict[tuple[str, str], Any] = {}

    def once(path: str, *args: Any, **kwargs: Any) -> Any:
        if args or not isinstance(path, str) or not os.path.isdir(path):
            return original(path, *args, **kwargs)
        key = (os.path.abspath(path), repr(sorted(kwargs.items())))
        if key not in resolved:
            resolved[key] = original(path, **kwargs)
        return copy.deepcopy(resolved[key])

    datasets.load.dataset_module_factory = once
    try:
        yield
    finally:
        datasets.load.dataset_module_factory = original


class TaskLibrary(TaskManager):
    """lm-eval's TaskManager over its own tasks, evalkit's bundled tasks and ``include_path``, with
    lmms-eval's task folder (when installed) as a second namespace.

    Built from cached indexes instead of re-parsing every YAML file; everything else (loading
    tasks, tags, groups and YAML paths) is lm-eval's own code. ``lmms:NAME`` always names
    lmms-eval's task, tag or group; a plain name is lm-eval's (or a bundled or included task's)
    when it has one, else lmms-eval's. Members of an lmms-eval group resolve in lmms-eval's index.
    """

    def __init__(self, include_path: Iterable[Path] = (), metadata: dict[str, Any] | None = None) -> None:
        compile_templates_once()
        self.include_path = [Path(p) for p in include_path]
        self.metadata = metadata
        self._factory = _Factory(meta=metadata)
        self._roots = [LM_EVAL_TASKS, BUNDLED, *(p.resolve() for p in self.include_path)]
        self._index = cached_index(self._roots)
        lmms_root = lmms_index.tasks_dir()
        self.lmms_index: dict[str, Entry] = cached_index([lmms_root], rules="lmms_eval") if lmms_root else {}
        self._all_tasks = sorted(self.listed_names())
        self._all_subtasks = self._listed(Kind.TASK, Kind.PY_TASK)
        self._all_groups = self._listed(Kind.GROUP)
        self._all_tags = self._listed(Kind.TAG)

    # ------------------------------------------------------------ names

    def display_name(self, lmms_name: str) -> str:
        """How a name of lmms-eval's is given: plain unless lm-eval's library has it too."""
        return lmms_index.PREFIX + lmms_name if lmms_name in self._index else lmms_name

    def listed_names(self) -> dict[str, Entry]:
        """Every name a user can give, as it is best given, with its entry."""
        names = dict(self._index)
        names.update({self.display_name(n): e for n, e in self.lmms_index.items()})
        return names

    def _listed(self, *kinds: Kind) -> list[str]:
        return sorted(n for n, e in self.listed_names().items() if e.kind in kinds)

    def resolve(self, name: str) -> tuple[Entry, dict[str, Entry]] | None:
        """The entry a name stands for, and the index its group members resolve in; None if unknown."""
        if name.startswith(lmms_index.PREFIX):
            entry = self.lmms_index.get(lmms_index.strip_prefix(name))
            return (entry, self.lmms_index) if entry else None
        if name in self._index:
            return self._index[name], self._index
        if name in self.lmms_index:
            return self.lmms_index[name], self.lmms_index
        return None

    def library_of(self, name: str) -> str:
        """Which library a name comes from: lm-eval, evalkit (bundled), lmms-eval, --include-path,
        or file (a YAML path)."""
        found = self.resolve(name)
        if found is None:
            return "file"
        entry, registry = found
        if registry is self.lmms_index:
            return "lmms-eval"
        if entry.kind is Kind.TAG and entry.tags:  # a tag has no file: its first member's library
            return self.library_of(sorted(entry.tags)[0])
        path = entry.yaml_path
        for root, library in ((LM_EVAL_TASKS, "lm-eval"), (BUNDLED, "evalkit")):
            if path is not None and Path(path).is_relative_to(root):
                return library
        return "--include-path"

    def notices(self, names: Iterable[str]) -> list[str]:
        """One line for each plain name both libraries have: which runs, and how to pick the other."""
        return [
            f"'{name}' is lm-eval's; --tasks {lmms_index.PREFIX}{name} selects lmms-eval's"
            for name in dict.fromkeys(names)
            if name in self._index and name in self.lmms_index
        ]

    def unknown(self, name: str) -> str | None:
        """Why a name cannot be loaded (unknown, or a missing YAML file); None when it can."""
        if self.resolve(name) is not None:
            return None
        if name.endswith((".yaml", ".yml")):
            return None if Path(name).is_file() else f"task file {name} does not exist"
        if name.startswith(lmms_index.PREFIX):
            if not self.lmms_index:
                return f"unknown task '{name}': lmms-eval is not installed; run make install"
            bare = lmms_index.strip_prefix(name)
            hint = did_you_mean(bare, sorted(self.lmms_index)).replace("'", f"'{lmms_index.PREFIX}", 1)
            return f"unknown task '{name}'{hint}; see python -m evalkit tasks list"
        return (
            f"unknown task '{name}'{did_you_mean(name, self._all_tasks)}; "
            f"see python -m evalkit tasks list, or add --include-path DIR for your own task YAMLs"
        )

    def check_names(self, names: Iterable[str]) -> None:
        """Every name must be a known task, tag, group or an existing YAML file."""
        for name in names:
            problem = self.unknown(name)
            if problem:
                raise UsageError(problem)

    # ------------------------------------------------------------ loading

    def _load_spec(self, spec: Any) -> Any:
        found = self.resolve(spec) if isinstance(spec, str) else None
        if found is None:
            return super()._load_spec(spec)
        entry, registry = found
        return self._factory.build(entry, overrides=None, registry=registry)

    def load_checked(self, names: list[str]) -> dict[str, Any]:
        """lm-eval's ``load`` (tasks, groups, group_map); any failure is one line naming the task."""
        self.check_names(names)
        try:
            with local_dataset_modules_once():
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
