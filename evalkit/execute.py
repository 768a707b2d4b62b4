"""Execute: this rank runs its requests; results are saved as each batch finishes, stops come
between batches.

Results go to this rank's shard the moment a batch returns. SIGINT/SIGTERM ask the loop to stop
after the current batch; the shard is flushed and the run can be resumed. With
``on_error="record"`` a request whose model call fails is retried alone and, if it fails again,
saved as an error (never as an empty answer) instead of ending the run.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable
from typing import Any

from evalkit.config import RunConfig
from evalkit.errors import UsageError, one_line
from evalkit.models.protocol import KINDS, Backend, GenerationInput, ImageInput, Progress
from evalkit.monitor import Monitor
from evalkit.parallel import CollectiveError, Topology
from evalkit.plan import RunPlan, load_tasks
from evalkit.shards import ShardWriter
from evalkit.tasks.images import VisualSource
from evalkit.tasks.requests import Request, Visuals


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; the loop ends after the batch in flight."""


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# A request's images, loaded lazily on this rank (``evalkit.tasks.images.VisualSource.images``).
ImagesOf = Callable[[Visuals], ImageInput]


def no_images(visuals: Visuals) -> ImageInput:
    raise ValueError(f"task '{visuals.task}' gives images, but this run has no image source")


def call_backend(backend: Backend, kind: str, requests: list[Request], on_batch: Progress, images: ImagesOf) -> None:
    if kind == "loglikelihood":
        backend.loglikelihood([(r.args[0], r.args[1]) for r in requests], on_batch)
    elif kind == "loglikelihood_rolling":
        backend.loglikelihood_rolling([r.args[0] for r in requests], on_batch)
    else:
        inputs = [
            GenerationInput(r.args[0], r.args[1] or {}, images(r.visuals) if r.visuals else None) for r in requests
        ]
        backend.generate_until(inputs, on_batch)


class Executor:
    def __init__(
        self,
        topo: Topology,
        backend: Backend,
        writer: ShardWriter | None,
        monitor: Monitor,
        stop: StopFlag,
        on_error: str,
        images: ImagesOf = no_images,
    ) -> None:
        self.topo = topo
        self.backend = backend
        self.images = images
        self.writer = writer
        self.monitor = monitor
        self.stop = stop
        self.on_error = on_error
        self.errors = 0

    def run(self, requests: list[Request]) -> None:
        for kind in KINDS:
            batch = [r for r in requests if r.kind == kind]
            if batch:
                self._run_kind(kind, batch)

    def _run_kind(self, kind: str, requests: list[Request]) -> None:
        finished: set[int] = set()
        try:
            call_backend(self.backend, kind, requests, lambda done: self._save(requests, done, finished), self.images)
        except (StopRequested, CollectiveError):
            raise  # a stop or a broken process group is never one request's fault
        except Exception:
            if self.on_error != "record":
                raise
            self._isolate(kind, [r for i, r in enumerate(requests) if i not in finished])

    def _isolate(self, kind: str, requests: list[Request]) -> None:
        """After a failed call: the rest in batch-sized chunks, and only a failing chunk one by one."""
        size = self.backend.batch_size
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            finished: set[int] = set()
            try:
                call_backend(
                    self.backend, kind, chunk, lambda done, c=chunk, f=finished: self._save(c, done, f), self.images
                )
            except (StopRequested, CollectiveError):
                raise
            except Exception:
                for request in [r for i, r in enumerate(chunk) if i not in finished]:
                    self._run_alone(kind, request)

    def _run_alone(self, kind: str, request: Request) -> None:
        try:
            call_backend(self.backend, kind, [request], lambda done: self._save([request], done, set()), self.images)
        except (StopRequested, CollectiveError):
            raise
        except Exception as exc:  # noqa: BLE001 - recorded per request, excluded from metrics
            self.errors += 1
            message = f"{type(exc).__name__}: {exc}"
            self._write(
                [
                    {
                        "k": request.key,
                        "task": request.task,
                        "doc_id": request.doc_id,
                        "error": message,
                        "trace": traceback.format_exc(limit=3),
                    }
                ]
            )
            self.monitor.finished([f"{request.task}:{request.doc_id}"], 1)

    def _save(self, requests: list[Request], done: list[tuple[int, Any]], finished: set[int]) -> None:
        records = []
        for position, result in done:
            request = requests[position]
            finished.add(position)
            records.append({"k": request.key, "task": request.task, "doc_id": request.doc_id, "r": result})
        self._write(records)
        self.monitor.finished([f"{r['task']}:{r['doc_id']}" for r in records], len(records))
        if self._should_stop():
            raise StopRequested

    def _write(self, records: list[dict[str, Any]]) -> None:
        if self.writer is not None:
            self.writer.add(records)

    def _should_stop(self) -> bool:
        """A stop must be taken by every rank of a TP group at the same batch, or the others hang."""
        return self.topo.any_in_tp_group(self.stop.signal is not None)


def image_source(
    config: RunConfig, topo: Topology, model_path: str, plan: RunPlan | None, share: list[Request]
) -> VisualSource:
    """Where this rank finds its requests' images: rank 0 in the tasks it built, the other ranks in
    their own copy of the tasks, loaded here (before the model calls) when their share has images."""
    if plan is not None:
        tasks = {p.name: p.task for p in plan.tasks}
        return VisualSource(lambda: tasks)
    source = VisualSource(lambda: load_tasks(config, model_path)["tasks"])
    try:
        source.prepare({r.visuals.task for r in share if r.visuals is not None})
    except (KeyError, OSError, ValueError) as exc:
        raise UsageError(f"loading the image tasks on rank {topo.rank}: {one_line(exc)}") from None
    return source
