"""Content identities: of a model, of a task's configuration and of one request.

A saved result is keyed by what produced it, never by which rank ran it, so a run resumed on
any number of processes finds every result it already has.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from evalkit.tasks.requests import Request, TaskPlan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
EDGE_BYTES = 1 << 16
# Tokenizer, chat template, processor and generation settings beside the weights.
SETTING_SUFFIXES = (".json", ".jinja", ".model", ".txt")


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def model_fingerprint(path: str, dtype: str, backend: str, *, keyed_by_backend: bool = True) -> dict[str, Any]:
    """Path, config, a weights fingerprint (each file's size and its first and last 64 KiB), the
    content of every file that shapes prompts or generation (tokenizer, chat template, processor
    image sizes and pixel limits, generation defaults) and, where ``keyed_by_backend``, the backend
    that runs it: engines differ in their last digits, so a vllm run is never resumed by hf.

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
    settings = {
        file.name: hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(folder.iterdir())
        if file.is_file()
        and file.name != "config.json"
        and file.suffix in SETTING_SUFFIXES
        and not file.name.endswith(".index.json")
    }
    identity = {"path": str(folder.resolve()), "config": config, "weights": weights, "dtype": dtype}
    if settings:
        identity["settings"] = settings
    if keyed_by_backend:
        identity["backend"] = backend
    return {"path": identity["path"], "dtype": dtype, "backend": backend, "hash": _sha(identity)}


def served_fingerprint(name: str, backend: str, tokenizer: str | None) -> dict[str, Any]:
    """A model behind a server is known by its served name, the route and its local tokenizer (if
    any), not by the server's address: a run resumes against a restarted or another replica."""
    identity: dict[str, Any] = {"name": name, "backend": backend}
    folder = Path(tokenizer or name)
    if folder.is_dir():
        identity["tokenizer"] = {
            file.name: hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(folder.iterdir())
            if file.is_file() and file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
        }
    return {"path": name, "dtype": "served", "backend": backend, "hash": _sha(identity)}


def task_config_hash(plan: TaskPlan, prompt_settings: dict[str, Any]) -> str:
    """Everything about a task that can change its requests or their scoring.

    lm-eval's config dump carries the source code of every function the task uses; where the task
    file lives is left out, so a moved checkout resumes its own runs.
    """
    config = dict(plan.task.dump_config())
    config["metadata"] = {k: v for k, v in (config.get("metadata") or {}).items() if k != "config_source"}
    return _sha([_stable(config), plan.num_fewshot, plan.limit, prompt_settings])


def _stable(value: Any) -> Any:
    """A config value with nested callables (which lm-eval's dump leaves as objects) named by their source."""
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if callable(value):
        try:
            return inspect.getsource(value)
        except (OSError, TypeError):
            return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return value


def request_key(model_hash: str, task_hash: str, request: Request) -> str:
    """What one result depends on: the model, the task, the request's text and its images' content."""
    parts = [model_hash, task_hash, request.doc_id, request.instance, request.repeat, request.args]
    if request.visuals is not None:
        parts.append(list(request.visuals.digests))
    if request.round:
        parts.append({"round": request.round})
    return _sha(parts)
