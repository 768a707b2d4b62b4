"""Content identities: of a model, of a task's configuration and of one request.

A saved result is keyed by what produced it, never by which rank ran it, so a run resumed on
any number of processes finds every result it already has.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from evalkit.tasks.build import Request, TaskPlan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
EDGE_BYTES = 1 << 16


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def model_fingerprint(path: str, dtype: str) -> dict[str, Any]:
    """Path, config and a weights fingerprint (each file's size and its first and last 64 KiB).

    Reading the edges instead of whole files keeps this instant for a 140 GB checkpoint while
    still telling apart re-saved or fine-tuned weights (safetensors headers hold every tensor's
    name, shape and offset).
    """
    folder = Path(path)
    weights = {}
    for file in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(EDGE_BYTES)
            f.seek(max(size - EDGE_BYTES, 0))
            tail = f.read(EDGE_BYTES)
        weights[file.name] = [size, hashlib.sha256(head + tail).hexdigest()]
    config = json.loads((folder / "config.json").read_text())
    identity = {"path": str(folder.resolve()), "config": config, "weights": weights, "dtype": dtype}
    return {"path": identity["path"], "dtype": dtype, "hash": _sha(identity)}


def task_config_hash(plan: TaskPlan, fewshot_seed: int) -> str:
    """Everything about a task that can change its requests or their scoring."""
    config = {
        k: str(v) if not isinstance(v, (str, int, float, bool, type(None), list, dict, tuple)) else v
        for k, v in vars(plan.config).items()
        if k != "source"
    }
    return _sha([config, plan.num_fewshot, fewshot_seed, _function_sources(plan)])


def _function_sources(plan: TaskPlan) -> dict[str, str]:
    """The text of every ``!function`` module a task uses: editing one changes the task."""
    from evalkit.tasks.yaml_loader import FunctionRef

    sources = {}
    for value in vars(plan.config).values():
        if isinstance(value, FunctionRef):
            module = value.folder / (value.spec.rpartition(".")[0].replace(".", "/") + ".py")
            if module.is_file():
                sources[value.spec] = module.read_text()
    return sources


def request_key(model_hash: str, task_hash: str, request: Request) -> str:
    return _sha([model_hash, task_hash, request.doc_id, request.instance, request.repeat, request.args])
