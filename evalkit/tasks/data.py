"""Loading a task's documents through ``datasets.load_dataset``, with clear local-first errors.

``data_files`` paths are looked up next to the task YAML first, then from the working folder
(where lm-eval looks), so a task folder works from anywhere and lm-eval's layouts still work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from evalkit.errors import UsageError, one_line
from evalkit.tasks.config import TaskConfig
from evalkit.tasks.yaml_loader import FunctionRef

PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _resolve_file(name: str, task: TaskConfig) -> str:
    if "://" in name or Path(name).is_absolute():
        return name
    for candidate in (task.folder / name, Path(name).resolve()):
        if candidate.exists():
            if candidate.is_file() and candidate.stat().st_size == 0:
                raise UsageError(f"task {task.task}: data file {candidate} is empty; the task has no docs to evaluate")
            return str(candidate)
    raise UsageError(f"task {task.task}: data file '{name}' not found (looked in {task.folder} and the working folder)")


def _resolve_data_files(files: Any, task: TaskConfig) -> Any:
    if isinstance(files, str):
        return _resolve_file(files, task)
    if isinstance(files, list):
        return [_resolve_file(f, task) for f in files]
    if isinstance(files, dict):
        return {split: _resolve_data_files(f, task) for split, f in files.items()}
    return files


def load_splits(task: TaskConfig) -> datasets.DatasetDict:
    kwargs = dict(task.dataset_kwargs)
    if "data_files" in kwargs:
        kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], task)
    path = task.dataset_path
    if path is None:
        raise UsageError(f"task {task.task}: no dataset_path in {task.source}")
    local = Path(path) if Path(path).is_absolute() else task.folder / path
    if path not in PACKAGED_BUILDERS and local.exists():
        path = str(local)
    elif path not in PACKAGED_BUILDERS and not Path(path).exists():
        return _load_from_hub(task, path, kwargs)
    try:
        return datasets.load_dataset(path, task.dataset_name, **kwargs)
    except (FileNotFoundError, ValueError, StopIteration, datasets.exceptions.DatasetsError) as exc:
        raise UsageError(f"task {task.task}: cannot load dataset {path!r}: {one_line(exc)[:300]}") from None


def _load_from_hub(task: TaskConfig, path: str, kwargs: dict[str, Any]) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(path, task.dataset_name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every hub failure gets the same advice
        raise UsageError(
            f"task {task.task}: dataset '{path}' is not a local folder and could not be loaded from the "
            f"Hugging Face Hub ({one_line(exc)[:160]}); download it where the hub is reachable and point "
            f"dataset_path at the local copy (or use dataset_path: json with dataset_kwargs.data_files)"
        ) from None


def split_docs(task: TaskConfig, splits: datasets.DatasetDict, split: str) -> Any:
    """One split with ``process_docs`` applied, as lm-eval does for every split it reads."""
    if split not in splits:
        raise UsageError(f"task {task.task}: split '{split}' does not exist; the dataset has: {', '.join(splits)}")
    docs = splits[split]
    if task.process_docs is not None:
        fn = task.process_docs.resolve() if isinstance(task.process_docs, FunctionRef) else task.process_docs
        docs = fn(docs)
    return docs
