"""Writing results: ``results.json`` in lm-eval's layout, per-doc samples, and a table.

Files are written to a temporary name and renamed, so a folder never holds a half-written file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "jinja2", "pyyaml")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


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


def format_table(
    results: dict[str, dict[str, Any]],
    versions: dict[str, Any],
    n_shot: dict[str, int],
    higher_is_better: dict[str, dict[str, bool]],
) -> str:
    """A markdown table like lm-eval's: one row per task, filter and metric."""
    header = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    rows = []
    for task, metrics in results.items():
        first = True
        for key, value in metrics.items():
            if key in ("name", "alias", "sample_len") or "_stderr," in key:
                continue
            metric, _, filter_name = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{filter_name}", "N/A")
            arrow = {True: "↑", False: "↓"}.get(higher_is_better.get(task, {}).get(metric), " ")
            rows.append(
                [
                    task if first else "",
                    str(versions.get(task, "")) if first else "",
                    filter_name,
                    str(n_shot.get(task, "")) if first else "",
                    metric,
                    arrow,
                    f"{value:.4f}",
                    "±",
                    err if isinstance(err, str) else f"{err:.4f}",
                ]
            )
            first = False
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "|" + "|".join(f" {c:<{w}} " for c, w in zip(cells, widths, strict=True)) + "|"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
