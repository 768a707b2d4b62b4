"""The model backends ``--backend`` selects from, by name, with "did you mean" for a typo.

``auto`` (the default) picks by the checkpoint: a config with a ``vision_config`` is a
vision-language model (``hf-vlm``), anything else a causal language model (``hf``). Each entry
says which request kinds it runs, whether it takes images (``vllm`` does for a vision-language
checkpoint) and whether the model is served elsewhere (``--model`` is then the name the server
knows), so a run a backend cannot serve is refused before any weights load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from evalkit.errors import UsageError, did_you_mean, one_line

if TYPE_CHECKING:
    from evalkit.config import RunConfig
    from evalkit.models.protocol import Backend
    from evalkit.parallel import Layout, Topology

AUTO = "auto"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kinds: tuple[str, ...]  # the request kinds it runs
    accepts_images: bool
    # (config, model path or served name, topology, the request kinds of the whole run)
    build: Callable[[RunConfig, str, Topology, frozenset[str]], Backend]
    served: bool = False  # the model runs behind --base-url, not in this process
    vision_checkpoints: bool = False  # takes images when the checkpoint is a vision-language model

    def refusal(self, kinds: set[str], images: bool, tasks: str) -> str | None:
        """Why this backend cannot run requests of ``kinds`` (with images or not), or None."""
        missing = sorted(kinds - set(self.kinds))
        if missing:
            return f"backend {self.name} runs {', '.join(self.kinds)} requests, not {', '.join(missing)} ({tasks})"
        if images and not self.accepts_images:
            return (
                f"task(s) {tasks} give the model images or chat messages, which backend {self.name} cannot take; "
                f"use a vision-language model (--backend hf-vlm, or vllm with a vision-language checkpoint)"
            )
        return None


def layout_refusal(spec: BackendSpec, layout: Layout) -> str | None:
    """Why this backend cannot run in this layout, or None."""
    from evalkit.parallel import Placement

    if spec.accepts_images and layout.placement is Placement.TRANSFORMERS_TP and layout.dp > 1:
        # transformers 5 meets DTensor and Tensor in the vision tower's convolution once there are
        # several TP meshes; DeepSpeed AutoTP runs the same layout correctly.
        return (
            f"--tp-backend transformers runs a vision-language model only as one replica (dp={layout.dp} here); "
            f"use --tp-backend deepspeed for tp x dp"
        )
    return None


def _load_hf(config: RunConfig, model_path: str, topo: Topology, kinds: frozenset[str]) -> Backend:
    from evalkit.models.hf import HFCausalLM

    return _build_transformers(config, model_path, topo, HFCausalLM, auto_class=None)


def _load_hf_vlm(config: RunConfig, model_path: str, topo: Topology, kinds: frozenset[str]) -> Backend:
    import transformers

    from evalkit.models.hf_vlm import HFVisionLM

    return _build_transformers(
        config, model_path, topo, HFVisionLM, auto_class=transformers.AutoModelForImageTextToText
    )


def _build_transformers(config: RunConfig, model_path: str, topo: Topology, cls: type, auto_class: type | None):
    from evalkit.models.placement import input_device, load_model, local_parameter_count

    try:
        model = load_model(
            model_path, config.dtype, topo, trust_remote_code=config.trust_remote_code, auto_class=auto_class
        )
        return cls(
            model_path,
            model=model,
            device=input_device(model, topo),
            batch=config.batch_limit(),
            shared_prefix=config.shared_prefix,
            tp_group=topo.tp_group,
            num_parameters_local=local_parameter_count(model),
            trust_remote_code=config.trust_remote_code,
            max_length=config.max_length,
        )
    except (OSError, ValueError) as exc:
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise UsageError(
                f"{model_path} needs its own Python code to load; evalkit runs it only with "
                f"--trust-remote-code (read that code first)"
            ) from None
        raise UsageError(
            f"cannot load model from {model_path} with backend {cls.name}: {one_line(exc)[:300]}"
        ) from None


def _load_vllm(config: RunConfig, model_path: str, topo: Topology, kinds: frozenset[str]) -> Backend:
    from evalkit.models.vllm_engine import VLLMBackend

    return VLLMBackend.load(config, model_path, topo)


def _load_openai_completions(config: RunConfig, model: str, topo: Topology, kinds: frozenset[str]) -> Backend:
    from evalkit.models.openai_api import OpenAICompletions

    return OpenAICompletions.load(config, model, kinds)


def _load_openai_chat(config: RunConfig, model: str, topo: Topology, kinds: frozenset[str]) -> Backend:
    from evalkit.models.openai_api import OpenAIChat

    return OpenAIChat.load(config, model, kinds)


ALL_KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")

BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(name="hf", kinds=ALL_KINDS, accepts_images=False, build=_load_hf),
        BackendSpec(
            name="hf-vlm",
            kinds=("generate_until",),
            accepts_images=True,
            build=_load_hf_vlm,
        ),
        BackendSpec(name="vllm", kinds=ALL_KINDS, accepts_images=False, build=_load_vllm, vision_checkpoints=True),
        BackendSpec(
            name="openai-completions",
            kinds=ALL_KINDS,
            accepts_images=False,
            build=_load_openai_completions,
            served=True,
        ),
        BackendSpec(
            name="openai-chat", kinds=("generate_until",), accepts_images=False, build=_load_openai_chat, served=True
        ),
    )
}
NAMES = (AUTO, *BACKENDS)


def check_name(name: str) -> str | None:
    """A one-line problem with a ``--backend`` value, or None."""
    if name in NAMES:
        return None
    return f"--backend {name!r} is not one of {', '.join(NAMES)}{did_you_mean(name, NAMES)}"


def is_served(name: str) -> bool:
    """Whether ``--backend name`` talks to a server (so ``--model`` need not be a local folder)."""
    spec = BACKENDS.get(name)
    return spec is not None and spec.served


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
    return replace(BACKENDS[name], accepts_images=True) if vision else BACKENDS[name]
