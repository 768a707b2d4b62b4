"""Preflight: everything refused before a model loads.

Every rank checks its inputs for itself (the model folder or a served model's name, the backend
and the layout, a writable output folder). Once rank 0 has built the run's requests, they are
checked against the backend (request kinds, images) and the layout against the memory the longest
request needs. Every refusal is one line; the backend's own come from its BackendSpec.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evalkit.config import RunConfig
from evalkit.errors import UsageError, raise_all
from evalkit.judge import check_judge
from evalkit.model_source import check_model_source
from evalkit.models import registry
from evalkit.models.lm_rules import normalize_generation_kwargs
from evalkit.models.protocol import DEFAULT_MAX_GEN_TOKS, is_video_digest
from evalkit.models.registry import BackendSpec, RunKinds
from evalkit.outdir import check_writable
from evalkit.parallel import Placement, Topology
from evalkit.planner import (
    GIB,
    check_run_layout,
    read_config,
    read_image_tokens_per_image,
    read_shape,
    read_video_tokens_per_clip,
)
from evalkit.tasks.judged import judge_tasks
from evalkit.tasks.requests import Request
from evalkit.tasks.video import rule_for


@dataclass(frozen=True)
class Inputs:
    """What every rank found: the model folder (or the served model's name) and its backend."""

    model: str
    spec: BackendSpec


def check_inputs(config: RunConfig, topo: Topology) -> Inputs:
    """What every rank checks for itself before anything is planned."""
    if config.backend in registry.SERVED:
        model, spec = config.model, registry.BACKENDS[config.backend]
    else:
        model = check_model_source(config.model)
        spec = registry.select(config.backend, model)
    raise_all(spec.problems(config, topo.layout))
    check_writable(config.output, topo.rank)
    judge = config.judge_options()
    if judge is not None and topo.rank == 0:  # only global rank 0 scores, so only it calls the judge
        check_judge(judge)
    return Inputs(model=model, spec=spec)


def run_kinds(requests: list[Request]) -> RunKinds:
    """The tasks per request kind, and those whose prompts carry images or chat messages."""
    tasks: dict[str, set[str]] = {}
    multimodal: set[str] = set()
    scored: set[str] = set()
    for request in requests:
        tasks.setdefault(request.kind, set()).add(request.task)
        if request.visuals is not None or not isinstance(request.args[0], str):
            multimodal.add(request.task)
            if request.kind != "generate_until":
                scored.add(request.task)
    return RunKinds(
        tasks={kind: frozenset(names) for kind, names in tasks.items()},
        multimodal=frozenset(multimodal),
        scored_multimodal=frozenset(scored),
    )


def check_tasks(config: RunConfig, tasks: Mapping[str, Any]) -> None:
    """Tasks that execute model-generated code run only when the user says so, and tasks scored by an
    LLM judge only with a judge (lm-eval task objects)."""
    unsafe = [name for name, task in tasks.items() if getattr(task, "UNSAFE_CODE", False)]
    if unsafe and not config.confirm_run_unsafe_code:
        raise UsageError(
            f"task(s) {', '.join(unsafe)} execute model-generated code; evalkit runs it only in a sandboxed "
            f"subprocess and only with --confirm-run-unsafe-code"
        )
    judged = judge_tasks(tasks)
    if judged and config.judge_options() is None:
        raise UsageError(
            f"task(s) {', '.join(judged)} score answers with an LLM judge; pass --judge-base-url URL (its "
            f"OpenAI-compatible API) and --judge-model NAME (key from ${config.judge_api_key_env}, or name "
            f"another variable with --judge-api-key-env)"
        )


def check_requests(config: RunConfig, topo: Topology, inputs: Inputs, requests: list[Request]) -> None:
    """The backend can run these requests, and the layout holds the longest of them (rank 0)."""
    spec = inputs.spec
    raise_all(spec.problems(config, topo.layout, run_kinds(requests)))
    known = config.max_length or (None if spec.served else read_shape(inputs.model).max_positions)
    if known is not None:
        raise_all(generation_room_problems(requests, known))
    # A split over own GPUs is checked by its device map instead, a served model by its server.
    if topo.layout.placement is Placement.SPLIT or spec.served:
        return
    context = config.max_length or read_shape(inputs.model).max_positions
    longest = longest_request_bound(requests, context, *visual_tokens(inputs.model, requests))
    check_run_layout(
        inputs.model,
        config.dtype,
        topo.layout.tp,
        topo.layout.world_size,
        gpu_memory_gib(config, topo),
        max_len=longest,
        batch=config.batch_limit().rows_at(longest),
    )


def generation_room_problems(requests: list[Request], context: int) -> list[str]:
    """Tasks whose max_gen_toks leaves no room for a prompt in the model's context (one per task)."""
    problems: dict[str, str] = {}
    for request in requests:
        if request.kind == "generate_until" and request.task not in problems:
            kwargs = normalize_generation_kwargs(request.args[1] or {})
            if kwargs["max_gen_toks"] >= context:
                problems[request.task] = (
                    f"task {request.task}: max_gen_toks {kwargs['max_gen_toks']} leaves no room for a prompt in "
                    f"the model's {context} positions; pass --max-length above it, or a smaller max_gen_toks "
                    f"with --gen-kwargs"
                )
    return list(problems.values())


def gpu_memory_gib(config: RunConfig, topo: Topology) -> float | None:
    """The per-GPU budget layouts are checked against: --gpu-mem, else the device's memory on CUDA."""
    if config.gpu_mem is not None:
        return config.gpu_mem
    if topo.device.type == "cuda":
        return torch.cuda.get_device_properties(topo.device).total_memory / GIB
    return None


def visual_tokens(model_path: str, requests: list[Request]) -> tuple[int, int]:
    """Tokens one image and one video clip become in this model (upper bounds; 0 for a kind no
    request has). Clips are bounded by the frame rule of the model's family (tasks/video.py)."""
    found = [d for r in requests if r.visuals is not None for d in r.visuals.digests]
    per_image = read_image_tokens_per_image(model_path) if not all(map(is_video_digest, found)) else 0
    per_clip = 0
    if any(map(is_video_digest, found)):
        rule = rule_for(read_config(model_path).get("model_type"))
        per_clip = read_video_tokens_per_clip(model_path, rule.max_frames, rule.max_pixels)
    return per_image, per_clip


def longest_request_bound(
    requests: list[Request], context: int, tokens_per_image: int = 0, tokens_per_clip: int = 0
) -> int:
    """Tokens of the longest request, bounded from above without a tokenizer.

    A token covers at least one UTF-8 byte (byte-level BPE, SentencePiece with byte fallback),
    so bytes plus a few special tokens bound it; each image and each video clip adds the planner's
    bound of its tokens and generation adds its max_gen_toks. Never more than the model's context,
    since longer inputs are cut from the left.
    """
    longest = 0
    for request in requests:
        text = (a if isinstance(a, str) else json.dumps(a) for a in request.args if isinstance(a, (str, list)))
        size = sum(len(t.encode()) for t in text) + 2
        if request.visuals is not None:
            clips = sum(map(is_video_digest, request.visuals.digests))
            size += tokens_per_image * (len(request.visuals.digests) - clips) + tokens_per_clip * clips
        if request.kind == "generate_until":
            size += int((request.args[1] or {}).get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        longest = max(longest, size)
    return min(longest, context)
