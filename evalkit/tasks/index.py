"""Finding tasks by name: every ``*.yaml`` under the bundled folder and ``--include-path``.

A name on ``--tasks`` is a task name, a tag (all tasks carrying it), or a path to a YAML file.
Unknown names fail with the closest known name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evalkit.errors import UsageError, did_you_mean
from evalkit.tasks.config import TaskConfig, parse_task_config
from evalkit.tasks.yaml_loader import load_task_yaml

BUNDLED = Path(__file__).resolve().parent.parent / "bundled_tasks"


@dataclass
class TaskIndex:
    tasks: dict[str, Path] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    # Files that could not be read: reported only if a requested name is not found elsewhere.
    broken: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, folders: list[Path]) -> TaskIndex:
        index = cls()
        for folder in folders:
            for path in sorted(folder.rglob("*.yaml")):
                try:
                    data = load_task_yaml(path)
                except UsageError as exc:
                    index.broken[path] = str(exc)
                    continue
                name = data.get("task")
                if not isinstance(name, str):
                    continue
                # A later folder (the user's --include-path) overrides a bundled task of the same name.
                index.tasks[name] = path
                tags = data.get("tag") or ()
                for tag in [tags] if isinstance(tags, str) else tags:
                    members = index.tags.setdefault(tag, [])
                    if name not in members:
                        members.append(name)
        return index

    def resolve(self, names: list[str]) -> list[TaskConfig]:
        """TaskConfigs for the requested names, in request order, each task once."""
        configs: dict[str, TaskConfig] = {}
        for name in names:
            for path in self._paths_for(name):
                config = parse_task_config(load_task_yaml(path), path)
                configs.setdefault(config.task, config)
        return list(configs.values())

    def _paths_for(self, name: str) -> list[Path]:
        if name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise UsageError(f"task file {name} does not exist")
            return [path.resolve()]
        if name in self.tasks:
            return [self.tasks[name]]
        if name in self.tags:
            return [self.tasks[t] for t in sorted(self.tags[name])]
        known = list(self.tasks) + list(self.tags)
        unreadable = ""
        if self.broken:
            unreadable = f"; also {len(self.broken)} task file(s) could not be read: {next(iter(self.broken.values()))}"
        raise UsageError(
            f"unknown task '{name}'{did_you_mean(name, known)}; add --include-path DIR for your own task YAMLs"
            + unreadable
        )


def load_tasks(names: list[str], include_path: list[Path]) -> list[TaskConfig]:
    return TaskIndex.scan([BUNDLED, *include_path]).resolve(names)
