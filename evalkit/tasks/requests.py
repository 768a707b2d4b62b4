"""From lm-eval task objects to evalkit's numbered model requests, in global doc order.

Every task builds its requests with lm-eval's own code (``Task.build_all_requests``) as at world
size 1: one few-shot RNG per task advanced doc after doc, so a doc's prompt never depends on the
number of ranks and equals the prompt lm-eval builds on one process. This happens once, on rank
0; the other ranks receive only their share of the requests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lm_eval.evaluator_utils import get_sample_size

from evalkit.errors import UsageError
from evalkit.models.protocol import KINDS, Kind, is_video_digest
from evalkit.tasks.images import DIGEST_PREFIX, Visuals, as_visuals, digests, image_label, is_image
from evalkit.tasks.judged import needs_judge
from evalkit.tasks.problems import TaskLoadError, explain
from evalkit.tasks.video import VIDEO_PREFIX

# What one image and one video clip (up to 32 frames, two per temporal patch) weigh when requests
# are balanced across ranks, in characters of prompt text.
IMAGE_COST = 2048
VIDEO_COST = 16 * IMAGE_COST


@dataclass(frozen=True)
class Request:
    """One model call. ``index`` is its position in the whole run; ``key`` names its content.

    ``args`` are lm-eval's arguments without images: (context, continuation), (text,) or
    (context, gen_kwargs), where a context may be chat messages (lmms-eval's doc_to_messages).
    """

    index: int
    task: str
    doc_id: int
    instance: int
    repeat: int
    kind: Kind
    args: tuple
    key: str = ""
    visuals: Visuals | None = None
    round: int = 0  # a multi-round doc's later rounds count from 1 (``evalkit.rounds``)

    @property
    def cost(self) -> int:
        text = sum(len(a) if isinstance(a, str) else len(str(a)) for a in self.args if isinstance(a, (str, list)))
        visuals = self.visuals.digests if self.visuals else ()
        return text + sum(VIDEO_COST if is_video_digest(d) else IMAGE_COST for d in visuals)


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

    @functools.cached_property
    def judged(self) -> bool:
        """Its scoring calls an LLM judge (``tasks/judged.py``)."""
        return needs_judge(self.task)


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
        except SystemExit as exc:  # lmms-eval's video tasks call sys.exit() for a missing clip
            raise UsageError(f"building prompts: task '{name}': its code exited: {exc.code}") from None
        except Exception as exc:  # noqa: BLE001 - task code failing on its data is bad input, with its name
            raise UsageError(f"building prompts: {explain(TaskLoadError(name, exc))}") from None
        plans.append(TaskPlan(name=name, task=task, limit=limit))
    return plans


def number_requests(plans: list[TaskPlan]) -> list[Request]:
    """Every instance's requests (one per repeat), numbered in global order.

    An image task's images stay out of the requests: each keeps their digests (``Visuals``), and in
    the lm-eval instance the images are replaced by the same digests, so rank 0 holds no decoded
    images for the run and sample rows stay plain JSON.
    """
    everything: list[Request] = []
    for plan in plans:
        plan.instance_requests = []
        seen: dict[int, tuple[Any, tuple[str, ...]]] = {}  # lm-eval shares one visual dict among a doc's choices
        for instance in plan.task.instances:
            if instance.request_type not in KINDS:
                raise UsageError(f"task '{plan.name}': request type {instance.request_type!r} is not supported")
            args, visuals = _split_visuals(plan.name, instance, seen)
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
                        args=args,
                        visuals=visuals,
                    )
                )
            plan.instance_requests.append(indices)
    return everything


def _split_visuals(
    task: str, instance: Any, seen: dict[int, tuple[Any, tuple[str, ...]]]
) -> tuple[tuple, Visuals | None]:
    """lm-eval's arguments without its trailing multimodal dict, and that dict's images as digests."""
    args = tuple(instance.args)
    extra = args[-1] if args and isinstance(args[-1], dict) and ("visual" in args[-1] or "audio" in args[-1]) else None
    if extra is None:
        return args, None
    if "audio" in extra:
        raise UsageError(f"task '{task}' gives audio, which evalkit cannot pass to a model")
    if id(extra) not in seen:  # the dict is kept in ``seen`` so that its id is not reused meanwhile
        try:
            seen[id(extra)] = (extra, _digests_of(extra["visual"]))
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"task '{task}' doc {instance.doc_id}: {exc}") from None
    found = seen[id(extra)][1]
    instance.arguments = (*args[:-1], {**extra, "visual": list(found)})
    _drop_pixels(instance.doc)
    visuals = Visuals(task=task, doc_id=instance.doc_id, digests=found) if found else None
    return args[:-1], visuals


def _drop_pixels(doc: Any) -> None:
    """Replace decoded images in a doc with their digest strings, so rank 0 never holds every image
    of the run (scoring reads answers, not pixels; the evaluating rank reads its images afresh)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if is_image(value):
                doc[key] = image_label(value)
            elif isinstance(value, list) and value and all(is_image(v) for v in value):
                doc[key] = [image_label(v) for v in value]


def _digests_of(value: Any) -> tuple[str, ...]:
    """Digests of what a task gave as images; a list of digests is what an earlier numbering left."""
    named = (DIGEST_PREFIX, VIDEO_PREFIX)
    if isinstance(value, list) and value and all(isinstance(v, str) and v.startswith(named) for v in value):
        return tuple(value)
    return digests(as_visuals(value))
