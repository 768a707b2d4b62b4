"""The evaluation every rank runs, one way down:

preflight (every rank checks its inputs) -> plan (rank 0 builds every request with lm-eval in
global order and hands each rank its share) -> load the model -> execute (model calls in batches,
results streamed to shards) -> merge (rank 0 reads the shards back by global index) -> score and
write (lm-eval's metrics, results.json, samples).

Bad input ends every rank with one line and exit code 2; any other exception ends the failing
rank at once with its message, which ends the others (their collectives fail, and the launcher
stops the group).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evalkit import execute, merge, plan, preflight, results
from evalkit.config import RunConfig
from evalkit.errors import USAGE_EXIT_CODE, RunFailed, UsageError, disk_full, no_space, say
from evalkit.judge import JudgeProxy
from evalkit.models import registry
from evalkit.models.protocol import Backend
from evalkit.models.registry import BuildContext
from evalkit.monitor import Monitor
from evalkit.outdir import write_manifest
from evalkit.output_lock import OutputLock
from evalkit.parallel import (
    AgreedError,
    CollectiveError,
    Topology,
    announce_failure,
    ended_by_peer,
    init_topology,
    launcher_rank,
    posted_failure,
    settle_before_exit,
    shutdown,
)
from evalkit.rounds import Rounds
from evalkit.shards import SHARD_DIR, ShardWriter
from evalkit.tasks.images import VisualSource
from evalkit.timings import Phases


class Stopped(Exception):
    """The run stopped on a signal after saving its finished results."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def quiet_libraries() -> None:
    """Library progress bars and warnings would repeat once per rank; evalkit reports progress itself."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # lm-eval warns about defaults it fills in (aggregations, higher_is_better) on every run.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):  # lmms-eval's task code logs through loguru at INFO
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")


def set_seeds(config: RunConfig) -> None:
    random.seed(config.seed.python)
    np.random.seed(config.seed.numpy)
    torch.manual_seed(config.seed.torch)


def plan_run(config: RunConfig, topo: Topology, inputs: preflight.Inputs, judge: JudgeProxy | None) -> plan.RunPlan:
    """Rank 0: tasks, requests and their identities, each checked before anything loads."""
    loaded = plan.load_tasks(config, inputs.model, judge.url if judge else None)
    preflight.check_tasks(config, loaded["tasks"])
    tasks, requests = plan.build_requests(config, inputs.model, loaded["tasks"])
    preflight.check_requests(config, topo, inputs, requests)
    return plan.identify(config, inputs, tasks, loaded.get("groups", {}), requests)


@dataclass
class Ready:
    """What a rank holds before its model calls; ``run_plan`` only on rank 0."""

    work: plan.Work
    run_plan: plan.RunPlan | None
    images: VisualSource
    backend: Backend
    rounds: Rounds | None  # rank 0 of a run with multi-round docs: their later rounds


def prepare(config: RunConfig, topo: Topology, phases: Phases, judge: JudgeProxy | None, lock: OutputLock) -> Ready:
    """Preflight on every rank and the output folder taken, the plan on rank 0 (each rank handed its
    share), images, model."""

    def check() -> preflight.Inputs:
        inputs = preflight.check_inputs(config, topo)
        lock.acquire()
        return inputs

    inputs = topo.agreed(check)
    box: dict[str, plan.RunPlan] = {}

    def plan_and_deal() -> list[plan.Work]:
        box["plan"] = plan_run(config, topo, inputs, judge)
        return plan.deal(box["plan"], topo.layout.dp, lock.launch)

    with phases.phase("plan"):
        work = topo.hand_out(plan_and_deal)
    run_plan = box.get("plan")
    with phases.phase("images"):
        images = topo.agreed(lambda: execute.image_source(config, topo, inputs.model, run_plan, work.requests))
    with phases.phase("model_load"):
        context = BuildContext(model=inputs.model, topo=topo, kinds=work.kinds)
        backend = topo.agreed(lambda: inputs.spec.build(config, context))
    rounds = Rounds.of(run_plan, config.output) if run_plan is not None and work.rounds else None
    return Ready(work=work, run_plan=run_plan, images=images, backend=backend, rounds=rounds)


def run_requests(config: RunConfig, topo: Topology, ready: Ready, phases: Phases) -> list[dict[str, Any]]:
    """This rank's model calls, saved to its shard as they finish; every rank's stats, gathered."""
    work, backend = ready.work, ready.backend
    shard = config.output / SHARD_DIR / f"{work.launch}-rank{topo.rank:05d}.jsonl"
    writer = ShardWriter(shard, interval=config.flush_interval) if topo.carries_results else None
    monitor = Monitor(
        topo,
        total=work.pending,
        stall_timeout=config.stall_timeout,
        before_exit=writer.sync if writer else lambda: None,
    )
    stop = execute.StopFlag()
    stop.install()
    executor = execute.Executor(topo, backend, writer, monitor, stop, config.on_error, images=ready.images.images)
    t0 = time.time()
    ran = len(work.requests)
    try:
        with writer or contextlib.nullcontext(), phases.phase("model_calls"):
            executor.run(work.requests)
            while work.rounds:  # the next rounds of multi-round docs, wave by wave
                monitor.idle()
                if writer is not None:
                    writer.sync()
                topo.all_gather(None)  # every rank's answers are on disk before rank 0 reads them
                work = topo.hand_out(functools.partial(next_wave, ready.rounds, work.launch, topo.layout.dp))
                monitor.more(work.pending)
                executor.run(work.requests)
                ran += len(work.requests)
    except execute.StopRequested:
        raise Stopped(stop.signal) from None
    except UsageError:  # a later round's bad input: its one line goes below the progress bar
        monitor.abandon()
        raise
    finally:
        stop.restore()
    for name, seconds in backend.timings.items():
        phases.add(f"model_calls.{name}", seconds)
    monitor.idle()
    gathering = time.monotonic()
    stats = topo.all_gather(
        {
            "rank": topo.rank,
            "dp_rank": topo.dp_rank,
            "tp_rank": topo.tp_rank,
            "requests": ran,
            "seconds": round(time.time() - t0, 3),
            "parameters": backend.num_parameters_local,
            "written": writer.written if writer else 0,
            "token_counts": dict(backend.token_counts),
        },
    )
    monitor.close()
    phases.add("gather", time.monotonic() - gathering)
    return stats


def next_wave(rounds: Rounds | None, launch: str, dp: int) -> list[plan.Work]:
    """Rank 0: the next rounds of multi-round docs, dealt (``evalkit.rounds``)."""
    assert rounds is not None, "only rank 0, which planned the run, deals later rounds"
    return rounds.wave(launch, dp)


def evaluate(config: RunConfig, topo: Topology) -> None:
    started = time.time()
    phases = Phases()
    quiet_libraries()
    set_seeds(config)
    with OutputLock(config.output, holder=topo.rank == 0) as lock, judge_proxy(config, topo) as judge:
        ready = prepare(config, topo, phases, judge, lock)
        if ready.run_plan is not None:
            write_manifest(config.output, model=ready.run_plan.model, tasks=ready.run_plan.task_hashes)
        stats = run_requests(config, topo, ready, phases)
        if ready.run_plan is not None:
            with phases.phase("merge"):
                written = sum(s["written"] for s in stats)
                outputs = merge.merge_results(config.output, ready.run_plan, ready.work.launch, written)
                if ready.rounds is not None:
                    outputs = ready.rounds.fold(outputs)
            done = ready.run_plan.done
            resume = {"reused": len(done), "computed": len(ready.run_plan.requests) - len(done)}
            # Scoring code that draws random numbers (mmmu's parse of an unmatched answer) sees the
            # seeded state lm-eval and lmms-eval give it, whatever planning and the layout drew.
            set_seeds(config)
            scored = results.score_outputs(config, ready.run_plan, outputs, phases, judge)
            described = {"backend": ready.backend.name, **ready.backend.describe()}
            results.write_outputs(config, topo, scored, described, stats, started, resume, phases)


def judge_proxy(config: RunConfig, topo: Topology) -> contextlib.AbstractContextManager[JudgeProxy | None]:
    """The judge's local proxy on global rank 0 (the rank that loads task code first and scores), from
    before the tasks load until the results are written; none elsewhere or without a judge."""
    options = config.judge_options()
    if options is None or topo.rank != 0:
        return contextlib.nullcontext()
    return JudgeProxy(options, config.output)


def run_guarded(config: RunConfig) -> int:
    """Run on this rank; turn bad input into exit 2 and any crash into a prompt exit 1."""
    rank = launcher_rank()
    try:
        placement = registry.tp_placement(config)
        topo = init_topology(config.tp, config.device, config.timeout, config.gpus_per_rank, placement)
        evaluate(config, topo)
    except UsageError as exc:
        say(f"evalkit: error: {exc}")
        if isinstance(exc, AgreedError):
            settle_before_exit()
        shutdown()
        return USAGE_EXIT_CODE
    except Stopped as stopped:
        say(f"evalkit: rank {rank} stopped by {stopped}; finished results are saved, rerun with --resume to continue")
        os._exit(stopped.exit_code)
    except KeyboardInterrupt:
        say(f"evalkit: rank {rank} interrupted; finished results are saved, rerun with --resume to continue")
        os._exit(130)
    except BaseException as exc:  # noqa: BLE001 - a crash must end this rank now, never wait on peers
        full = no_space(exc)
        # A collective that broke because another rank failed and said so (gloo raises a plain
        # RuntimeError for a peer that closed its connection): that rank's line is the news.
        peer = posted_failure() if isinstance(exc, (CollectiveError, RuntimeError)) else None
        if not isinstance(exc, RunFailed) and full is None and peer is None:  # the rest is a bug
            traceback.print_exc()
        if peer is not None:
            say(ended_by_peer(rank, peer))
            os._exit(1)
        if full is not None:
            line = f"evalkit: rank {rank} failed: {disk_full(full, config.output)}"
        else:
            line = f"evalkit: rank {rank} failed: {type(exc).__name__}: {exc}"
        say(line)
        announce_failure(line)
        os._exit(1)
    if shutdown():
        # Everything is written and closed. Interpreter teardown after destroy_process_group can still
        # abort (SIGABRT, "terminate called without an active exception") when gloo's worker threads
        # release objects late, failing a finished run; so a distributed rank ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
