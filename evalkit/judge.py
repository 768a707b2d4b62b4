"""The LLM judge of tasks that score through one (lmms-eval's mmvet, llava_in_the_wild, mathvista,
mmbench, ...), reached through a local proxy that records every answer.

Judge tasks build their client from environment variables (``API_TYPE``, ``OPENAI_API_URL``,
``OPENAI_API_KEY``, ``MODEL_VERSION``, ...) when their code is imported or first scores, and call
it from ``process_results`` or an aggregation, through ``lmms_eval.llm_judge``, the ``openai``
client or ``requests.post``. evalkit sets those variables only while task code loads and scores
(``task_environment``). On global rank 0 they point at ``JudgeProxy``, an OpenAI-compatible
endpoint on 127.0.0.1 that

* forwards each call to ``--judge-base-url`` as ``--judge-model`` (the body's ``model`` is
  replaced), with the key from ``--judge-api-key-env``, retrying 429, 5xx, dropped connections and
  timeouts as the served-model backends do (``--max-retries``, ``--request-timeout``);
* appends every request and reply to ``judge.jsonl`` in the output folder, flushed as each
  arrives, and answers a request it holds a reply for from that file, so ``--resume`` never asks
  the judge twice;
* asks once for identical requests in flight together, and answers a request that already failed
  with that failure at once (task code retries in loops of its own, and would multiply the waits).

Task code sees a placeholder key, never the real one, which is read once when the proxy starts and
sent only in the Authorization header to the judge; it is never printed or written. Any other rank
imports task code with the same variables pointing nowhere (it only builds prompts and images).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from evalkit.errors import RunFailed, UsageError
from evalkit.models.openai_api import Server, ServerError, check_reachable

JOURNAL = "judge.jsonl"
PLACEHOLDER_KEY = "evalkit-judge-proxy"
NO_JUDGE_URL = "http://no-judge.invalid/v1"  # where task code points on ranks that never score
ROUTES = ("/chat/completions", "/completions")  # matched as path suffixes, the longer first


def task_variables(base_url: str, model: str | None) -> dict[str, str]:
    """The variables judge task code reads, pointing at ``base_url`` (an OpenAI API root)."""
    values = {
        "API_TYPE": "openai",  # lmms-eval's OpenAI provider, not Azure
        # lmms-eval's requests.post tasks take the full URL; its llm_judge appends the route once
        # more, which the proxy accepts.
        "OPENAI_API_URL": f"{base_url}/chat/completions",
        "OPENAI_BASE_URL": base_url,  # the openai client's own default
        "OPENAI_API_KEY": PLACEHOLDER_KEY,  # lmms-eval's providers refuse to run without one
        "JUDGE_BASE_URL": base_url,  # lmms-eval's reasoning judge
        "JUDGE_API_KEY": PLACEHOLDER_KEY,
        "Deepseek_API": PLACEHOLDER_KEY,  # phyx's judge code refuses to load without it
    }
    if model:
        for name in ("MODEL_VERSION", "JUDGE_MODEL_VERSION", "JUDGE_MODEL_NAME", "GPT_EVAL_MODEL_NAME"):
            values[name] = model
    return values


@contextlib.contextmanager
def task_environment(base_url: str | None, model: str | None) -> Iterator[None]:
    """The judge variables set (to the proxy at ``base_url``, or nowhere) while task code loads or
    scores, and restored afterwards, so a served model's own key is never replaced while it runs."""
    values = task_variables(base_url or NO_JUDGE_URL, model)
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True, kw_only=True)
class JudgeOptions:
    base_url: str
    model: str
    api_key_env: str  # the environment variable holding the judge's key (never the key)
    concurrency: int  # docs scored at once, so judge calls in flight
    max_retries: int
    request_timeout: float

    def server(self, api_key: str | None = None) -> Server:
        return Server(
            base_url=self.base_url.rstrip("/"),
            api_key_env=self.api_key_env,
            timeout=self.request_timeout,
            max_retries=self.max_retries,
            api_key=api_key,
        )


def check_judge(options: JudgeOptions) -> None:
    """One cheap request (``/models``) before any model loads: the judge answers and serves the model."""
    answer = check_reachable(options.server(), flag="--judge-base-url")
    listed = answer.get("data") if isinstance(answer, dict) else None
    served = [m["id"] for m in listed or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if served and options.model not in served:
        shown = ", ".join(served[:5]) + (" ..." if len(served) > 5 else "")
        raise UsageError(
            f"the judge at --judge-base-url {options.base_url} serves {shown}, not --judge-model {options.model}"
        )


class JudgeFailed(RunFailed):
    """The judge did not answer some requests, after every retry."""


def request_key(route: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([route, body], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_journal(path: Path) -> dict[str, Any]:
    """Replies saved by earlier runs, by request key; a line cut short by a crash is skipped."""
    replies: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                replies[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue
    return replies


class JudgeProxy:
    """The local endpoint judge task code calls on rank 0 (see the module's description)."""

    def __init__(self, options: JudgeOptions, output: Path) -> None:
        self.options = options
        self.journal = output / JOURNAL
        self._server = options.server(api_key=os.environ.get(options.api_key_env))
        self._replies = read_journal(self.journal)
        self._pending: dict[str, Future] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self.asked = 0  # replies the judge gave in this run
        self.replayed = 0  # requests answered from the journal
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="evalkit-judge", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def __enter__(self) -> JudgeProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._file is not None:
            self._file.close()

    def answer(self, route: str, body: dict[str, Any]) -> Any:
        """The judge's reply to one request: saved, shared with an identical one in flight, or asked."""
        body = {**body, "model": self.options.model}
        key = request_key(route, body)
        with self._lock:
            if key in self._replies:
                self.replayed += 1
                return self._replies[key]
            if key in self._failed:
                raise ServerError(self._failed[key])
            waiting = self._pending.get(key)
            if waiting is None:
                future = self._pending[key] = Future()
        if waiting is not None:
            return waiting.result()
        try:
            reply = self._server.post(route, body)
        except ServerError as exc:
            with self._lock:
                self._failed[key] = str(exc)
                del self._pending[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._replies[key] = reply
            self.asked += 1
            self._record({"key": key, "route": route, "request": body, "reply": reply})
            del self._pending[key]
        future.set_result(reply)
        return reply

    def _record(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.journal.open("a", encoding="utf-8")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def check_answered(self) -> None:
        """Judge tasks score an unanswered request as a wrong answer without a word; end the run instead."""
        if self._failed:
            first = next(iter(self._failed.values()))
            raise JudgeFailed(
                f"the judge did not answer {len(self._failed)} request(s) ({first}); the {len(self._replies)} "
                f"answers it gave are saved in {self.journal}; rerun with --resume to ask only for the rest"
            )

    def summary(self) -> dict[str, Any]:
        return {
            "base_url": self.options.base_url,
            "model": self.options.model,
            "asked": self.asked,
            "replayed": self.replayed,
        }


def _handler(proxy: JudgeProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # task code reports its own failures
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": f"evalkit judge proxy: {message}", "type": "judge_proxy"}})

        def do_GET(self) -> None:
            if self.path.split("?")[0].rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": proxy.options.model, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            route = next((r for r in ROUTES if path.endswith(r)), None)
            if route is None:
                self._error(404, f"no route {self.path}; it answers {' and '.join(ROUTES)}")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            except ValueError:
                self._error(400, "the body is not JSON")
                return
            if not isinstance(body, dict):
                self._error(400, "the body is not a JSON object")
                return
            try:
                self._send(200, proxy.answer(route, body))
            except ServerError as exc:
                self._error(502, str(exc))

    return Handler
