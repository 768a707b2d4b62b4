"""The evaluation loop every rank runs.

check inputs (every rank) -> rank 0 builds every request with lm-eval (global order) and hands
each rank its share -> load model -> model calls in batches, results streamed to shards -> rank 0
merges the shards and scores with lm-eval. Bad input ends every rank with one line and
exit code 2; any other exception ends the failing rank at once with its message, which ends
the others (their collectives fail, and the launcher stops the group).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from evalkit.collectives import AgreedError, agreed, all_gather
from evalkit.config import RunConfig
from evalkit.errors import USAGE_EXIT_CODE, UsageError, one_line, say
from evalkit.execute import Executor, StopFlag, StopRequested
from evalkit.identity import model_fingerprint, request_key, served_fingerprint, task_config_hash
from evalkit.model_source import check_model_source
from evalkit.models import registry
from evalkit.models.packing import context_group
from evalkit.models.protocol import Backend
from evalkit.models.registry import BackendSpec
from evalkit.monitor import Monitor
from evalkit.outdir import check_folder, check_writable, write_manifest
from evalkit.parallel import Placement, Topology, init_topology, settle_before_exit, shutdown
from evalkit.planner import GIB, check_run_layout, read_image_tokens_per_image, read_shape
from evalkit.results import write_outputs
from evalkit.sharding import merge_shards, shard_indices
from evalkit.shards import SHARD_DIR, ShardWriter, read_all, read_records, shard_files
from evalkit.tasks.images import VisualSource
from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.requests import DEFAULT_MAX_GEN_TOKS, PromptOptions, Request, TaskPlan, build_plans, number_requests
from evalkit.tasks.scoring import RequestError
from evalkit.timings import Phases


@dataclass
class RunPlan:
    """Everything rank 0 knows about the run: lm-eval's tasks and groups, and every request."""

    model_path: str
    tasks: list[TaskPlan]
    groups: dict[str, Any]
    requests: list[Request]
    model: dict[str, Any]
    task_hashes: dict[str, str]
    done: set[int]

    @functools.cached_property
    def index_of(self) -> dict[str, int]:
        """Global index of each request, by its content key (how saved results are found)."""
        return {r.key: r.index for r in self.requests}


@dataclass(frozen=True)
class Work:
    """What one rank is handed: its share of the pending requests, and facts about the whole run."""

    requests: list[Request]
    pending: int
    launch: str
    kinds: frozenset[str]  # request kinds of the whole run (a backend checks at load that it can serve them)


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


def set_seeds(config: RunConfig) -> None:
    random.seed(config.seed.python)
    np.random.seed(config.seed.numpy)
    torch.manual_seed(config.seed.torch)


def prompt_options(config: RunConfig) -> PromptOptions:
    return PromptOptions(
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        fewshot_seed=config.seed.fewshot,
        gen_kwargs=config.gen_kwargs,
        apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.multiturn,
        system_instruction=config.system_instruction,
    )


def check_inputs(config: RunConfig, topo: Topology) -> tuple[str, BackendSpec]:
    """What every rank checks for itself: the model folder (or a served model's name), its backend
    and a writable output folder."""
    if registry.is_served(config.backend):
        model_path, spec = config.model, registry.BACKENDS[config.backend]
    else:
        model_path = check_model_source(config.model)
        spec = registry.select(config.backend, model_path)
    refusal = registry.layout_refusal(spec, topo.layout)
    if refusal:
        raise UsageError(refusal)
    if config.apply_chat_template and spec.accepts_images:
        raise UsageError(
            f"backend {spec.name} always renders prompts with the processor's chat template; drop --apply-chat-template"
        )
    check_writable(config.output, topo.rank)
    return model_path, spec


def check_backend_fits(spec: BackendSpec, requests: list[Request]) -> None:
    """Refuse, before loading, requests the backend cannot run (loglikelihood on hf-vlm, images on hf)."""
    kinds: dict[str, set[str]] = {}
    with_images: set[str] = set()
    scored_images: set[str] = set()
    for request in requests:
        kinds.setdefault(request.kind, set()).add(request.task)
        if request.visuals is not None or not isinstance(request.args[0], str):  # images or chat messages
            with_images.add(request.task)
            if request.kind != "generate_until":
                scored_images.add(request.task)
    tasks = sorted({t for kind, names in kinds.items() if kind not in spec.kinds for t in names} or with_images)
    problem = spec.refusal(set(kinds), bool(with_images), ", ".join(tasks[:5]) + (" ..." if len(tasks) > 5 else ""))
    if problem:
        raise UsageError(problem)
    if scored_images:
        raise UsageError(
            f"task(s) {', '.join(sorted(scored_images)[:5])} score answers to images by loglikelihood; "
            "evalkit gives images to generate_until tasks only"
        )


def chat_template(config: RunConfig, model_path: str) -> Callable[..., str] | None:
    """The tokenizer's chat template as lm-eval's HF model applies it, when asked for."""
    if not config.apply_chat_template:
        return None
    import transformers

    folder = config.tokenizer or model_path
    if not Path(folder).is_dir():
        raise UsageError(
            f"--apply-chat-template renders prompts with a local tokenizer; pass --tokenizer DIR for {folder}"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--apply-chat-template: the tokenizer in {folder} has no chat template")

    def apply(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(
            history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    return apply


def load_task_plans(config: RunConfig, model_path: str) -> tuple[list[TaskPlan], dict[str, Any]]:
    """lm-eval's tasks and groups for --tasks, with every prompt and request built (rank 0 only)."""
    from evalkit.compat import install_compat

    install_compat()
    library = TaskLibrary(config.include_path, metadata=config.task_metadata(model_path))
    loaded = library.load_checked(list(config.tasks))
    unsafe = [name for name, task in loaded["tasks"].items() if getattr(task, "UNSAFE_CODE", False)]
    if unsafe and not config.confirm_run_unsafe_code:
        raise UsageError(
            f"task(s) {', '.join(unsafe)} execute model-generated code; evalkit runs it only in a sandboxed "
            f"subprocess and only with --confirm-run-unsafe-code"
        )
    plans = build_plans(loaded["tasks"], prompt_options(config), chat_template(config, model_path))
    return plans, loaded.get("groups", {})


def prepare(config: RunConfig, topo: Topology, model_path: str, spec: BackendSpec) -> RunPlan:
    """Everything that can be checked before a model loads; rank 0 only."""
    tasks, groups = load_task_plans(config, model_path)
    requests = number_requests(tasks)
    check_backend_fits(spec, requests)
    layout = topo.layout
    # A split over own GPUs is checked by its device map instead, a served model by its server.
    if layout.placement is not Placement.SPLIT and not spec.served:
        context = config.max_length or read_shape(model_path).max_positions
        longest = longest_request_bound(requests, context, image_tokens(model_path, requests))
        check_run_layout(
            model_path,
            config.dtype,
            layout.tp,
            layout.world_size,
            gpu_memory_gib(config, topo),
            max_len=longest,
            batch=config.batch_limit().rows_at(longest),
        )
    if spec.served:
        model = served_fingerprint(model_path, spec.name, config.tokenizer)
    else:
        model = model_fingerprint(model_path, config.dtype, spec.name)
    settings = {
        "seed": config.seed.fewshot,
        "chat_template": config.apply_chat_template,
        "multiturn": config.multiturn,
        "system_instruction": config.system_instruction,
        "gen_kwargs": config.gen_kwargs,
        "backend": spec.name,
    }
    task_hashes = {p.name: task_config_hash(p, settings) for p in tasks}
    check_folder(config.output, resume=config.resume, model=model, tasks=task_hashes)
    requests = [replace(r, key=request_key(model["hash"], task_hashes[r.task], r)) for r in requests]
    plan = RunPlan(
        model_path=model_path,
        tasks=tasks,
        groups=groups,
        requests=requests,
        model=model,
        task_hashes=task_hashes,
        done=set(),
    )
    plan.done = finished_indices(config.output, plan.index_of)
    return plan


def deal(plan: RunPlan, dp: int) -> list[list[Request]]:
    """Each dp rank's share of the pending requests, balanced by cost. Loglikelihood requests with
    the same context (a doc's choices) go to one rank together, where they share a row."""
    pending = [r for r in plan.requests if r.index not in plan.done]
    units: dict[Any, list[Request]] = {}
    for request in pending:
        group = context_group(request.args[0]) if request.kind == "loglikelihood" else None
        units.setdefault(request.index if group is None else ("context", group), []).append(request)
    grouped = list(units.values())
    costs = [unit_cost(unit) for unit in grouped]
    shares = []
    for rank in range(dp):
        share = [r for i in shard_indices(costs, rank, dp) for r in grouped[i]]
        shares.append(sorted(share, key=lambda r: r.index))
    return shares


def unit_cost(requests: list[Request]) -> int:
    """A shared context is computed once: the longest request plus the others' continuations."""
    longest = max(r.cost for r in requests)
    return longest + sum(len(r.args[1]) for r in requests[1:])


def gpu_memory_gib(config: RunConfig, topo: Topology) -> float | None:
    """The per-GPU budget layouts are checked against: --gpu-mem, else the device's memory on CUDA."""
    if config.gpu_mem is not None:
        return config.gpu_mem
    if topo.device.type == "cuda":
        return torch.cuda.get_device_properties(topo.device).total_memory / GIB
    return None


def image_tokens(model_path: str, requests: list[Request]) -> int:
    """Tokens one image becomes in this model (an upper bound), when any request has images."""
    if not any(r.visuals for r in requests):
        return 0
    return read_image_tokens_per_image(model_path)


def longest_request_bound(requests: list[Request], context: int, tokens_per_image: int = 0) -> int:
    """Tokens of the longest request, bounded from above without a tokenizer.

    A token covers at least one UTF-8 byte (byte-level BPE, SentencePiece with byte fallback),
    so bytes plus a few special tokens bound it; each image adds the planner's bound of its tokens
    and generation adds its max_gen_toks. Never more than the model's context, since longer
    inputs are cut from the left.
    """
    longest = 0
    for request in requests:
        text = (a if isinstance(a, str) else json.dumps(a) for a in request.args if isinstance(a, (str, list)))
        size = sum(len(t.encode()) for t in text) + 2
        if request.visuals is not None:
            size += tokens_per_image * len(request.visuals.digests)
        if request.kind == "generate_until":
            size += int((request.args[1] or {}).get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        longest = max(longest, size)
    return min(longest, context)


def image_source(config: RunConfig, model_path: str, plan: RunPlan | None, share: list[Request]) -> VisualSource:
    """Where this rank finds its requests' images: rank 0 in the tasks it built, the other ranks in
    their own copy of the tasks, loaded here (before the model calls) when their share has images."""
    if plan is not None:
        tasks = {p.name: p.task for p in plan.tasks}
        return VisualSource(lambda: tasks)
    source = VisualSource(functools.partial(load_tasks_for_images, config, model_path))
    try:
        source.prepare({r.visuals.task for r in share if r.visuals is not None})
    except (KeyError, OSError, ValueError) as exc:
        raise UsageError(f"loading the image tasks on rank {os.environ.get('RANK', '0')}: {one_line(exc)}") from None
    return source


def load_tasks_for_images(config: RunConfig, model_path: str) -> dict[str, Any]:
    """The run's tasks on a rank other than 0, only to read images from their docs."""
    from evalkit.compat import install_compat

    install_compat()
    library = TaskLibrary(config.include_path, metadata=config.task_metadata(model_path))
    return library.load_checked(list(config.tasks))["tasks"]


def finished_indices(output: Path, index_of: dict[str, int]) -> set[int]:
    """Global indices of requests whose results earlier runs saved (read by rank 0 only)."""
    return {index_of[r["k"]] for r in read_all(output) if r.get("k") in index_of and "r" in r}


def hand_out(topo: Topology, make: Callable[[], list[Work]]) -> Work:
    """Rank 0 plans the run and hands every rank its work; bad input found there ends every rank.

    ``make`` returns one Work per dp rank; every rank of a TP group gets its group's share.
    """
    per_dp: list[Any] = []
    status: list[Any] = [None]
    if topo.is_main:
        try:
            per_dp = make()
        except UsageError as exc:
            status = [str(exc)]
    if not topo.distributed:
        if status[0] is not None:
            raise AgreedError(status[0])
        return per_dp[0]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise AgreedError(status[0])
    mine: list[Any] = [None]
    layout = topo.layout
    scattered = [per_dp[layout.dp_rank(rank)] for rank in range(layout.world_size)] if topo.is_main else None
    dist.scatter_object_list(mine, scattered, src=0)
    return mine[0]


def merge_results(output: Path, plan: RunPlan, launch: str, written: int) -> list[Any]:
    """Rank 0 streams every shard into outputs by global index; this launch's count must match."""
    index_of = plan.index_of
    counted = {"now": 0}

    def pairs() -> Iterator[tuple[int, Any]]:
        for path in shard_files(output):
            for record in read_records(path):
                counted["now"] += path.name.startswith(launch)
                index = index_of.get(record.get("k"))
                if index is not None:
                    yield index, record["r"] if "r" in record else RequestError(record["error"])

    outputs = merge_shards([pairs()], len(plan.requests), replaceable=lambda r: isinstance(r, RequestError))
    if counted["now"] != written:
        raise AssertionError(f"ranks reported {written} results this run but the shards hold {counted['now']}")
    return outputs


def evaluate(config: RunConfig, topo: Topology) -> None:
    started = time.time()
    phases = Phases()
    quiet_libraries()
    set_seeds(config)
    world = topo.layout.world_size
    model_path, spec = agreed(world, lambda: check_inputs(config, topo))
    box: dict[str, RunPlan] = {}

    def plan_and_deal() -> list[Work]:
        plan = box["plan"] = prepare(config, topo, model_path, spec)
        launch = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        pending = len(plan.requests) - len(plan.done)
        kinds = frozenset(r.kind for r in plan.requests if r.index not in plan.done)
        return [
            Work(requests=share, pending=pending, launch=launch, kinds=kinds) for share in deal(plan, topo.layout.dp)
        ]

    with phases.phase("plan"):
        work = hand_out(topo, plan_and_deal)
    with phases.phase("images"):
        images = agreed(world, lambda: image_source(config, model_path, box.get("plan"), work.requests))
    with phases.phase("model_load"):
        backend: Backend = agreed(world, lambda: spec.build(config, model_path, topo, work.kinds))
    if topo.is_main:
        write_manifest(config.output, model=box["plan"].model, tasks=box["plan"].task_hashes)
    shard = config.output / SHARD_DIR / f"{work.launch}-rank{topo.rank:05d}.jsonl"
    writer = ShardWriter(shard, interval=config.flush_interval) if topo.carries_results else None
    monitor = Monitor(
        topo,
        total=work.pending,
        stall_timeout=config.stall_timeout,
        before_exit=writer.sync if writer else lambda: None,
    )
    stop = StopFlag()
    stop.install()
    executor = Executor(topo, backend, writer, monitor, stop, config.on_error, images=images.images)
    t0 = time.time()
    try:
        with writer or contextlib.nullcontext(), phases.phase("model_calls"):
            executor.run(work.requests)
    except StopRequested:
        raise Stopped(stop.signal) from None
    finally:
        stop.restore()
    for name, seconds in backend.timings.items():
        phases.add(f"model_calls.{name}", seconds)
    monitor.idle()
    gathering = time.monotonic()
    stats = all_gather(
        world,
        {
            "rank": topo.rank,
            "dp_rank": topo.dp_rank,
            "tp_rank": topo.tp_rank,
            "requests": len(work.requests),
            "seconds": round(time.time() - t0, 3),
            "parameters": backend.num_parameters_local,
            "written": writer.written if writer else 0,
        },
    )
    monitor.close()
    phases.add("gather", time.monotonic() - gathering)
    if topo.is_main:
        plan = box["plan"]
        with phases.phase("merge"):
            outputs = merge_results(config.output, plan, work.launch, sum(s["written"] for s in stats))
        resume = {"reused": len(plan.done), "computed": work.pending}
        described = {"backend": backend.name, **backend.describe()}
        write_outputs(config, topo, plan, outputs, described, stats, started, resume, phases)


def run_guarded(config: RunConfig) -> int:
    """Run on this rank; turn bad input into exit 2 and any crash into a prompt exit 1."""
    rank = os.environ.get("RANK", "0")
    try:
        topo = init_topology(config.tp, config.device, config.timeout, config.gpus_per_rank, config.tp_placement)
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
        traceback.print_exc()
        say(f"evalkit: rank {rank} failed: {type(exc).__name__}: {exc}")
        os._exit(1)
    distributed = dist.is_initialized()
    shutdown()
    if distributed:
        # Everything is written and closed. Interpreter teardown after destroy_process_group can still
        # abort (SIGABRT, "terminate called without an active exception") when gloo's worker threads
        # release objects late, failing a finished run; so a distributed rank ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
