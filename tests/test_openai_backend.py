"""The OpenAI-compatible server backends' own logic, against a stub server on localhost: bounded
concurrency, retries with backoff, client-side stop sequences, the key kept out of every output,
and one-line refusals (exit 2) for a server that cannot serve the run. Runs against a real
``vllm serve`` are in tests/test_vllm.py."""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubBehaviour
from test_bad_input import assert_usage_error

from evalkit.cli import parse_config
from evalkit.config import RunConfig
from evalkit.errors import UsageError
from evalkit.models import registry
from evalkit.models.openai_api import (
    OpenAICompletions,
    Server,
    ServerError,
    ServerOptions,
    one_choice,
    run_concurrently,
)
from evalkit.models.registry import BuildContext, RunKinds

from conftest import TINY_MODEL, free_port, run_evalkit


def served_args(base_url: str, *extra: str, backend: str = "openai-completions") -> list[str]:
    return [
        "--model",
        "stub-model",
        "--tokenizer",
        str(TINY_MODEL),
        "--backend",
        backend,
        "--base-url",
        base_url,
        *extra,
    ]


def test_run_concurrently_bounds_the_calls_in_flight_and_reports_each():
    """Each call holds until released; a releaser lets one go only once exactly min(3, calls left)
    are in flight, so the bound is reached and never exceeded, with nothing timed."""
    calls, concurrency, wait_s = 40, 3, 30
    changed = threading.Condition()
    in_flight: set[int] = set()
    released: set[int] = set()
    most, seen, reported, problems = [0], [], [], []

    def call(i: int) -> int:
        with changed:
            in_flight.add(i)
            most[0] = max(most[0], len(in_flight))
            changed.notify_all()
            if not changed.wait_for(lambda: i in released, timeout=wait_s):
                problems.append(f"call {i} was never released")
            in_flight.discard(i)
            changed.notify_all()
        return i * i

    def release_in_turn() -> None:
        with changed:
            for step in range(calls):
                want = min(concurrency, calls - step)
                if not changed.wait_for(lambda want=want: len(in_flight - released) >= want, timeout=wait_s):
                    problems.append(f"step {step}: {len(in_flight - released)} calls in flight, expected {want}")
                    break
                held = in_flight - released
                seen.append(len(held))
                released.add(min(held))
                changed.notify_all()
            released.update(range(calls))  # never leave a call waiting, whatever happened above
            changed.notify_all()

    releaser = threading.Thread(target=release_in_turn, daemon=True)
    releaser.start()
    out = run_concurrently([lambda i=i: call(i) for i in range(calls)], concurrency, reported.extend)
    releaser.join(wait_s)
    assert not problems, problems
    assert seen == [min(concurrency, calls - step) for step in range(calls)]
    assert most[0] == concurrency
    assert out == [i * i for i in range(calls)]
    assert sorted(reported) == [(i, i * i) for i in range(calls)]


def test_run_concurrently_raises_the_first_failure_and_starts_nothing_more():
    started = []

    def call(i: int) -> int:
        started.append(i)
        if i == 2:
            raise ServerError("boom")
        return i

    with pytest.raises(ServerError, match="boom"):
        run_concurrently([lambda i=i: call(i) for i in range(50)], 1, lambda done: None)
    assert len(started) < 50


def test_server_retries_429_and_5xx_then_gives_up_with_the_reason():
    with OpenAIStub(StubBehaviour(failures_per_prompt=2, failure_status=429)) as stub:
        server = Server(stub.base_url, "UNSET_KEY_VARIABLE", timeout=10, max_retries=2, backoff=0.0)
        assert server.post("/completions", {"prompt": "a"})["choices"][0]["text"].startswith(" answer-")
        assert stub.behaviour.attempts[json.dumps("a")] == 3
        fewer = Server(stub.base_url, "UNSET_KEY_VARIABLE", timeout=10, max_retries=1, backoff=0.0)
        with pytest.raises(ServerError, match="HTTP 429.*after 2 attempts"):
            fewer.post("/completions", {"prompt": "b"})


@pytest.mark.parametrize("kind", ["malformed", "empty", "two", "drop", "trickle"])
def test_answers_that_are_not_answers_are_retried(kind):
    """A 200 that is not JSON, has no choices or two for one, a dropped connection, and an answer sent
    a byte at a time past --request-timeout (which bounds the whole request): each a fault, retried."""
    behaviour = StubBehaviour(failures_per_prompt=1, failure_kind=kind, trickle_s=0.05)
    with OpenAIStub(behaviour) as stub:
        server = Server(stub.base_url, "UNSET_KEY_VARIABLE", timeout=1.0, max_retries=2, backoff=0.0)
        answer = server.post("/completions", {"prompt": kind}, check=lambda a: one_choice(a, "text"))
        assert answer["choices"][0]["text"].startswith(" answer-")
        # the trickled answer is whole and valid: only cutting it off at the timeout makes a second attempt
        assert behaviour.attempts[json.dumps(kind)] == 2


def test_start_up_calls_are_retried_like_requests():
    """A 503 on /models and on the prompt-logprobs probe (a server still starting) is retried, not
    taken for "unreachable" or "no prompt logprobs"."""
    behaviour = StubBehaviour(prompt_logprobs=True, get_failures=1, failures_per_prompt=1)
    with OpenAIStub(behaviour) as stub:
        config = replace(served_config(stub.base_url), max_retries=2)
        backend = OpenAICompletions.load(server_options(config, scores=True))
    assert backend.server.base_url == stub.base_url
    assert behaviour.get_failures == -1  # counted down by two GETs: the 503, then the model list
    assert list(behaviour.attempts.values()) == [2]  # the probe: a 503, then its logprobs


def test_answers_in_flight_when_a_request_fails_are_reported():
    """Nothing new starts after a failure, but what the calls in flight return still reaches
    ``progress`` (and so the shard) before the failure is raised."""
    failed = threading.Event()
    reported: list[tuple[int, int]] = []

    def call(i: int) -> int:
        if i == 0:
            failed.set()
            raise ServerError("HTTP 500 for good")
        assert failed.wait(30)
        return i

    with pytest.raises(ServerError, match="HTTP 500 for good"):
        run_concurrently([lambda i=i: call(i) for i in range(10)], 4, reported.extend)
    assert sorted(reported) == [(1, 1), (2, 2), (3, 3)]


def test_a_permanent_server_error_ends_in_one_line_with_every_answer_saved(tmp_path):
    """A prompt the server never answers (500 after every retry) ends the run with exit 1 and one
    line, no traceback; every answer the server sent is in the shards for --resume."""
    behaviour = StubBehaviour(always_fail_one_in=10, failure_status=500)
    with OpenAIStub(behaviour) as stub:
        args = served_args(stub.base_url, "--tasks", "demo_gen", "--concurrency", "4", "--max-retries", "1")
        run = run_evalkit(args, output=tmp_path / "out")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    # (the progress bar leaves its line open, so the message may follow it on the same line)
    (line,) = [line[line.index("evalkit:") :] for line in run.stderr.splitlines() if "evalkit:" in line]
    assert line.startswith("evalkit: rank 0 failed: ServerError: HTTP 500 from ") and "after 2 attempts" in line
    saved = sum(len(p.read_text().splitlines()) for p in (tmp_path / "out" / "shards").glob("*.jsonl"))
    assert 0 < saved == behaviour.answered


def test_client_errors_are_not_retried():
    with OpenAIStub(StubBehaviour(failures_per_prompt=5, failure_status=400)) as stub:
        server = Server(stub.base_url, "UNSET_KEY_VARIABLE", timeout=10, max_retries=4, backoff=0.0)
        with pytest.raises(ServerError, match="HTTP 400"):
            server.post("/completions", {"prompt": "c"})
        assert stub.behaviour.attempts[json.dumps("c")] == 1


@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat"])
def test_generation_through_a_flaky_server_completes_with_the_key_kept_secret(tmp_path, backend):
    secret = "sk-evalkit-test-not-a-real-key"
    behaviour = StubBehaviour(failures_per_prompt=1, failure_status=503, api_key=secret, hold_first=4)
    with OpenAIStub(behaviour) as stub:
        run = run_evalkit(
            served_args(stub.base_url, "--tasks", "demo_gen", "--concurrency", "4", backend=backend),
            output=tmp_path / "out",
            env={"OPENAI_API_KEY": secret},
        )
    assert run.returncode == 0, run.stderr[-2000:]
    docs = run.docs("demo_gen")
    assert len(docs) == 50
    # The stub's text continues past "\n\n"; the client cuts at the task's stop sequences.
    assert all(d["resps"][0][0].startswith(" answer-") and "rest" not in d["resps"][0][0] for d in docs)
    assert sum(behaviour.attempts.values()) == 2 * 50  # each prompt failed once, then answered
    # The stub holds the first 4 requests until all 4 are in flight together: the client reaches
    # its --concurrency and never goes past it.
    assert behaviour.hold_missed == 0
    assert behaviour.most_in_flight == 4
    assert set(behaviour.headers_seen) == {f"Bearer {secret}"}
    written = run.stdout + run.stderr + "".join(p.read_text() for p in run.output.rglob("*") if p.is_file())
    assert secret not in written
    assert run.results()["model"]["backend"] == backend


def test_loglikelihood_tasks_through_the_completions_route(tmp_path):
    with OpenAIStub(StubBehaviour(prompt_logprobs=True)) as stub:
        run = run_evalkit(served_args(stub.base_url, "--tasks", "demo_mc,demo_ppl"), output=tmp_path / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    docs = run.docs("demo_mc")
    assert docs and all(ll < 0 for d in docs for ((ll, _greedy),) in d["resps"])


@pytest.mark.multiprocess
def test_unreachable_base_url_ends_every_rank(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    args = served_args(dead, "--tasks", "demo_gen", "--max-retries", "1")  # the probe is retried like requests
    run = run_evalkit(args, launcher="torchrun", nproc=2, output=tmp_path / "out")
    assert "exitcode: 2" in run.stderr
    assert_usage_error(run, "cannot reach an OpenAI-compatible server", dead, ranks=2)


def test_loglikelihood_on_a_server_without_prompt_logprobs_is_refused(tmp_path):
    with OpenAIStub(StubBehaviour(prompt_logprobs=False)) as stub:
        run = run_evalkit(served_args(stub.base_url, "--tasks", "demo_mc"), output=tmp_path / "out")
    assert run.returncode == 2
    assert_usage_error(run, "returns no prompt logprobs", "--backend vllm")


def served_config(base_url: str, **fields) -> RunConfig:
    return RunConfig(
        model="stub-model",
        tasks=("demo_mc",),
        output=Path("unused"),
        backend="openai-completions",
        base_url=base_url,
        tokenizer=str(TINY_MODEL),
        **fields,
    ).validate()


def server_options(config: RunConfig, scores: bool) -> ServerOptions:
    kinds = frozenset({"loglikelihood"} if scores else {"generate_until"})
    return registry._server_options(config, BuildContext(model=config.model, topo=None, kinds=kinds))


def test_a_wrong_key_is_refused_before_any_request(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with OpenAIStub(StubBehaviour(api_key="right")) as stub:
        with pytest.raises(UsageError, match="cannot reach an OpenAI-compatible server.*HTTP 401"):
            OpenAICompletions.load(server_options(served_config(stub.base_url), scores=False))
        assert not stub.behaviour.attempts  # no completion was asked for


def test_chat_route_refuses_loglikelihood_tasks_before_loading():
    spec = registry.BACKENDS["openai-chat"]
    config = replace(served_config("http://127.0.0.1:1/v1"), backend="openai-chat", tokenizer=None)
    scoring = RunKinds(tasks={"loglikelihood": frozenset({"demo_mc"})})
    (problem,) = spec.problems(config, kinds=scoring)
    assert "runs generate_until requests, not loglikelihood (demo_mc)" in problem
    assert spec.problems(config, kinds=RunKinds(tasks={"generate_until": frozenset({"demo_gen"})})) == []


def test_loglikelihood_needs_a_tokenizer(monkeypatch):
    with OpenAIStub(StubBehaviour(prompt_logprobs=True)) as stub:
        config = replace(served_config(stub.base_url), tokenizer=None)
        with pytest.raises(UsageError, match="need the model's tokenizer: pass --tokenizer DIR"):
            OpenAICompletions.load(server_options(config, scores=True))


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--backend", "openai-chat"], ["--backend openai-chat needs --base-url"]),
        (["--base-url", "http://127.0.0.1:1/v1"], ["--base-url is for --backend openai-completions or openai-chat"]),
        (["--backend", "openai-completions", "--base-url", "localhost:8000"], ["must start with http://"]),
        (["--backend", "openai-chat", "--base-url", "http://x/v1", "--concurrency", "0"], ["--concurrency 0"]),
        (["--backend", "vllmm"], ["did you mean 'vllm'"]),
        (
            ["--backend", "openai-chat", "--base-url", "http://x/v1", "--apply-chat-template"],
            ["the server applies the model's chat template"],
        ),
    ],
    ids=[
        "no-base-url",
        "base-url-without-server-backend",
        "base-url-scheme",
        "concurrency",
        "backend-typo",
        "chat-template",
    ],
)
def test_bad_server_flags(args, fragments):
    with pytest.raises(UsageError) as error:
        parse_config(["--model", str(TINY_MODEL), "--tasks", "demo_gen", "--output", "unused", *args])
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_says_how_to_install(tmp_path):
    run = run_evalkit(
        ["--model", str(TINY_MODEL), "--tasks", "demo_gen", "--backend", "vllm", "--device", "cpu"],
        output=tmp_path / "out",
    )
    assert run.returncode == 2
    assert_usage_error(run, "--backend vllm needs the vllm package", "make install-vllm")
