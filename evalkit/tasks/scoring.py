"""Rank 0's scoring, done by lm-eval itself on the gathered model outputs.

The outputs of every request, merged by global index, become the ``resps`` of lm-eval's
instances; then lm-eval's filters, ``process_results``, aggregations, standard errors and group
consolidation run exactly as in its own evaluator at world size 1. Tasks that execute generated
code (``unsafe_code``) are scored in a separate sandboxed process, never inside a rank.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval.evaluator_utils import _process_results
from lm_eval.utils import handle_non_serializable, hash_string, sanitize_list

from evalkit.models.openai_api import run_concurrently
from evalkit.models.stopping import drop_thinking
from evalkit.tasks.images import image_label, is_image
from evalkit.tasks.lmms import LmmsTask
from evalkit.tasks.lmms_scoring import AggregationArgs
from evalkit.tasks.requests import TaskPlan


@dataclass(frozen=True)
class RequestError:
    """A request whose model call failed (recorded with --on-error record): never scored."""

    message: str


@dataclass
class Scored:
    results: dict[str, Any]  # lm-eval's results dict: results, groups, group_subtasks, configs, ...
    samples: dict[str, list[dict[str, Any]]]  # per task, lm-eval's sample rows (one per doc and filter)
    failed: dict[str, int]  # per task, docs left out because a request failed


# (task plan, [(doc_id, doc, filtered responses)]) -> one metrics dict per item
ProcessBatch = Callable[[TaskPlan, list[tuple[int, Any, list[Any]]]], list[dict[str, Any]]]

# What lm-eval's filters may see in place of a failed request's output; the doc is not scored.
PLACEHOLDER = {"loglikelihood": (float("-inf"), False), "loglikelihood_rolling": float("-inf"), "generate_until": ""}


def _as_response(kind: str, value: Any) -> Any:
    """A result read back from a JSON shard, in the type lm-eval's metrics expect."""
    return tuple(value) if kind == "loglikelihood" else value


def attach_outputs(plan: TaskPlan, outputs: list[Any], think_end_token: str | None = None) -> dict[int, str]:
    """Give each instance its responses (one per repeat); return the failed docs' first error.
    With ``think_end_token``, a generation's response is what follows its reasoning."""
    errors: dict[int, str] = {}
    for instance, indices in zip(plan.task.instances, plan.instance_requests, strict=True):
        values = [outputs[i] for i in indices]
        failures = [v.message for v in values if isinstance(v, RequestError)]
        if failures:
            errors.setdefault(instance.doc_id, failures[0])
            values = [PLACEHOLDER[instance.request_type]] * len(values)
        elif instance.request_type == "generate_until" and think_end_token:
            values = [drop_thinking(v, think_end_token) if isinstance(v, str) else v for v in values]
        instance.resps = [_as_response(instance.request_type, v) for v in values]
    return errors


def in_process(plan: TaskPlan, items: list[tuple[int, Any, list[Any]]]) -> list[dict[str, Any]]:
    return [plan.task.process_results(doc, results) for _, doc, results in items]


def concurrently(workers: int, check: Callable[[], None]) -> ProcessBatch:
    """``process_results`` of ``workers`` docs at once, results in doc order: a judge task's scoring
    waits on HTTP calls, which then overlap as a served model's requests do. ``check`` runs after
    each doc and may raise; then no further doc starts (judge task code scores a failed judge call
    as a wrong answer, so the caller checks for one rather than score every doc so)."""

    def one(plan: TaskPlan, doc: Any, results: list[Any]) -> dict[str, Any]:
        metrics = plan.task.process_results(doc, results)
        check()
        return metrics

    def run(plan: TaskPlan, items: list[tuple[int, Any, list[Any]]]) -> list[dict[str, Any]]:
        calls = [functools.partial(one, plan, doc, results) for _, doc, results in items]
        return run_concurrently(calls, workers, lambda finished: None)

    return run


def _json_value(value: Any) -> Any:
    """lm-eval's fallback for values JSON lacks, except that an image (or raw bytes, such as an
    undecoded image) is named by its content, so doc hashes do not change from one run to the next."""
    if is_image(value):
        return image_label(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<bytes sha256:{hashlib.sha256(value).hexdigest()}>"
    return handle_non_serializable(value)


def _prompt_hash(context: Any) -> str:
    # a doc_to_messages context is a list of chat messages
    return hash_string(context if isinstance(context, str) else json.dumps(context, ensure_ascii=False))


def sample_row(example: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's samples JSONL row: arguments as gen_args_i/arg_j, responses and target as strings."""
    row = dict(example)
    row["arguments"] = {
        f"gen_args_{i}": {f"arg_{j}": arg for j, arg in enumerate(args)} for i, args in enumerate(example["arguments"])
    }
    row["resps"] = sanitize_list(example["resps"])
    row["filtered_resps"] = sanitize_list(example["filtered_resps"])
    row["target"] = str(example["target"])
    return json.loads(json.dumps(row, default=_json_value, ensure_ascii=False))


def _doc_hash(doc: Any) -> str:
    return hash_string(json.dumps(doc, indent=2, default=_json_value, ensure_ascii=False))


def score_task(
    plan: TaskPlan, outputs: list[Any], process: ProcessBatch, think_end_token: str | None = None
) -> tuple[dict, list[dict], int]:
    """lm-eval's per-doc loop for one task: raw metric values, sample rows, failed doc count."""
    task = plan.task
    errors = attach_outputs(plan, outputs, think_end_token)
    task.apply_filters()
    by_doc: dict[int, list[Any]] = defaultdict(list)
    for instance in task.instances:
        by_doc[instance.doc_id].append(instance)
    for instances in by_doc.values():
        instances.sort(key=lambda x: x.idx)
    # The docs the requests were built from (lm-eval's evaluator reads them again through
    # doc_iterator, which re-runs process_docs over the whole split).
    docs = [(doc_id, by_doc[doc_id][0].doc) for doc_id in sorted(by_doc)]
    pending = []
    for filter_key in task.instances[0].filtered_resps:
        for doc_id, doc in docs:
            if doc_id not in errors:
                pending.append((filter_key, doc_id, doc, by_doc[doc_id]))
    values = process(plan, [(doc_id, doc, [r.filtered_resps[key] for r in reqs]) for key, doc_id, doc, reqs in pending])
    raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
    rows = []
    for (filter_key, doc_id, doc, reqs), metrics in zip(pending, values, strict=True):
        target = task.doc_to_target(doc)
        example = {
            "doc_id": doc_id,
            "doc": doc,
            "target": target,
            "arguments": [r.args for r in reqs],
            "resps": [r.resps for r in reqs],
            "filtered_resps": [r.filtered_resps[filter_key] for r in reqs],
            "filter": filter_key,
            "metrics": list(metrics),
            "doc_hash": _doc_hash(reqs[0].doc),
            "prompt_hash": _prompt_hash(reqs[0].arguments[0]),
            "target_hash": hash_string(str(target)),
            **metrics,
        }
        rows.append(sample_row(example))
        for metric, value in metrics.items():
            raw[(metric, filter_key)].append(value)
    for doc_id, doc in docs:
        if doc_id in errors:
            rows.append(
                {
                    "doc_id": doc_id,
                    "doc": json.loads(json.dumps(doc, default=_json_value)),
                    "error": errors[doc_id],
                }
            )
    if not raw:
        raise RuntimeError(f"task {plan.name}: every doc failed; see samples_{plan.name}.jsonl")
    return raw, rows, len(errors)


def score(
    plans: list[TaskPlan],
    groups: dict[str, Any],
    outputs: list[Any],
    *,
    bootstrap_iters: int,
    sandboxed: ProcessBatch | None = None,
    judged: ProcessBatch | None = None,
    think_end_token: str | None = None,
    output: Path | None = None,
) -> Scored:
    """lm-eval's scoring of every task; tasks that run generated code go through ``sandboxed``, tasks
    scored by an LLM judge through ``judged`` (each, when given), the rest in this process.
    lmms-eval tasks are aggregated as lmms-eval's evaluator does, their ``args`` aggregations
    writing into ``output`` (the run's folder)."""
    acc, samples, failed, counts = {}, {}, {}, {}
    for plan in plans:
        process = in_process
        if plan.unsafe and sandboxed is not None:
            process = sandboxed
        elif judged is not None and plan.judged:
            process = judged
        raw, rows, failed[plan.name] = score_task(plan, outputs, process, think_end_token)
        if isinstance(plan.task, LmmsTask):
            plan.task.aggregation_args = AggregationArgs(output_path=None if output is None else str(output))
            raw = plan.task.aggregated_metrics(raw)
            taken = len({instance.doc_id for instance in plan.task.instances})
            counts[plan.name] = plan.task.sample_counts(taken - failed[plan.name])
        acc[plan.name] = {"task": plan.task, "raw_metrics": raw, "logged_samples": []}
        samples[plan.name] = rows
    results = dict(_process_results(acc, groups, bootstrap_iters)._to_eval_results())
    results["n-samples"] = {**results["n-samples"], **counts}
    return Scored(results=results, samples=samples, failed=failed)


def task_hash(rows: list[dict[str, Any]]) -> str:
    """lm-eval's task hash: every scored sample row's doc, prompt and target hashes, in order."""
    return hash_string("".join(r["doc_hash"] + r["prompt_hash"] + r["target_hash"] for r in rows if "doc_hash" in r))
