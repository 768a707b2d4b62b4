"""Backends for a model behind an OpenAI-compatible server (vLLM, SGLang, TGI, ...).

``openai-completions`` talks to ``/completions``: generation, and loglikelihood through prompt
logprobs (``echo`` with ``logprobs``) where the server returns them. ``openai-chat`` talks to
``/chat/completions`` and generates only. Each rank keeps at most ``--concurrency`` requests in
flight; a request that meets a 429, a 5xx, a dropped connection or a timeout is retried with
backoff, up to ``--max-retries`` times; so is an answer that is not what was asked for (malformed
JSON, no ``choices``, another number of them, a choice without its text or logprobs), and so are
the start-up calls (``/models``, the prompt-logprobs probe). ``--request-timeout`` bounds each
attempt as a whole, however slowly the server sends it. Every finished request is reported at
once, so its result is in the rank's shard before the next one returns; after a request fails for
good, nothing new starts, and the answers still in flight are saved before the run ends, in one
line (``ServerError``) with what it has saved; ``--resume`` asks the server only for the rest.

The key comes from the environment variable named by ``--api-key-env`` and is sent only in the
Authorization header; it is never printed or written.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.errors import RunFailed, UsageError, one_line
from evalkit.models.lm_rules import (
    DEFAULT_MAX_LENGTH,
    LMTokenizer,
    generation_groups,
    model_max_length,
    prompt_in_window,
    rolling_loglikelihoods,
    scoring_window,
)
from evalkit.models.protocol import GenerationInput, Progress
from evalkit.models.stopping import cut_at_stop

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
MAX_BACKOFF_S = 30.0
PROBE_TIMEOUT_S = 30.0
# Generation kwargs from task files that the OpenAI API takes under the same name.
API_SAMPLING_KEYS = ("top_p", "seed", "presence_penalty", "frequency_penalty")


class ServerError(RunFailed):
    """A request the server did not answer, after every retry; says why. ``status`` is the HTTP
    status of a refusal that is not retried (400, 401, 404, ...), None when the server failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BadAnswer(ValueError):
    """A 200 answer that is not what was asked for; retried like a 5xx."""


def one_choice(answer: Any, *fields: str) -> dict[str, Any]:
    """The single choice of an answer, with ``fields`` (``a.b`` for nested) present; BadAnswer if not."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        count = len(choices) if isinstance(choices, list) else "no"
        raise BadAnswer(f"{count} choices where one was asked for")
    for name in fields:
        value: Any = choices[0]
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            raise BadAnswer(f"the choice has no {name}")
    return choices[0]


@dataclass(frozen=True)
class Server:
    """Where the server is and how to talk to it. The key is read from the environment at each call,
    unless the caller read it once and passes it as ``api_key`` (never shown in the repr)."""

    base_url: str
    api_key_env: str
    timeout: float
    max_retries: int
    backoff: float = 0.5
    api_key: str | None = field(default=None, repr=False)

    def post(self, route: str, body: dict[str, Any], check: Callable[[Any], Any] | None = None) -> dict[str, Any]:
        return self.call(route, body, retries=self.max_retries, timeout=self.timeout, check=check)

    def call(
        self,
        route: str,
        body: dict[str, Any] | None,
        *,
        retries: int,
        timeout: float,
        check: Callable[[Any], Any] | None = None,
    ) -> dict[str, Any]:
        """The JSON answer of one request (GET without a body), retried on errors that can pass: 429,
        5xx, a dropped connection, an attempt over ``timeout`` seconds in all, an answer that is not
        JSON or that ``check`` refuses (by raising BadAnswer)."""
        url = self.base_url.rstrip("/") + route
        headers = {"Content-Type": "application/json"}
        key = self.api_key if self.api_key is not None else os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(retries + 1):
            wait_s = min(self.backoff * 2**attempt, MAX_BACKOFF_S)
            try:
                request = urllib.request.Request(
                    url, data=data, headers=headers, method="GET" if body is None else "POST"
                )
                answer = json.loads(read_within(request, timeout))
                if check is not None:
                    check(answer)
                return answer
            except (ValueError, UnicodeDecodeError) as exc:  # not JSON, or BadAnswer
                problem = f"a malformed answer from {url}: {one_line(exc)[:200]}"
            except urllib.error.HTTPError as exc:
                detail = one_line(exc.read().decode(errors="replace"))[:300]
                problem = f"HTTP {exc.code} from {url}: {detail}"
                if exc.code not in RETRY_STATUS:
                    raise ServerError(problem, status=exc.code) from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.isdigit():
                    wait_s = min(float(retry_after), MAX_BACKOFF_S)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                problem = f"no answer from {url}: {type(reason).__name__}: {reason}"
            if attempt < retries:
                time.sleep(wait_s)
        raise ServerError(f"{problem} (after {retries + 1} attempts)")


def read_within(request: urllib.request.Request, timeout: float) -> bytes:
    """The body of one request, which must arrive within ``timeout`` seconds in all (a server that
    sends its answer a byte at a time is cut off, as one that sends nothing is)."""
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the answer took longer than --request-timeout {timeout:g} s")
            if sock is not None:
                sock.settimeout(left)
            chunk = response.read1(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """What a served-model backend is built from."""

    model: str  # the name the server knows
    base_url: str
    api_key_env: str  # the environment variable holding the key (never the key)
    request_timeout: float
    max_retries: int
    concurrency: int  # requests in flight per rank
    tokenizer: str | None  # local tokenizer folder (default: the model name when it is a folder)
    trust_remote_code: bool
    max_length: int | None
    seed: int
    scores: bool  # the run has loglikelihood requests: the server must return prompt logprobs

    def server(self) -> Server:
        return Server(
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            timeout=self.request_timeout,
            max_retries=self.max_retries,
        )


def run_concurrently(
    calls: Sequence[Callable[[], Any]], concurrency: int, progress: Callable[[list[tuple[int, Any]]], None]
) -> list[Any]:
    """Every call's result by position, at most ``concurrency`` in flight; each finished call is
    reported as soon as it returns. A call starts only when one before it has finished, so after
    a failure (or a stop raised by ``progress``) nothing new starts; the calls in flight are waited
    for and what they return is reported too, then the first failure is raised."""
    out: list[Any] = [None] * len(calls)
    waiting = iter(range(len(calls)))
    with ThreadPoolExecutor(
        max_workers=max(min(concurrency, len(calls)), 1), thread_name_prefix="evalkit-http"
    ) as pool:
        running: dict[Future, int] = {}

        def start_next() -> None:
            position = next(waiting, None)
            if position is not None:
                running[pool.submit(calls[position])] = position

        for _ in range(concurrency):
            start_next()
        failure: BaseException | None = None
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            done = []
            for future in sorted(finished, key=running.__getitem__):
                position = running.pop(future)
                if future.exception() is not None:
                    failure = failure or future.exception()
                    continue
                out[position] = future.result()
                done.append((position, out[position]))
            try:
                progress(done)  # what finished is saved even when a call beside it failed
            except BaseException as stop:  # noqa: BLE001 - raised below, once the calls in flight are in
                failure = failure or stop
            if failure is None:
                for _ in done:
                    start_next()
    if failure is not None:
        raise failure
    return out


class OpenAICompletions:
    """A model served behind ``/completions``."""

    name = "openai-completions"
    route = "/completions"
    text_fields: tuple[str, ...] = ("text",)  # what a generation's choice must hold

    def __init__(
        self,
        model: str,
        *,
        server: Server,
        concurrency: int,
        tokenizer: Any | None,
        max_length: int,
        positions: int,
        seed: int,
    ) -> None:
        self.model = model
        self.server = server
        self.batch_size = concurrency
        self.num_parameters_local = None
        self.timings: dict[str, float] = {}
        self.token_counts: dict[str, int] = {}
        self.tokens = LMTokenizer(tokenizer, self.timings) if tokenizer is not None else None
        self.max_length = max_length
        # The server (vLLM) wants room for one generated token after a scored prompt.
        self.window = scoring_window(max_length, positions)
        self.seed = seed

    @classmethod
    def load(cls, options: ServerOptions) -> OpenAICompletions:
        server = options.server()
        check_reachable(server)
        model = options.model
        tokenizer_path = options.tokenizer or (model if (Path(model) / "config.json").is_file() else None)
        tokenizer, positions = None, options.max_length or DEFAULT_MAX_LENGTH
        if tokenizer_path is not None:
            import transformers

            remote = options.trust_remote_code
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=remote)
            if (Path(tokenizer_path) / "config.json").is_file():
                hf_config = transformers.AutoConfig.from_pretrained(tokenizer_path, trust_remote_code=remote)
                positions = model_max_length(hf_config, tokenizer)
        backend = cls(
            model,
            server=server,
            concurrency=options.concurrency,
            tokenizer=tokenizer,
            max_length=options.max_length or positions,
            positions=positions,
            seed=options.seed,
        )
        if options.scores:
            backend.check_scoring()
        return backend

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.model,
            "server": self.server.base_url,
            "route": self.route,
            "max_length": self.max_length,
            "concurrency": self.batch_size,
        }

    def check_scoring(self) -> None:
        """Loglikelihood needs a local tokenizer (for the context/continuation boundary) and a
        server that returns prompt logprobs; refuse the run before any request otherwise."""
        if self.tokens is None:
            raise UsageError(
                f"loglikelihood tasks through {self.name} need the model's tokenizer: pass --tokenizer DIR "
                f"(or --model as the local checkpoint folder the server serves)"
            )
        probe = self.tokens.encode("The probe")
        try:
            self._prompt_logprobs(probe, probe=True)
        except ServerError as exc:
            if exc.status is None:  # the server failed (5xx, no answer, garbage) after every retry
                raise
            refusal: Exception = exc  # it refused the request (400: echo with logprobs unsupported)
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # it answered without logprobs
            refusal = exc
        else:
            return
        raise UsageError(
            f"the server at {self.server.base_url} returns no prompt logprobs (echo with logprobs), which "
            f"loglikelihood tasks need ({one_line(refusal)[:160]}); run them with --backend vllm or hf, or on a "
            f"vLLM/SGLang server"
        )

    def _prompt_logprobs(self, tokens: list[int], probe: bool = False) -> list[tuple[float, float]]:
        """(log-prob of the token, the best log-prob at its position) for every prompt token but the
        first. The start-up ``probe`` takes an answer without logprobs (that server has none)."""
        body = {
            "model": self.model,
            "prompt": tokens,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
        }
        fields = () if probe else ("logprobs.token_logprobs", "logprobs.top_logprobs")
        answer = self.server.post(self.route, body, check=lambda a: one_choice(a, *fields))
        logprobs = answer["choices"][0]["logprobs"]
        values, tops = logprobs["token_logprobs"], logprobs["top_logprobs"]
        out = []
        for position in range(1, len(tokens)):
            value = float(values[position])
            best = max([value, *(float(v) for v in (tops[position] or {}).values())])
            out.append((value, best))
        return out

    # -- scoring ------------------------------------------------------------------------------

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        assert self.tokens is not None  # check_scoring ran at load
        return self._score([self.tokens.encode_pair(c, x) for c, x in pairs], progress)

    def _score(self, encoded: list[tuple[list[int], list[int]]], progress: Progress) -> list[tuple[float, bool]]:
        calls = [lambda c=c, x=x: self._score_one(c, x) for c, x in encoded]
        return run_concurrently(calls, self.batch_size, progress)

    def _score_one(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(summed log-prob, greedy) of one continuation from one echo request."""
        tokens, context_len = prompt_in_window(context, continuation, self.window)
        scored = self._prompt_logprobs(tokens)[max(context_len, 1) - 1 :]
        # The same greedy test as lm-eval's API models: the token is the server's top choice.
        return sum(v for v, _ in scored), all(v >= best for v, best in scored)

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        assert self.tokens is not None
        tokens = self.tokens

        def one(text: str) -> float:
            """One text, its windows one after another: the texts are the concurrent calls."""
            return rolling_loglikelihoods(
                [text],
                tokens.encode,
                tokens.prefix_token_id,
                self.window - 1,
                1,
                lambda windows: [self._score_one(context, scored) for context, scored in windows],
                lambda finished: None,
            )[0]

        return run_concurrently([lambda t=t: one(t) for t in texts], self.batch_size, progress)

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        if any(not isinstance(r.context, str) or r.images for r in requests):
            raise ValueError(f"the {self.name} backend takes text prompts only")
        calls = []
        for members, kwargs, budget in generation_groups(requests, self.max_length):
            for i in members:
                calls.append((i, lambda i=i, kw=kwargs, b=budget: self._generate(requests[i].context, kw, b)))
        order = [i for i, _ in calls]
        texts = run_concurrently(
            [call for _, call in calls], self.batch_size, lambda done: progress([(order[p], t) for p, t in done])
        )
        out = [""] * len(requests)
        for position, text in zip(order, texts, strict=True):
            out[position] = text
        return out

    def _generate(self, context: str, kwargs: dict[str, Any], budget: int) -> str:
        body = {"model": self.model, **self._sampling(kwargs), **self._prompt(context, budget)}
        if self.tokens is not None:
            body["return_token_ids"] = True  # vLLM: the generated ids, decoded here as the other backends do
        answer = self.server.post(self.route, body, check=lambda a: one_choice(a, *self.text_fields))
        token_ids = answer["choices"][0].get("token_ids")
        if self.tokens is not None and token_ids is not None:
            return self.tokens.decode_generated(token_ids, kwargs["until"])
        return cut_at_stop(self._text(answer), kwargs["until"])

    def _prompt(self, context: str, budget: int) -> dict[str, Any]:
        """Token ids cut to the prompt budget when the tokenizer is known (as the in-process backends
        send them), else the text for the server to tokenize."""
        if self.tokens is None:
            return {"prompt": context}
        return {"prompt": self.tokens.encode(context)[-budget:]}

    @staticmethod
    def _text(answer: dict[str, Any]) -> str:
        return answer["choices"][0]["text"] or ""

    def _sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": kwargs["max_gen_toks"],
            "temperature": kwargs["temperature"] if kwargs["do_sample"] else 0.0,
            "seed": self.seed,
        }
        stops = [s for s in kwargs["until"] if s]
        if stops:
            body["stop"] = stops
        body.update({k: v for k, v in kwargs.items() if k in API_SAMPLING_KEYS})
        return body


class OpenAIChat(OpenAICompletions):
    """A model served behind ``/chat/completions``: each prompt is one user message, and the server
    applies the model's chat template."""

    name = "openai-chat"
    route = "/chat/completions"
    text_fields = ("message",)

    def _prompt(self, context: str, budget: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": context}]}

    @staticmethod
    def _text(answer: dict[str, Any]) -> str:
        return answer["choices"][0]["message"]["content"] or ""


def check_reachable(server: Server, flag: str = "--base-url") -> dict[str, Any]:
    """The server's ``/models`` answer; a one-line usage error naming ``flag`` when nothing
    OpenAI-compatible answers there."""
    try:
        return server.call("/models", None, retries=server.max_retries, timeout=min(server.timeout, PROBE_TIMEOUT_S))
    except ServerError as exc:
        hint = "" if server.base_url.rstrip("/").endswith("/v1") else "; the base URL usually ends in /v1"
        raise UsageError(f"cannot reach an OpenAI-compatible server at {flag} {server.base_url}: {exc}{hint}") from None
