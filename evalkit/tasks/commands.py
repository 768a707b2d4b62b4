"""``python -m evalkit tasks list|validate``: what the task library holds, and what of it is usable.

``tasks list [--include-path DIR ...]`` prints the names of groups, tags and tasks (one per line,
``NAME  [library]``, under a header per kind) from the cached indexes only, so it is quick. The
library is lm-eval, evalkit (bundled), lmms-eval or --include-path; an lmms-eval name that lm-eval
also has is listed as ``lmms:NAME``.

``tasks validate [NAME ...] [--include-path DIR ...]`` checks each name (task, group, tag, YAML
path, or ``lmms:NAME``; no NAME: every task and group of both libraries) short of loading data or
a model, prints ``NAME: reason`` for each one that is not usable (an unknown name among them) and
a summary line, and exits 0 only when all are. A bad flag is a usage error: one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from evalkit.errors import USAGE_EXIT_CODE, UsageError, say

PROG = "python -m evalkit tasks"
KINDS = (("task", "tasks"), ("group", "groups"), ("tag", "tags"), ("file", "task files"), ("unknown", "unknown names"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other usage error
        raise UsageError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="List the task library, or check tasks without loading data or a model.")
    sub = p.add_subparsers(dest="command", metavar="{list,validate}", parser_class=_Parser)
    sub.required = True
    include_help = "extra folder of task YAMLs (repeatable)"
    listing = sub.add_parser(
        "list", help="names of groups, tags and tasks", description="Names of groups, tags and tasks."
    )
    listing.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR", help=include_help)
    check = sub.add_parser(
        "validate",
        help="check tasks, groups, tags or YAML files without loading data or a model",
        description="Check tasks, groups, tags or task YAML files short of loading data or a model. "
        "Exit 0 when all are valid, 1 when some are not, 2 on a usage error.",
    )
    check.add_argument(
        "names", nargs="*", metavar="NAME", help="task, group, tag or YAML path (default: all tasks and groups)"
    )
    check.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR", help=include_help)
    return p


def _library(include_path: list[Path]):  # noqa: ANN202 - imports lm-eval lazily
    for folder in include_path:
        if not folder.is_dir():
            raise UsageError(f"--include-path {folder} is not a folder")
    from evalkit.tasks.library import TaskLibrary

    return TaskLibrary(include_path=include_path)


def list_tasks(include_path: list[Path]) -> int:
    library = _library(include_path)
    sections = (("groups", library.all_groups), ("tags", library.all_tags), ("tasks", library.all_subtasks))
    lines: list[str] = []
    for title, names in sections:
        lines.append(f"{title} ({len(names)}):")
        lines.extend(f"{name}  [{library.library_of(name)}]" for name in names)
        lines.append("")
    lines.append(", ".join(f"{len(names)} {title}" for title, names in sections))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return 0


def _percent(valid: int, total: int) -> str:
    # rounded down, so that "100.0%" means all of them
    return f"{math.floor(1000 * valid / total) / 10:.1f}%"


def summary(results: dict[str, str | None], kinds: dict[str, str]) -> str:
    parts = []
    for kind, plural in KINDS:
        names = [n for n in results if kinds[n] == kind]
        if names:
            valid = sum(results[n] is None for n in names)
            parts.append(f"{valid} of {len(names)} {plural} valid ({_percent(valid, len(names))})")
    return ", ".join(parts) or "nothing to validate"


def validate_tasks(names: list[str], include_path: list[Path]) -> int:
    from evalkit.tasks.validate import kind_of, validate

    library = _library(include_path)
    names = list(dict.fromkeys(n.strip() for name in names for n in name.split(",") if n.strip()))
    if not names:
        names = library.all_subtasks + library.all_groups
    results = validate(library, names)
    kinds = {name: kind_of(library, name) for name in results}
    out = [f"{name}: {why}" for name, why in results.items() if why is not None]
    out.append(summary(results, kinds))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    return 0 if all(why is None for why in results.values()) else 1


def main(argv: list[str]) -> int:
    """``argv`` after ``tasks``: ``list ...`` or ``validate ...``. Returns the exit code."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0) if not isinstance(exc.code, str) else USAGE_EXIT_CODE
        if args.command == "list":
            return list_tasks(args.include_path)
        return validate_tasks(args.names, args.include_path)
    except UsageError as exc:
        say(f"evalkit: error: {exc}")
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(main(arguments[1:] if arguments[:1] == ["tasks"] else arguments))
