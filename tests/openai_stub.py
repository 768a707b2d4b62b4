"""A small OpenAI-compatible HTTP server for tests of the server backends' own logic.

It answers ``/models``, ``/completions`` and ``/chat/completions`` with deterministic text (no
model, or a test's own function of a chat request's messages, e.g. an LLM judge's grade), records
every request, and can fail the first attempts of every prompt (429 or 5xx), refuse prompt logprobs as
OpenAI's hosted API does, check the Authorization header, or hold its first requests until a given
number of them are in flight together (so a client's concurrency is observed without timing). Behaviour against a real model server
is tested with ``vllm serve`` in tests/test_vllm.py.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def answer_for(prompt: Any) -> str:
    """The stub's generation for a prompt: a function of the prompt only, so tests can predict it."""
    return f" answer-{len(json.dumps(prompt, sort_keys=True)) % 97}\n\nrest after the stop"


def _hash(text: str) -> int:
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def hashed_grade(messages: Any) -> str:
    """An LLM judge's grade from the request alone (0.0 to 1.0 in tenths, by its sha256), so two tools
    that send a judge the same prompts get the same grades."""
    import hashlib

    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return f"{digest[0] % 11 / 10:.1f}"


@dataclass
class StubBehaviour:
    failures_per_prompt: int = 0  # answer this many attempts of each prompt with a failure:
    # ``failure_kind`` "status" (``failure_status``), "malformed" (200, not JSON), "empty" (200, no
    # choices), "two" (200, two choices for one), "drop" (the connection closed unanswered) or
    # "trickle" (the right answer, one byte every ``trickle_s`` seconds)
    failure_status: int = 503
    failure_kind: str = "status"
    trickle_s: float = 0.05
    get_failures: int = 0  # answer this many GETs (``/models``) with 503
    always_fail_one_in: int | None = None  # one prompt in this many (by its hash) fails every attempt
    answered: int = 0  # POSTs answered 200 with a whole, well-formed answer
    prompt_logprobs: bool = False  # echo + logprobs answered with logprobs (as vLLM) or without (as OpenAI)
    api_key: str | None = None
    attempts: Counter = field(default_factory=Counter)
    in_flight: int = 0
    most_in_flight: int = 0
    headers_seen: list[str] = field(default_factory=list)
    # The first ``hold_first`` POSTs are answered only once all of them are in flight at once; one
    # that waits ``hold_timeout`` seconds in vain is answered anyway and counted in ``hold_missed``.
    hold_first: int = 0
    hold_timeout: float = 20.0
    hold_missed: int = 0
    posts: int = 0
    # What a chat request is answered with, from its messages (default: ``answer_for``).
    chat_reply: Callable[[Any], str] | None = None
    # What a completion request is answered with, from its prompt (default: ``answer_for``).
    completion_reply: Callable[[Any], str] | None = None
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path, body) of every POST
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)


class OpenAIStub:
    def __init__(self, behaviour: StubBehaviour | None = None) -> None:
        self.behaviour = behaviour or StubBehaviour()
        behaviour = self.behaviour

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any] | bytes, trickle: bool = False) -> None:
                import time

                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not trickle:
                    self.wfile.write(data)
                    return
                for byte in data:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(behaviour.trickle_s)

            def _fail(self, ok: tuple[int, dict[str, Any]]) -> None:
                kind = behaviour.failure_kind
                if kind == "status":
                    self._send(behaviour.failure_status, {"error": {"message": "try again"}})
                elif kind == "malformed":
                    self._send(200, b'{"choices": [{"text": "cut')
                elif kind == "empty":
                    self._send(200, {"choices": []})
                elif kind == "two":
                    self._send(200, {"choices": ok[1]["choices"] * 2})
                elif kind == "drop":
                    self.close_connection = True
                    self.connection.close()
                elif kind == "trickle":
                    try:
                        self._send(*ok, trickle=True)
                    except OSError:  # the client gave up on it
                        pass

            def _authorized(self) -> bool:
                header = self.headers.get("Authorization", "")
                with behaviour.lock:
                    behaviour.headers_seen.append(header)
                if behaviour.api_key and header != f"Bearer {behaviour.api_key}":
                    self._send(401, {"error": {"message": "invalid key"}})
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                with behaviour.lock:
                    behaviour.get_failures -= 1
                    failing = behaviour.get_failures >= 0
                if failing:
                    self._send(503, {"error": {"message": "starting up"}})
                elif self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body.get("prompt", body.get("messages"))
                key = json.dumps(prompt, sort_keys=True)
                with behaviour.lock:
                    behaviour.bodies.append((self.path, body))
                    behaviour.attempts[key] += 1
                    attempt = behaviour.attempts[key]
                    behaviour.in_flight += 1
                    behaviour.most_in_flight = max(behaviour.most_in_flight, behaviour.in_flight)
                    behaviour.posts += 1
                    if behaviour.posts <= behaviour.hold_first:
                        behaviour.arrived.notify_all()
                        if not behaviour.arrived.wait_for(
                            lambda: behaviour.posts >= behaviour.hold_first, timeout=behaviour.hold_timeout
                        ):
                            behaviour.hold_missed += 1
                try:
                    if behaviour.always_fail_one_in and _hash(key) % behaviour.always_fail_one_in == 0:
                        self._send(behaviour.failure_status, {"error": {"message": "this one never works"}})
                        return
                    if self.path.endswith("/chat/completions"):
                        reply = behaviour.chat_reply or answer_for
                        message = {"role": "assistant", "content": reply(prompt)}
                        ok = (200, {"choices": [{"index": 0, "message": message}]})
                    elif body.get("echo") and body.get("logprobs") is not None:
                        ok = self._scored(prompt)
                    else:
                        reply = behaviour.completion_reply or answer_for
                        ok = (200, {"choices": [{"index": 0, "text": reply(prompt)}]})
                    if attempt <= behaviour.failures_per_prompt:
                        self._fail(ok)
                        return
                    self._send(*ok)
                    if ok[0] == 200:
                        with behaviour.lock:
                            behaviour.answered += 1
                finally:
                    with behaviour.lock:
                        behaviour.in_flight -= 1

            def _scored(self, prompt: Any) -> tuple[int, dict[str, Any]]:
                if not behaviour.prompt_logprobs:
                    return 400, {"error": {"message": "echo is not supported with logprobs"}}
                tokens = prompt if isinstance(prompt, list) else list(range(len(str(prompt).split())))
                values = [None] + [-0.5 - (t % 7) / 10 for t in tokens[1:]]
                tops = [None] + [{"x": -0.5} for _ in tokens[1:]]
                logprobs = {"tokens": [str(t) for t in tokens], "token_logprobs": values, "top_logprobs": tops}
                return 200, {"choices": [{"index": 0, "text": "", "logprobs": logprobs}]}

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> OpenAIStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
