"""Writing result files atomically, and the provenance recorded with them.

Files are written to a temporary name and renamed, so a folder never holds a half-written file.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGES = ("lm_eval", "torch", "transformers", "accelerate", "datasets", "tokenizers", "evaluate", "pyyaml")


def write_json_atomic(path: Path, data: Any) -> None:
    _write_atomic(path, [json.dumps(data, indent=2, ensure_ascii=False, default=str)], sync=True)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_atomic(path, (json.dumps(row, ensure_ascii=False, default=str) for row in rows), sync=False)


def _write_atomic(path: Path, lines: Iterable[str], *, sync: bool) -> None:
    """``lines`` to ``path`` through a temporary name; a write that fails (a full disk) leaves
    neither a half-written file nor the temporary one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            for line in lines:
                f.write(line + "\n")
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("evalkit", *PACKAGES):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_hash() -> str | None:
    """The commit of the evalkit checkout, when it runs from one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
