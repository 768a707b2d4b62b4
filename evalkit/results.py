"""Score and write: rank 0 turns gathered model outputs into ``results.json``, per-task samples and a table.

``results.json`` is lm-eval's document (``results``, ``groups``, ``group_subtasks``, ``configs``,
``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``task_hashes``) plus evalkit's
sections (run config, model, layout, seeds, resume, errors, throughput). ``samples_<task>.jsonl``
holds lm-eval's per-sample rows, one per doc and filter, so tools written for lm-eval read it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lm_eval.utils import make_table

from evalkit.config import RunConfig
from evalkit.errors import UsageError, no_space
from evalkit.judge import JudgeProxy, task_environment
from evalkit.parallel import Topology
from evalkit.plan import RunPlan
from evalkit.report import git_hash, package_versions, write_json_atomic, write_jsonl_atomic
from evalkit.tasks.requests import TaskPlan
from evalkit.tasks.scoring import ProcessBatch, Scored, concurrently, score, task_hash
from evalkit.timings import Phases


def sandboxed_scoring(config: RunConfig, model_path: str) -> ProcessBatch:
    """Scoring of tasks that execute generated code, in a separate sandboxed process."""

    def run(plan: TaskPlan, items: list[tuple[int, Any, list[Any]]]) -> list[dict[str, Any]]:
        from evalkit.sandbox import SandboxRequest, score_in_sandbox

        request = SandboxRequest(
            include_path=[str(p) for p in config.include_path],
            metadata=config.task_metadata(model_path),
            task_specs=list(config.tasks),
            task=plan.name,
            items=[(doc_id, results) for doc_id, _, results in items],
            cwd=os.getcwd(),
        )
        reply = score_in_sandbox(request, timeout=max(300.0, 5.0 * len(items)))
        task = plan.task
        for key, source in reply.aliases.items():  # what process_results would have registered here
            task._aggregation_list.setdefault(key, task._aggregation_list[source])
            if source in task._higher_is_better:
                task._higher_is_better.setdefault(key, task._higher_is_better[source])
        return reply.metrics

    return run


def score_outputs(
    config: RunConfig, plan: RunPlan, outputs: list[Any], phases: Phases, judge: JudgeProxy | None = None
) -> Scored:
    """lm-eval's metrics, groups and sample rows for the merged outputs (rank 0); judge tasks call
    the judge through ``judge``, --concurrency docs at once."""
    with phases.phase("scoring"), task_environment(judge.url if judge else None, config.judge_model):
        scored = score(
            plan.tasks,
            plan.groups,
            outputs,
            bootstrap_iters=config.bootstrap_iters,
            sandboxed=sandboxed_scoring(config, plan.model_path),
            judged=concurrently(config.concurrency, judge.check_answered) if judge else None,
            think_end_token=config.think_end_token,
            output=config.output,
        )
    if judge is not None:
        judge.check_answered()
        scored.results["judge"] = judge.summary()  # becomes results.json's "judge" section
        print(
            f"evalkit: judge {config.judge_model}: {judge.asked} answer(s) asked, {judge.replayed} replayed from "
            f"{judge.journal}",
            flush=True,
        )
    return scored


def token_totals(rank_stats: list[dict[str, Any]]) -> dict[str, int]:
    """Scored tokens the model computed, and one row per request would have, over the ranks that
    carry results ("tokens_computed", "tokens_one_row_per_request", and under vLLM's prefix cache
    "tokens_scored_again_uncached"); the hf backend's decoding steps and the rows they advanced
    ("generation_steps", "tokens_generated"). None from a backend that does not count them."""
    totals: dict[str, int] = {}
    for stats in rank_stats:
        for name, count in (stats.get("token_counts") or {}).items():
            key = name if name.endswith("_steps") else f"tokens_{name}"
            totals[key] = totals.get(key, 0) + int(count)
    return totals


def write_outputs(
    config: RunConfig,
    topo: Topology,
    scored: Scored,
    model: dict[str, Any],
    rank_stats: list[dict[str, Any]],
    started: float,
    resume: dict[str, int],
    phases: Phases,
) -> None:
    """results.json, samples_<task>.jsonl and the table, written atomically."""
    carried = [s for s in rank_stats if topo.layout.carries_results(s["rank"])]
    document = {
        **scored.results,
        "task_hashes": {task: task_hash(rows) for task, rows in scored.samples.items()},
        "errors": {task: n for task, n in scored.failed.items() if n},
        "resume": resume,
        "config": config.to_json(),
        "model": model,
        "parallel": topo.describe(),
        "seed": {
            "python": config.seed.python,
            "numpy": config.seed.numpy,
            "torch": config.seed.torch,
            "fewshot": config.seed.fewshot,
        },
        "package_versions": package_versions(),
        "git_hash": git_hash(),
        "date": time.time(),
        "total_evaluation_time_seconds": None,  # set below, as the last thing before writing
        "parameters_per_rank": {s["rank"]: s["parameters"] for s in rank_stats},
        "throughput": {
            "per_rank": [
                {**s, "requests_per_second": round(s["requests"] / s["seconds"], 3) if s["seconds"] else None}
                for s in carried
            ],
        },
    }
    try:
        config.output.mkdir(parents=True, exist_ok=True)
        with phases.phase("writing"):
            for task, rows in scored.samples.items():
                write_jsonl_atomic(config.output / f"samples_{task}.jsonl", rows)
        document["timings"] = {**phases.report(), **token_totals(carried)}
        document["total_evaluation_time_seconds"] = round(time.time() - started, 3)
        write_json_atomic(config.output / "results.json", document)
    except OSError as exc:
        if no_space(exc):
            raise  # a full disk is not bad input: the run ends resumable (runner.run_guarded)
        raise UsageError(f"cannot write to --output {config.output}: {exc.strerror}") from None
    print(make_table(document), flush=True)
    if document.get("groups"):
        print(make_table(document, "groups"), flush=True)
    print(f"results written to {config.output / 'results.json'}", flush=True)
