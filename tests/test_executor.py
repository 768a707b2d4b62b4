"""The executor's saving, retries, isolation and stops, and scoring of what it saved, driven by a
fake backend in-process: no model, no process group."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from evalkit.execute import Executor, StopFlag, StopRequested
from evalkit.models.protocol import Backend, GenerationInput, ImageInput, Progress
from evalkit.monitor import Monitor
from evalkit.parallel import Layout, Topology
from evalkit.sharding import merge_shards
from evalkit.shards import ShardWriter, read_records
from evalkit.tasks.library import BUNDLED, TaskLibrary
from evalkit.tasks.requests import PromptOptions, Request, Visuals, build_plans, number_requests
from evalkit.tasks.scoring import RequestError, score


class FakeBackend:
    """Answers from the request's text alone, in batches; fails any batch holding a poisoned text."""

    name = "fake"
    num_parameters_local = 0
    timings: dict[str, float] = {}  # noqa: RUF012 - read only
    token_counts: dict[str, int] = {}  # noqa: RUF012 - read only

    def __init__(self, batch_size: int, poison: set[str] = frozenset(), answer=None) -> None:
        self.batch_size = batch_size
        self.poison = poison
        self.answer = answer or (lambda context, continuation: -float(len(continuation)))
        self.calls: list[list[str]] = []
        self.loaded_images = 0

    def _run(self, items: list, text, result, progress: Progress) -> list:
        out = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            self.calls.append([text(i) for i in batch])
            if any(text(i) in self.poison for i in batch):
                raise RuntimeError("poisoned batch")
            done = [(start + k, result(i)) for k, i in enumerate(batch)]
            out.extend(r for _, r in done)
            progress(done)
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        return self._run(pairs, lambda p: p[0] + p[1], lambda p: (self.answer(*p), False), progress)

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        return self._run(texts, lambda t: t, lambda t: -float(len(t)), progress)

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        def result(request: GenerationInput) -> str:
            images = request.images.load() if request.images else []
            self.loaded_images += len(images)
            return f"{request.context[-3:]}|{len(images)}"

        return self._run(requests, lambda r: r.context, result, progress)

    def describe(self) -> dict:
        return {}


def topology() -> Topology:
    return Topology(layout=Layout(world_size=1), rank=0, local_rank=0, device=torch.device("cpu"), backend="gloo")


def make_requests(texts: list[str], kind: str = "loglikelihood_rolling") -> list[Request]:
    args = {"loglikelihood_rolling": lambda t: (t,), "generate_until": lambda t: (t, {"until": ["\n"]})}[kind]
    return [Request(i, "t", i, 0, 0, kind, args(t), key=f"k{i}") for i, t in enumerate(texts)]


def execute(tmp_path, backend: Backend, requests: list[Request], on_error: str = "fail", **kwargs) -> list[dict]:
    shard = tmp_path / "shard.jsonl"
    monitor = Monitor(topology(), total=len(requests), stall_timeout=300)
    try:
        with ShardWriter(shard, interval=60) as writer:
            Executor(topology(), backend, writer, monitor, kwargs.pop("stop", StopFlag()), on_error, **kwargs).run(
                requests
            )
    finally:
        monitor.close()
    return list(read_records(shard))


def test_every_result_is_saved_under_its_request_key(tmp_path):
    texts = [f"text {i}" * (i + 1) for i in range(7)]
    records = execute(tmp_path, FakeBackend(batch_size=3), make_requests(texts))
    assert sorted((r["k"], r["r"]) for r in records) == sorted((f"k{i}", -float(len(t))) for i, t in enumerate(texts))


def test_a_failing_batch_fails_the_run_unless_errors_are_recorded(tmp_path):
    texts = [f"t{i}" for i in range(7)]
    with pytest.raises(RuntimeError, match="poisoned"):
        execute(tmp_path, FakeBackend(batch_size=3, poison={"t4"}), make_requests(texts))


def test_recorded_errors_isolate_the_failing_request_only(tmp_path):
    texts = [f"t{i}" for i in range(8)]
    backend = FakeBackend(batch_size=3, poison={"t4"})
    records = execute(tmp_path, backend, make_requests(texts), on_error="record")
    by_key = {r["k"]: r for r in records}
    assert set(by_key) == {f"k{i}" for i in range(8)}
    assert "RuntimeError: poisoned batch" in by_key["k4"]["error"]
    assert all("r" in by_key[f"k{i}"] for i in range(8) if i != 4)
    # First pass: [t0 t1 t2] saved, [t3 t4 t5] fails. The rest is retried in batch-sized chunks, and
    # only a chunk that fails again runs one by one: t3, t4 (recorded), t5; then [t6 t7].
    assert backend.calls == [
        ["t0", "t1", "t2"],
        ["t3", "t4", "t5"],
        ["t3", "t4", "t5"],
        ["t3"],
        ["t4"],
        ["t5"],
        ["t6", "t7"],
    ]


def test_a_stop_ends_the_loop_after_the_batch_in_flight(tmp_path):
    stop = StopFlag()

    class StopsAfterTwoBatches(FakeBackend):
        def _run(self, items, text, result, progress):
            def counting(done):
                if len(self.calls) == 2:
                    stop.signal = signal.SIGTERM
                progress(done)

            return super()._run(items, text, result, counting)

    with pytest.raises(StopRequested):
        execute(tmp_path, StopsAfterTwoBatches(batch_size=2), make_requests([f"t{i}" for i in range(9)]), stop=stop)
    assert sorted(r["k"] for r in read_records(tmp_path / "shard.jsonl")) == ["k0", "k1", "k2", "k3"]


def test_images_are_looked_up_per_request_and_loaded_by_the_backend(tmp_path):
    asked: list[Visuals] = []

    def images(visuals: Visuals) -> ImageInput:
        asked.append(visuals)
        return ImageInput(visuals.digests, load=lambda: ["pixels"] * len(visuals.digests))

    requests = make_requests(["one", "two", "three"], kind="generate_until")
    requests[1] = Request(1, "t", 1, 0, 0, "generate_until", ("two", {}), key="k1", visuals=Visuals("t", 1, ("a", "b")))
    backend = FakeBackend(batch_size=2)
    records = execute(tmp_path, backend, requests, images=images)
    assert {r["k"]: r["r"] for r in records} == {"k0": "one|0", "k1": "two|2", "k2": "ree|0"}
    assert asked == [Visuals("t", 1, ("a", "b"))] and backend.loaded_images == 2


def test_scoring_reads_what_the_executor_saved(tmp_path):
    """demo_mc through lm-eval's own process_results: a backend that prefers the gold choice scores 1.0,
    one that prefers the shortest choice scores what counting the docs says it should."""
    loaded = TaskLibrary([BUNDLED]).load_checked(["demo_mc"])
    plans = build_plans(loaded["tasks"], PromptOptions(limit=12))
    requests = number_requests(plans)
    (plan,) = plans
    docs = {i.doc_id: i.doc for i in plan.task.instances}
    gold = {
        i.args: plan.task.doc_to_choice(docs[i.doc_id])[plan.task.doc_to_target(docs[i.doc_id])]
        for i in plan.task.instances
    }
    requests = [
        Request(r.index, r.task, r.doc_id, r.instance, r.repeat, r.kind, r.args, key=f"k{r.index}") for r in requests
    ]

    def outputs_of(answer) -> list:
        folder = tmp_path / answer.__name__
        folder.mkdir()
        records = execute(folder, FakeBackend(batch_size=4, answer=answer), requests, on_error="record")
        index = {r.key: r.index for r in requests}
        return merge_shards(
            [[(index[r["k"]], r["r"] if "r" in r else RequestError(r["error"])) for r in records]], len(requests)
        )

    def prefers_gold(context, continuation):
        return 0.0 if continuation.strip() == str(gold[(context, continuation)]).strip() else -5.0

    def prefers_short(context, continuation):
        return -float(len(continuation))

    exact = score(plans, {}, outputs_of(prefers_gold), bootstrap_iters=0)
    assert exact.results["results"]["demo_mc"]["acc,none"] == 1.0
    short = score(plans, {}, outputs_of(prefers_short), bootstrap_iters=0)
    expected = sum(
        min(plan.task.doc_to_choice(doc), key=lambda c: (len(f" {c}"),))
        == plan.task.doc_to_choice(doc)[plan.task.doc_to_target(doc)]
        for doc in docs.values()
    ) / len(docs)
    assert short.results["results"]["demo_mc"]["acc,none"] == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    assert json.dumps(short.samples["demo_mc"])  # rows are JSON
