"""The output folder's rules: one run per folder, resumed only by the same model and task configs.

``run.json`` records what a folder holds (model fingerprint and each task's configuration hash).
Without ``--resume`` a non-empty folder is refused; with it, a folder holding another model's or
another task configuration's results is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from evalkit.errors import UsageError
from evalkit.report import write_json_atomic

MANIFEST = "run.json"


def check_writable(output: Path, rank: int) -> None:
    """The folder can be written, or created where it does not exist yet (nothing is created here:
    the launch's lock creates it once every check passed)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; pass a folder")
    if not output.exists():
        parent = next((p for p in output.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir():
            raise UsageError(f"cannot create --output {output}: {parent} is not a folder; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot create --output {output}: {parent} is not writable; choose a writable folder")
        return
    probe = output / f".evalkit-write-test-{rank}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"cannot write to --output {output}: {exc.strerror or exc}; choose a writable folder"
        ) from None


def check_folder(output: Path, *, resume: bool, model: dict[str, Any], tasks: dict[str, str]) -> None:
    """Refuse a folder this run must not write into; everything else is left untouched."""
    entries = [p.name for p in output.iterdir() if not p.name.startswith(".evalkit")] if output.is_dir() else []
    if not entries:
        return
    if not resume:
        raise UsageError(
            f"--output {output} already holds results ({', '.join(sorted(entries)[:4])}); pass --resume to "
            f"continue that run, or choose an empty folder"
        )
    manifest_path = output / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"--output {output} is not an evalkit output folder (no {MANIFEST}); choose an empty folder")
    fresh = "start fresh with another --output, or delete the folder"
    try:
        manifest = json.loads(manifest_path.read_text())
        saved_model, saved_tasks = manifest["model"], dict(manifest["tasks"])
        saved_hash, saved_path, saved_dtype = saved_model["hash"], saved_model["path"], saved_model["dtype"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            f"--output {output}: {MANIFEST} is damaged, so its results cannot be trusted; {fresh}"
        ) from None
    if saved_hash != model["hash"]:
        backend = saved_model.get("backend", "hf")
        raise UsageError(
            f"--output {output} holds results of a different model ({saved_path}, {saved_dtype}, backend {backend}); {fresh}"
        )
    changed = sorted(t for t, h in tasks.items() if saved_tasks.get(t, h) != h)
    if changed:
        raise UsageError(
            f"--output {output} holds results of a different configuration of task(s) {', '.join(changed)}; {fresh}"
        )


def write_manifest(output: Path, *, model: dict[str, Any], tasks: dict[str, str]) -> None:
    path = output / MANIFEST
    known = json.loads(path.read_text())["tasks"] if path.is_file() else {}
    write_json_atomic(path, {"model": model, "tasks": {**known, **tasks}})
