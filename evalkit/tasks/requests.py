"""From lm-eval task objects to evalkit's numbered model requests, in global doc order.

Every task builds its requests with lm-eval's own code (``Task.build_all_requests``) as at world
size 1: one few-shot RNG per task advanced doc after doc, so a doc's prompt never depends on the
number of ranks and equals the prompt lm-eval builds on one process. This happens once, on rank
0; the other ranks receive only their share of the requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lm_eval.evaluator_utils import get_sample_size

from evalkit.errors import UsageError
from evalkit.tasks.problems import TaskLoadError, explain

Kind = Literal["loglikelihood", "loglikelihood_rolling", "generate_until"]
KINDS: tuple[Kind, ...] = ("loglikelihood", "loglikelihood_rolling", "generate_until")
# lm-eval's default for a generate_until task that does not say how many tokens to generate.
DEFAULT_MAX_GEN_TOKS = 256


@dataclass(frozen=True)
class Request:
    """One model call. ``index`` is its position in the whole run; ``key`` names its content."""

    index: int
    task: str
    doc_id: int
    instance: int
    repeat: int
    kind: Kind
    args: tuple
    key: str = ""

    @property
    def cost(self) -> int:
        return sum(len(a) for a in self.args if isinstance(a, str))


@dataclass(frozen=True, kw_only=True)
class PromptOptions:
    """How prompts are built, with lm-eval's meaning for each option."""

    num_fewshot: int | None = None
    limit: float | None = None
    fewshot_seed: int = 1234
    gen_kwargs: dict[str, Any] | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None


@dataclass
class TaskPlan:
    """One lm-eval task with its instances and, per instance, the global indices of its requests."""

    name: str
    task: Any
    limit: int | None
    instance_requests: list[list[int]] = field(default_factory=list)

    @property
    def num_fewshot(self) -> int:
        return self.task.get_config("num_fewshot") or 0

    @property
    def unsafe(self) -> bool:
        return bool(getattr(self.task, "UNSAFE_CODE", False))


def configure(task: Any, options: PromptOptions) -> None:
    """The run's overrides, applied as ``lm_eval`` applies them (a YAML num_fewshot of 0 stays 0)."""
    if task.get_config("output_type") == "generate_until" and options.gen_kwargs:
        task.set_config(key="generation_kwargs", value=dict(options.gen_kwargs), update=True)
    if options.num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=options.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=options.fewshot_seed)


def build_plans(
    tasks: dict[str, Any], options: PromptOptions, chat_template: Callable[..., str] | None = None
) -> list[TaskPlan]:
    plans = []
    for name, task in tasks.items():
        if getattr(task, "MULTIMODAL", False):
            raise UsageError(f"task '{name}' needs images or audio, which the text backend cannot take")
        configure(task, options)
        limit = get_sample_size(task, options.limit)
        try:
            task.build_all_requests(
                limit=limit,
                rank=0,
                world_size=1,
                system_instruction=options.system_instruction,
                apply_chat_template=options.apply_chat_template,
                fewshot_as_multiturn=options.fewshot_as_multiturn,
                chat_template=chat_template if options.apply_chat_template else None,
                tokenizer_name="",
            )
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - task code failing on its data is bad input, with its name
            raise UsageError(f"building prompts: {explain(TaskLoadError(name, exc))}") from None
        plans.append(TaskPlan(name=name, task=task, limit=limit))
    return plans


def number_requests(plans: list[TaskPlan]) -> list[Request]:
    """Every instance's requests (one per repeat), numbered in global order."""
    everything: list[Request] = []
    for plan in plans:
        plan.instance_requests = []
        for instance in plan.task.instances:
            if instance.request_type not in KINDS:
                raise UsageError(f"task '{plan.name}': request type {instance.request_type!r} is not supported")
            indices = []
            for repeat in range(instance.repeats):
                indices.append(len(everything))
                everything.append(
                    Request(
                        index=len(everything),
                        task=plan.name,
                        doc_id=instance.doc_id,
                        instance=instance.idx,
                        repeat=repeat,
                        kind=instance.request_type,
                        args=tuple(instance.args),
                    )
                )
            plan.instance_requests.append(indices)
    return everything
