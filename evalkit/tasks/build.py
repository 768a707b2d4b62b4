"""From a task config to prompts and model requests, in global doc order on every rank.

Prompts are built for all docs before any sharding, with one few-shot RNG per task advanced
doc after doc exactly as lm-eval does at world size 1. So a doc's prompt never depends on the
number of ranks, and equals lm-eval's prompt for that doc.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from evalkit.errors import UsageError
from evalkit.tasks.config import TaskConfig
from evalkit.tasks.data import load_splits, split_docs
from evalkit.tasks.templates import DocFormatter

DEFAULT_MAX_GEN_TOKS = 256


@dataclass(frozen=True)
class Request:
    """One model call. ``index`` is its position in the whole run (all tasks)."""

    index: int
    task: str
    doc_id: int
    instance: int
    repeat: int
    kind: str
    args: tuple

    @property
    def cost(self) -> int:
        return sum(len(a) for a in self.args if isinstance(a, str))


@dataclass
class DocPlan:
    doc_id: int
    doc: dict[str, Any]
    prompt: str
    target: Any
    choices: list[str] | None
    requests: list[Request] = field(default_factory=list)


@dataclass
class TaskPlan:
    config: TaskConfig
    num_fewshot: int
    n_docs_total: int
    docs: list[DocPlan]
    generation_kwargs: dict[str, Any] | None


def effective_num_fewshot(task: TaskConfig, override: int | None) -> int:
    """lm-eval's rule: a task that sets num_fewshot: 0 keeps 0 even when a value is passed."""
    if override is not None and task.num_fewshot != 0:
        return override
    return task.num_fewshot or 0


def doc_limit(n_docs: int, limit: float | None) -> int:
    if limit is None:
        return n_docs
    return min(n_docs, math.ceil(n_docs * limit) if limit < 1.0 else int(limit))


def generation_kwargs(task: TaskConfig) -> dict[str, Any] | None:
    if task.output_type != "generate_until":
        return None
    if task.generation_kwargs is None:
        return {
            "temperature": 0.0,
            "do_sample": False,
            "max_gen_toks": DEFAULT_MAX_GEN_TOKS,
            "until": [task.fewshot_delimiter],
        }
    kwargs = dict(task.generation_kwargs)
    if "temperature" in kwargs:
        kwargs["temperature"] = float(kwargs["temperature"])
    kwargs.setdefault("until", [task.fewshot_delimiter])
    return kwargs


class FewshotSource:
    """lm-eval's default sampler: ``Random(seed).sample`` over the few-shot pool, once per doc."""

    def __init__(self, pool: list[dict[str, Any]], seed: int, exclude_eval_doc: bool) -> None:
        self.pool = pool
        self.rnd = random.Random(seed)
        self.exclude_eval_doc = exclude_eval_doc

    def sample(self, n: int, doc: dict[str, Any]) -> list[dict[str, Any]]:
        if n == 0:
            return []
        if not self.pool:
            raise UsageError("num_fewshot > 0 but the few-shot split has no docs")
        if not self.exclude_eval_doc:
            return self.rnd.sample(self.pool, n)
        picked = [d for d in self.rnd.sample(self.pool, n + 1) if d != doc][:n]
        if len(picked) < n:
            picked = self.rnd.sample([d for d in self.pool if d != doc], n)
        return picked


def build_task(task: TaskConfig, *, num_fewshot: int | None, limit: float | None, fewshot_seed: int) -> TaskPlan:
    splits = load_splits(task)
    eval_docs = split_docs(task, splits, task.eval_split)
    if len(eval_docs) == 0:
        raise UsageError(f"task {task.task}: split '{task.eval_split}' has no docs")
    features = list(eval_docs.features) if hasattr(eval_docs, "features") else list(eval_docs[0])
    formatter = DocFormatter(task.task, features, has_choices=task.doc_to_choice is not None)
    shots = effective_num_fewshot(task, num_fewshot)
    fewshot_split = task.fewshot_split or task.training_split or task.validation_split or task.test_split
    pool = list(split_docs(task, splits, fewshot_split)) if shots > 0 else []
    sampler = FewshotSource(pool, fewshot_seed, exclude_eval_doc=task.fewshot_split == task.test_split)
    gen_kwargs = generation_kwargs(task)
    n_docs = doc_limit(len(eval_docs), limit)
    docs = []
    for doc_id in range(n_docs):
        doc = eval_docs[doc_id]
        prompt = build_prompt(task, formatter, doc, sampler.sample(shots, doc))
        target = formatter.target(task.doc_to_target, doc)
        choices = formatter.choices(task.doc_to_choice, doc) if task.doc_to_choice is not None else None
        docs.append(DocPlan(doc_id=doc_id, doc=doc, prompt=prompt, target=target, choices=choices))
    return TaskPlan(
        config=task,
        num_fewshot=shots,
        n_docs_total=len(eval_docs),
        docs=docs,
        generation_kwargs=gen_kwargs,
    )


def _answer_text(task: TaskConfig, target: Any, choices: list[str] | None) -> str:
    if choices and isinstance(target, int):
        return choices[target]
    if isinstance(target, list):
        return target[0]
    if not isinstance(target, str):
        raise UsageError(f"task {task.task}: a few-shot target must be text or a choice index, got {target!r}")
    return target


def build_prompt(task: TaskConfig, fmt: DocFormatter, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """description + each shot as text, target delimiter, answer, few-shot delimiter + the doc's text."""
    parts = [fmt.field_or_template(task.description, doc) or ""]
    for shot in shots:
        question = fmt.text(task.doc_to_text, shot)
        target = fmt.target(task.doc_to_target, shot)
        choices = fmt.choices(task.doc_to_choice, shot) if task.doc_to_choice is not None else None
        _require_text(task, question)
        if target is None or target == "":
            parts.append(question)
            continue
        parts += [question, task.target_delimiter, _answer_text(task, target, choices), task.fewshot_delimiter]
    question = fmt.text(task.doc_to_text, doc)
    _require_text(task, question)
    parts.append(question)
    return "".join(parts)


def _require_text(task: TaskConfig, text: Any) -> None:
    if not isinstance(text, str):
        raise UsageError(
            f"task {task.task}: doc_to_text must give text, got {type(text).__name__} "
            f"(multiple-input tasks are not supported)"
        )


def requests_for(plan: TaskPlan, doc: DocPlan, start: int) -> list[Request]:
    """The model calls one doc needs, numbered from ``start``; each repeated ``repeats`` times."""
    task = plan.config
    if task.output_type == "multiple_choice":
        if not isinstance(doc.choices, list) or not doc.choices:
            raise UsageError(f"task {task.task}: doc_to_choice must give a non-empty list for doc {doc.doc_id}")
        calls = [("loglikelihood", (doc.prompt, f"{task.target_delimiter}{c}")) for c in doc.choices]
    elif task.output_type == "loglikelihood":
        calls = [("loglikelihood", (doc.prompt, doc.target))]
    elif task.output_type == "loglikelihood_rolling":
        calls = [("loglikelihood_rolling", (doc.target,))]
    else:
        calls = [("generate_until", (doc.prompt, plan.generation_kwargs))]
    out = []
    for instance, (kind, args) in enumerate(calls):
        for repeat in range(task.repeats):
            out.append(
                Request(
                    index=start + len(out),
                    task=task.task,
                    doc_id=doc.doc_id,
                    instance=instance,
                    repeat=repeat,
                    kind=kind,
                    args=args,
                )
            )
    return out


def number_requests(plans: list[TaskPlan]) -> list[Request]:
    """Attach every doc's requests and return them all, numbered in global order."""
    everything: list[Request] = []
    for plan in plans:
        for doc in plan.docs:
            doc.requests = requests_for(plan, doc, len(everything))
            everything += doc.requests
    return everything
