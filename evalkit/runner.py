"""The evaluation loop every rank runs.

prepare (all ranks, global order) -> load model -> this rank's shard -> model calls in batches
-> gather to rank 0 -> rank 0 scores and writes. Bad input ends every rank with one line and
exit code 2; any other exception ends the failing rank at once with its message, which ends
the others (their collectives fail, and the launcher stops the group).
"""

from __future__ import annotations

import os
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evalkit.collectives import AgreedError, agreed, all_gather, gather_results
from evalkit.config import RunConfig
from evalkit.errors import USAGE_EXIT_CODE, UsageError, say
from evalkit.filters import FilterPipeline
from evalkit.model_source import check_model_source
from evalkit.models.hf import HFCausalLM
from evalkit.models.placement import input_device, load_model, local_parameter_count
from evalkit.parallel import Topology, init_topology, settle_before_exit, shutdown
from evalkit.planner import GIB, check_run_layout, read_shape
from evalkit.progress import WorldProgress
from evalkit.results import write_outputs
from evalkit.score import task_metrics
from evalkit.shard import shard_indices
from evalkit.tasks.build import Request, TaskPlan, build_task, number_requests
from evalkit.tasks.index import load_tasks


@dataclass
class RunPlan:
    model_path: str
    tasks: list[TaskPlan]
    requests: list[Request]


def quiet_libraries() -> None:
    """Library progress bars and warnings would repeat once per rank; evalkit reports progress itself."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def set_seeds(config: RunConfig) -> None:
    random.seed(config.seed.python)
    np.random.seed(config.seed.numpy)
    torch.manual_seed(config.seed.torch)


def prepare(config: RunConfig, topo: Topology) -> RunPlan:
    """Everything that can be checked before a model loads, identical on every rank."""
    model_path = check_model_source(config.model)
    if config.output.exists() and not config.output.is_dir():
        raise UsageError(f"--output {config.output} is a file; pass a folder")
    tasks = []
    for task in load_tasks(list(config.tasks), list(config.include_path)):
        plan = build_task(task, num_fewshot=config.num_fewshot, limit=config.limit, fewshot_seed=config.seed.fewshot)
        task_metrics(plan)
        FilterPipeline(task.filter_list)
        tasks.append(plan)
    requests = number_requests(tasks)
    check_run_layout(
        model_path,
        config.dtype,
        config.tp,
        topo.dims.world_size * config.gpus_per_rank,
        gpu_memory_gib(config, topo),
        max_len=_context_length(model_path),
        batch=config.batch_size,
    )
    return RunPlan(model_path=model_path, tasks=tasks, requests=requests)


def gpu_memory_gib(config: RunConfig, topo: Topology) -> float | None:
    """The per-GPU budget layouts are checked against: --gpu-mem, else the device's memory on CUDA."""
    if config.gpu_mem is not None:
        return config.gpu_mem
    if topo.device.type == "cuda":
        return torch.cuda.get_device_properties(topo.device).total_memory / GIB
    return None


def _context_length(model_path: str) -> int:
    return read_shape(model_path).max_positions


def load_backend(config: RunConfig, plan: RunPlan, topo: Topology) -> HFCausalLM:
    try:
        model = load_model(plan.model_path, config.dtype, topo, config.tp_backend, config.gpus_per_rank)
        return HFCausalLM(
            plan.model_path,
            model=model,
            device=input_device(model, topo),
            batch_size=config.batch_size,
            tp_group=topo.group("tp") if topo.dims.tp > 1 else None,
            num_parameters_local=local_parameter_count(model),
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model from {plan.model_path}: {' '.join(str(exc).split())[:300]}") from None


def run_requests(backend: HFCausalLM, requests: list[Request], progress: WorldProgress) -> list[tuple[int, Any]]:
    """This rank's requests, grouped by kind, each result paired with its global index."""
    out: list[tuple[int, Any]] = []
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        batch = [r for r in requests if r.kind == kind]
        if not batch:
            continue
        if kind == "loglikelihood":
            results = backend.loglikelihood([r.args for r in batch], progress.update)
        elif kind == "loglikelihood_rolling":
            results = backend.loglikelihood_rolling([r.args[0] for r in batch], progress.update)
        else:
            results = backend.generate_until([(r.args[0], r.args[1]) for r in batch], progress.update)
        out += [(r.index, result) for r, result in zip(batch, results, strict=True)]
    return out


def evaluate(config: RunConfig, topo: Topology) -> None:
    started = time.time()
    quiet_libraries()
    set_seeds(config)
    world = topo.dims.world_size
    plan = agreed(world, lambda: prepare(config, topo))
    backend = agreed(world, lambda: load_backend(config, plan, topo))
    mine = [plan.requests[i] for i in shard_indices([r.cost for r in plan.requests], topo.dp_rank, topo.dims.dp)]
    progress = WorldProgress(topo, total=len(plan.requests))
    t0 = time.time()
    results = run_requests(backend, mine, progress)
    rank_stats = {
        "rank": topo.rank,
        "dp_rank": topo.dp_rank,
        "tp_rank": topo.tp_rank,
        "requests": len(mine),
        "seconds": round(time.time() - t0, 3),
        "parameters": backend.num_parameters_local,
    }
    stats = all_gather(world, rank_stats)
    outputs = gather_results(topo, results, total=len(plan.requests))
    progress.close()
    if topo.is_main:
        write_outputs(config, topo, plan.tasks, outputs, backend.describe(), stats, wall=time.time() - started)


def run_guarded(config: RunConfig) -> int:
    """Run on this rank; turn bad input into exit 2 and any crash into a prompt exit 1."""
    rank = os.environ.get("RANK", "0")
    try:
        topo = init_topology(config.tp, config.device, config.timeout)
        evaluate(config, topo)
    except UsageError as exc:
        say(f"evalkit: error: {exc}")
        if isinstance(exc, AgreedError):
            settle_before_exit()
        shutdown()
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        say(f"evalkit: rank {rank} interrupted")
        os._exit(130)
    except BaseException as exc:  # noqa: BLE001 - a crash must end this rank now, never wait on peers
        traceback.print_exc()
        say(f"evalkit: rank {rank} failed: {type(exc).__name__}: {exc}")
        os._exit(1)
    shutdown()
    return 0
