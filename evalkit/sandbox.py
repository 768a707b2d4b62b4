"""The separate process that scores ``unsafe_code`` tasks (humaneval, mbpp, ...).

Rank 0 never runs ``process_results`` of a task that executes generated code. It sends the filtered
responses to :func:`score_in_sandbox`, which starts ``python -m evalkit.sandbox`` (a fresh
interpreter, not a fork of rank 0, so no model, CUDA context or distributed state is inherited) and
exchanges JSON over its stdin/stdout. The child rebuilds the same lm-eval task without a model
(``TaskLibrary(include_path, metadata).load_checked(task_specs)["tasks"][task]``, so group overrides
apply), installs evalkit's ``code_eval`` (:mod:`evalkit.code_exec`, which runs every program in
its own sandboxed interpreter with limits and a timeout) and returns
``task.process_results(docs[doc_id], results)`` for each item.

What ``results`` is, for lm-eval's evaluator and here: one entry per request of the doc (sorted by
``idx``), each that request's ``filtered_resps[filter_key]``. For ``humaneval`` (one request per doc,
filter ``create_test`` = ``utils.build_predictions``) that is ``[[doc["prompt"] + completion, ...]]``
(one string per repeat), and ``process_results`` returns ``{"pass@1": 0.0 or 1.0}``.

The parent imports no task code and executes nothing generated; the child's stdout is kept for the
reply (anything the task code prints goes to its stderr), its stderr is captured and its last lines
are part of any error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STDERR_LINES = 25
STDERR_CHARS = 6000
SCORING_THREADS = min(8, max(2, os.cpu_count() or 2))  # docs in flight; code_exec caps the programs


class SandboxError(RuntimeError):
    """Scoring in the sandbox process failed, timed out or returned something unreadable."""


@dataclass(frozen=True)
class SandboxRequest:
    """What the scoring process needs to rebuild the task without the model, and what to score."""

    include_path: list[str]
    metadata: dict[str, Any]
    task_specs: list[str]  # the names the run loaded (tasks, groups, tags, YAML files)
    task: str  # the leaf task to score
    items: list[tuple[int, list[Any]]]  # (doc_id, the results lm-eval passes to process_results)
    cwd: str = field(default_factory=os.getcwd)  # relative dataset paths resolve here

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRequest:
        return cls(
            include_path=[str(p) for p in data.get("include_path") or []],
            metadata=dict(data.get("metadata") or {}),
            task_specs=[str(s) for s in data["task_specs"]],
            task=str(data["task"]),
            items=[(int(doc_id), list(results)) for doc_id, results in data["items"]],
            cwd=str(data.get("cwd") or os.getcwd()),
        )


def _stderr_tail(stderr: bytes | None) -> str:
    text = (stderr or b"").decode("utf-8", "replace").rstrip()
    if not text:
        return ""
    tail = "\n".join(text.splitlines()[-STDERR_LINES:])[-STDERR_CHARS:]
    return f"\n--- last lines of the sandbox's stderr ---\n{tail}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # so `-m evalkit.sandbox` imports this evalkit
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # scoring needs no GPU; leave the ranks' GPUs alone
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the scoring process is no rank
    return env


@dataclass(frozen=True)
class SandboxReply:
    """One metrics dict per item, in order, and the metric names ``process_results`` added.

    lm-eval's process_results registers a metric function's dict keys (humaneval's "pass@1" from
    "pass_at_k") under that function's aggregation; ``aliases`` maps each such key to its source
    metric, so the rank's copy of the task aggregates it the same way.
    """

    metrics: list[dict[str, Any]]
    aliases: dict[str, str]


def score_in_sandbox(request: SandboxRequest, *, timeout: float) -> SandboxReply:
    """``task.process_results`` for every item, computed in a fresh ``python -m evalkit.sandbox``.

    Raises :class:`SandboxError` when the child fails
    (its error and the end of its stderr in the message) or runs past ``timeout`` seconds (its
    whole process group is killed).
    """
    if not request.items:
        return SandboxReply(metrics=[], aliases={})
    flags = ["-P"] if sys.version_info >= (3, 11) else []  # the working folder is not on sys.path
    what = f"scoring task {request.task} in the sandbox process"
    try:
        proc = subprocess.Popen(
            [sys.executable, *flags, "-m", "evalkit.sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=request.cwd,
            env=_child_env(),
            start_new_session=True,
        )
    except OSError as exc:
        raise SandboxError(f"{what}: cannot start it: {exc}") from exc
    try:
        try:
            stdout, stderr = proc.communicate(request.to_json().encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                _, stderr = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                stderr = b""
            raise SandboxError(f"{what}: no answer within {timeout:g}s; killed it{_stderr_tail(stderr)}") from None
    finally:
        _kill_group(proc)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        reply = json.loads(stdout.decode("utf-8"))
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise SandboxError(f"{what}: it exited with code {proc.returncode} without an answer{_stderr_tail(stderr)}")
    if not reply.get("ok"):
        raise SandboxError(f"{what} failed: {reply.get('error', 'unknown error')}{_stderr_tail(stderr)}")
    results = reply.get("results")
    if not isinstance(results, list) or len(results) != len(request.items):
        raise SandboxError(f"{what}: expected {len(request.items)} results, got {type(results).__name__}")
    return SandboxReply(metrics=results, aliases=dict(reply.get("aliases") or {}))


# ----- the child -------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"a metric value of type {type(value).__name__} cannot be sent back as JSON")


def score(request: SandboxRequest) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """In the scoring process: rebuild the task and run its ``process_results`` on every item."""
    from evalkit.compat import install_compat
    from evalkit.tasks.library import TaskLibrary

    install_compat()
    library = TaskLibrary(request.include_path, request.metadata)
    tasks = library.load_checked(list(request.task_specs))["tasks"]
    if request.task not in tasks:
        raise KeyError(f"task {request.task!r} is not among the tasks {', '.join(request.task_specs)} load")
    task = tasks[request.task]
    docs = list(task.eval_docs)
    for doc_id, _ in request.items:
        if not 0 <= doc_id < len(docs):
            raise IndexError(f"doc_id {doc_id} is out of range: task {request.task} has {len(docs)} docs")
    sources = dict(task._aggregation_list)
    with ThreadPoolExecutor(max_workers=min(SCORING_THREADS, len(request.items))) as pool:
        results = list(pool.map(lambda item: task.process_results(docs[item[0]], item[1]), request.items))
    aliases = {
        key: next(name for name, fn in sources.items() if fn is agg)
        for key, agg in task._aggregation_list.items()
        if key not in sources and any(fn is agg for fn in sources.values())
    }
    return results, aliases


def _die_with_parent() -> None:
    """Best effort: SIGKILL this process when the rank that started it dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    reply_to = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever lm-eval or task code prints goes to stderr, not into the reply
    _die_with_parent()
    try:
        request = SandboxRequest.from_json(json.load(sys.stdin))
        results, aliases = score(request)
        reply = json.dumps({"ok": True, "results": results, "aliases": aliases}, default=_jsonable)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - every failure is one message back to the parent
        traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        if type(exc).__name__ != "UsageError":
            message = f"{type(exc).__name__}: {message}"
        reply = json.dumps({"ok": False, "error": message})
        code = 1
    reply_to.write(reply)
    reply_to.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
