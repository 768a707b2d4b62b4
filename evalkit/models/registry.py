"""The model backends ``--backend`` selects from: one BackendSpec per backend, and the only place
that decides what a backend can run.

A spec says which request kinds the backend runs, whether it takes images and chat messages (no
backend takes video yet: video tasks are refused where tasks load), the layouts it runs in and the
flags it honours. ``problems(config, layout, kinds)`` returns every
refusal, one line each, and is asked before any weights load: when the flags are parsed, once the
layout stands, and once rank 0 has built the run's requests. A flag a backend does not honour is
refused, never ignored. Each backend is built from its own typed options, picked out of the
RunConfig here; no backend sees the whole config.

``auto`` (the default) picks by the checkpoint: a config with a ``vision_config`` is a
vision-language model (``hf-vlm``), anything else a causal language model (``hf``). ``vllm``
takes images when the checkpoint is a vision-language model. A served backend's ``--model`` is
the name the server knows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evalkit.config import RunConfig
from evalkit.errors import UsageError, did_you_mean
from evalkit.models.protocol import KINDS, Backend, Kind
from evalkit.parallel import Layout, Placement, Topology

AUTO = "auto"

# Options only some backends honour: the RunConfig field, and the flag a user sets it with.
# ``batch_size=auto`` is told apart from a number of requests.
FLAGS: dict[str, str] = {
    "batch_size": "--batch-size N",
    "batch_size=auto": "--batch-size auto",
    "max_batch_tokens": "--max-batch-tokens",
    "shared_prefix": "--no-shared-prefix",
    "vllm_prefix_cache": "--vllm-prefix-cache",
    "dtype": "--dtype",
    "tp_backend": "--tp-backend",
    "deepspeed": "--deepspeed",
    "gpu_mem": "--gpu-mem",
    "apply_chat_template": "--apply-chat-template",
    "tokenizer": "--tokenizer",
    "base_url": "--base-url",
    "api_key_env": "--api-key-env",
    "concurrency": "--concurrency",
    "max_retries": "--max-retries",
    "request_timeout": "--request-timeout",
}
VLLM_FLAGS = frozenset({"vllm_prefix_cache"})
SERVER_FLAGS = frozenset({"tokenizer", "base_url", "api_key_env", "concurrency", "max_retries", "request_timeout"})
# Server flags that also set the LLM judge's calls (--judge-base-url), so every backend takes them then.
JUDGE_FLAGS = frozenset({"concurrency", "max_retries", "request_timeout"})
IN_PROCESS = frozenset({Placement.REPLICA, Placement.DEEPSPEED_TP, Placement.TRANSFORMERS_TP, Placement.SPLIT})


def given_flags(config: RunConfig) -> list[str]:
    """The backend-specific options this config sets (in FLAGS order)."""
    given = []
    for name in FLAGS:
        if name == "batch_size":
            on = isinstance(config.batch_size, int)
        elif name == "batch_size=auto":
            on = config.batch_size == "auto"
        else:
            on = config.given(name)
        if on:
            given.append(name)
    return given


@dataclass(frozen=True)
class RunKinds:
    """What a run's requests ask of a backend: the tasks per request kind, the tasks whose prompts
    carry images or chat messages, and those among them scored by loglikelihood."""

    tasks: Mapping[str, frozenset[str]]
    multimodal: frozenset[str] = frozenset()
    scored_multimodal: frozenset[str] = frozenset()

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.tasks)


@dataclass(frozen=True)
class BuildContext:
    """What the run knows when a backend is built: the model folder (or served name), this rank's
    place in the layout, and the request kinds of the whole run."""

    model: str
    topo: Topology
    kinds: frozenset[str]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kinds: tuple[Kind, ...]  # the request kinds it runs
    images: bool  # takes images (and lmms-eval's chat messages) in generation prompts
    honours: frozenset[str]  # the FLAGS it honours; any other one set is refused
    placements: frozenset[Placement]  # the layouts it runs in
    options: Callable[[RunConfig, BuildContext], Any]  # its own options, picked out of the config
    load: Callable[[Any], Backend]  # the backend, from those options alone
    served: bool = False  # the model runs behind --base-url, not in this process
    vision_checkpoints: bool = False  # takes images when the checkpoint is a vision-language model
    tp_placement: Placement | None = None  # splits a TP group itself (else --tp-backend does)
    single_replica: frozenset[Placement] = frozenset()  # placements it runs only at dp=1
    # Its results name it in the model's identity, so a run resumed by another engine (whose scores
    # differ in their last digits) recomputes them; the transformers backends score alike.
    keyed_by_backend: bool = True
    packs_rows: bool = False  # scores a sharing unit's requests in shared rows (--no-shared-prefix: not)
    needs: tuple[str, ...] = ()  # options it cannot run without
    hints: Mapping[str, str] = field(default_factory=dict)  # how to fix a refused flag or layout

    def problems(self, config: RunConfig, layout: Layout | None = None, kinds: RunKinds | None = None) -> list[str]:
        """Every reason this backend cannot run ``config`` (in ``layout``, on requests of ``kinds``)."""
        judged = JUDGE_FLAGS if config.judge_base_url else frozenset()
        problems = [self._flag_problem(name) for name in given_flags(config) if name not in self.honours | judged]
        problems += [
            f"--backend {self.name} needs {FLAGS[name]}{self.hints.get(name, '')}"
            for name in self.needs
            if not config.given(name)
        ]
        if layout is not None:
            problems += self._layout_problems(layout)
        if kinds is not None:
            problems += self._kind_problems(kinds)
        return problems

    def build(self, config: RunConfig, context: BuildContext) -> Backend:
        return self.load(self.options(config, context))

    def packs_contexts(self, config: RunConfig) -> bool:
        """Whether it scores a doc's choices in one packed row (so a resume computes them together)."""
        return self.packs_rows and config.shared_prefix

    def placement_for_tp(self, tp_backend: str) -> str:
        """The placement a TP group of this backend takes (--tp-backend unless it splits models itself)."""
        return (self.tp_placement or Placement(tp_backend)).value

    def _flag_problem(self, name: str) -> str:
        if name in SERVER_FLAGS and not self.served:
            judge = " or a judge (--judge-base-url)" if name in JUDGE_FLAGS else ""
            return f"{FLAGS[name]} is for --backend {' or '.join(SERVED)}{judge}, not {self.name}"
        if name in VLLM_FLAGS:
            return f"{FLAGS[name]} is for --backend vllm, not {self.name}"
        return f"--backend {self.name} does not take {FLAGS[name]}{self.hints.get(name, '; drop it')}"

    def _layout_problems(self, layout: Layout) -> list[str]:
        if layout.placement not in self.placements:
            hint = self.hints.get(f"layout:{layout.placement.value}", "")
            return [f"--backend {self.name} does not run the {layout.placement.value} layout{hint}"]
        if layout.placement in self.single_replica and layout.dp > 1:
            return [
                f"--backend {self.name} runs the {layout.placement.value} layout only as one replica "
                f"(dp={layout.dp} here){self.hints.get('layout:single_replica', '')}"
            ]
        return []

    def _kind_problems(self, kinds: RunKinds) -> list[str]:
        problems = []
        missing = sorted(kinds.kinds - set(self.kinds))
        if missing:
            tasks = _names(t for kind in missing for t in kinds.tasks[kind])
            problems.append(
                f"backend {self.name} runs {', '.join(self.kinds)} requests, not {', '.join(missing)} "
                f"({tasks}){self.hints.get('kinds', '')}"
            )
        elif kinds.multimodal and not self.images:
            problems.append(
                f"task(s) {_names(kinds.multimodal)} give the model images or chat messages, which backend "
                f"{self.name} cannot take; use a vision-language model (--backend hf-vlm, or vllm with a "
                f"vision-language checkpoint)"
            )
        if kinds.scored_multimodal:
            problems.append(
                f"task(s) {_names(kinds.scored_multimodal, 5)} score answers to images by loglikelihood; "
                "evalkit gives images to generate_until tasks only"
            )
        return problems


def _names(tasks: Any, most: int = 5) -> str:
    names = sorted(set(tasks))
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


# -- options and loaders, one pair per backend family -------------------------------------------


def _transformers_options(config: RunConfig, context: BuildContext) -> Any:
    from evalkit.models.hf import TransformersOptions

    return TransformersOptions(
        path=context.model,
        topo=context.topo,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        batch=config.batch_limit(),
        shared_prefix=config.shared_prefix,
        max_length=config.max_length,
    )


def _load_hf(options: Any) -> Backend:
    from evalkit.models.hf import HFCausalLM

    return HFCausalLM.load(options)


def _load_hf_vlm(options: Any) -> Backend:
    from evalkit.models.hf_vlm import HFVisionLM

    return HFVisionLM.load(options)


def _vllm_options(config: RunConfig, context: BuildContext) -> Any:
    from evalkit.models.vllm_engine import VLLMOptions

    return VLLMOptions(
        path=context.model,
        topo=context.topo,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        max_length=config.max_length,
        seed=config.seed.torch,
        requests_per_call=config.batch_size if isinstance(config.batch_size, int) else None,
        prefix_cache=config.shared_prefix,
        prefix_cache_scoring=config.vllm_prefix_cache,
    )


def _load_vllm(options: Any) -> Backend:
    from evalkit.models.vllm_engine import VLLMBackend

    return VLLMBackend.load(options)


def _server_options(config: RunConfig, context: BuildContext) -> Any:
    from evalkit.models.openai_api import ServerOptions

    return ServerOptions(
        model=context.model,
        base_url=config.base_url or "",
        api_key_env=config.api_key_env,
        request_timeout=config.request_timeout,
        max_retries=config.max_retries,
        concurrency=config.concurrency,
        tokenizer=config.tokenizer,
        trust_remote_code=config.trust_remote_code,
        max_length=config.max_length,
        seed=config.seed.torch,
        scores=bool(context.kinds & {"loglikelihood", "loglikelihood_rolling"}),
    )


def _load_openai_completions(options: Any) -> Backend:
    from evalkit.models.openai_api import OpenAICompletions

    return OpenAICompletions.load(options)


def _load_openai_chat(options: Any) -> Backend:
    from evalkit.models.openai_api import OpenAIChat

    return OpenAIChat.load(options)


TRANSFORMERS_FLAGS = frozenset(
    {"batch_size", "batch_size=auto", "max_batch_tokens", "dtype", "tp_backend", "deepspeed", "gpu_mem"}
)
SERVED_HONOURS = frozenset({"apply_chat_template", *SERVER_FLAGS})
SERVED_HINTS = {
    "batch_size": "; the server batches requests itself: use --concurrency (requests in flight per process)",
    "batch_size=auto": "; the server batches requests itself: use --concurrency (requests in flight per process)",
    "max_batch_tokens": "; the server batches requests itself",
    "shared_prefix": "; the server decides how prompts are computed",
    "dtype": "; the server chose the model's dtype",
    "tp_backend": "; the server splits its model",
    "deepspeed": "; the server splits its model",
    "gpu_mem": "; the server holds the model",
    "base_url": ", the server's API root (e.g. http://localhost:8000/v1)",
    "layout:deepspeed": "; the server splits its model: drop --tp and --gpus-per-rank",
    "layout:transformers": "; the server splits its model: drop --tp and --gpus-per-rank",
    "layout:split": "; the server splits its model: drop --tp and --gpus-per-rank",
}

BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="hf",
            kinds=KINDS,
            images=False,
            honours=TRANSFORMERS_FLAGS | {"shared_prefix", "apply_chat_template"},
            placements=IN_PROCESS,
            options=_transformers_options,
            load=_load_hf,
            keyed_by_backend=False,
            packs_rows=True,
            hints={"tokenizer": "; it reads the tokenizer from --model"},
        ),
        BackendSpec(
            name="hf-vlm",
            kinds=("generate_until",),
            images=True,
            honours=TRANSFORMERS_FLAGS,
            placements=IN_PROCESS,
            options=_transformers_options,
            load=_load_hf_vlm,
            keyed_by_backend=False,
            # transformers 5 meets DTensor and Tensor in the vision tower's convolution once there are
            # several TP meshes; DeepSpeed AutoTP runs the same layout correctly.
            single_replica=frozenset({Placement.TRANSFORMERS_TP}),
            hints={
                "layout:single_replica": "; use --tp-backend deepspeed for tp x dp",
                "apply_chat_template": "; it always renders prompts with the processor's chat template",
                "shared_prefix": "; it runs generation only, where no prefix is shared",
                "tokenizer": "; it reads the processor from --model",
                "kinds": "; use the hf backend for loglikelihood tasks",
            },
        ),
        BackendSpec(
            name="vllm",
            kinds=KINDS,
            images=False,
            honours=frozenset(
                {"batch_size", "dtype", "gpu_mem", "apply_chat_template", "shared_prefix", "vllm_prefix_cache"}
            ),
            placements=frozenset({Placement.REPLICA, Placement.VLLM_TP}),
            options=_vllm_options,
            load=_load_vllm,
            vision_checkpoints=True,
            tp_placement=Placement.VLLM_TP,
            hints={
                "batch_size=auto": "; vLLM schedules its own batches: give --batch-size N (requests per engine "
                "call) or leave it out",
                "max_batch_tokens": "; vLLM schedules the tokens of its batches itself",
                "tp_backend": "; vLLM splits the model over the --tp ranks itself",
                "deepspeed": "; vLLM splits the model over the --tp ranks itself (give --tp)",
                "layout:split": "; vLLM splits a model over GPUs with --tp, not --gpus-per-rank",
                "tokenizer": "; it reads the tokenizer from --model",
            },
        ),
        BackendSpec(
            name="openai-completions",
            kinds=KINDS,
            images=False,
            honours=SERVED_HONOURS,
            placements=frozenset({Placement.REPLICA}),
            options=_server_options,
            load=_load_openai_completions,
            served=True,
            needs=("base_url",),
            hints=SERVED_HINTS,
        ),
        BackendSpec(
            name="openai-chat",
            kinds=("generate_until",),
            images=False,
            honours=SERVED_HONOURS - {"apply_chat_template"},
            placements=frozenset({Placement.REPLICA}),
            options=_server_options,
            load=_load_openai_chat,
            served=True,
            needs=("base_url",),
            hints={
                **SERVED_HINTS,
                "apply_chat_template": "; the server applies the model's chat template",
                "kinds": "; it returns no prompt logprobs: run loglikelihood tasks with openai-completions",
            },
        ),
    )
}
NAMES = (AUTO, *BACKENDS)
SERVED = tuple(name for name, spec in BACKENDS.items() if spec.served)


def check_name(name: str) -> str | None:
    """A one-line problem with a ``--backend`` value, or None."""
    if name in NAMES:
        return None
    return f"--backend {name!r} is not one of {', '.join(NAMES)}{did_you_mean(name, NAMES)}"


def tp_placement(config: RunConfig) -> str:
    """What splits a model over a TP group: the backend itself (vllm), else --tp-backend."""
    spec = BACKENDS.get(config.backend)
    return spec.placement_for_tp(config.tp_backend) if spec else config.tp_backend


def select(name: str, model_path: str) -> BackendSpec:
    """The backend to run ``model_path`` with: by name, or by its config for ``auto``."""
    problem = check_name(name)
    if problem:
        raise UsageError(problem)
    if name != AUTO and not BACKENDS[name].vision_checkpoints:
        return BACKENDS[name]
    vision = "vision_config" in json.loads((Path(model_path) / "config.json").read_text())
    if name == AUTO:
        return BACKENDS["hf-vlm" if vision else "hf"]
    return replace(BACKENDS[name], images=True) if vision else BACKENDS[name]


def config_problems(config: RunConfig) -> list[str]:
    """What can be refused from the flags alone: the backend's name, and the flags it does not take
    (for ``auto`` and ``vllm`` once the checkpoint says which model it is)."""
    problem = check_name(config.backend)
    if problem:
        return [problem]
    spec = BACKENDS.get(config.backend)
    if spec is None or spec.vision_checkpoints:
        folder = Path(config.model)
        if not (folder / "config.json").is_file():
            return []  # the model source is checked (and refused) before the run starts
        try:
            spec = select(config.backend, config.model)
        except ValueError:  # an unreadable config.json: refused by the same check
            return []
    return spec.problems(config)
