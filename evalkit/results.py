"""Rank 0 turns gathered model outputs into scores, ``results.json`` and per-doc samples."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from evalkit.config import RunConfig
from evalkit.errors import UsageError
from evalkit.filters import FilterPipeline
from evalkit.parallel import Topology
from evalkit.report import format_table, git_hash, package_versions, write_json_atomic, write_jsonl_atomic
from evalkit.score import aggregate, doc_metrics, filter_results, task_metrics
from evalkit.tasks.build import DocPlan, TaskPlan


@dataclass(frozen=True)
class RequestError:
    """A request whose model call failed (recorded with --on-error record): never scored."""

    message: str


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def doc_hash(doc: dict[str, Any]) -> str:
    return sha256(json.dumps(doc, indent=2, default=str, ensure_ascii=False))


def model_outputs(plan: TaskPlan, doc: DocPlan, outputs: list[Any]) -> dict[str, Any]:
    """The raw outputs of a doc's requests, named by what they are."""
    raw = [outputs[r.index] for r in doc.requests]
    kind = plan.config.output_type
    if kind in ("multiple_choice", "loglikelihood"):
        return {"loglikelihoods": [ll for ll, _ in raw], "is_greedy": [g for _, g in raw]}
    if kind == "loglikelihood_rolling":
        return {"loglikelihood": raw[0] if len(raw) == 1 else raw}
    return {"response": raw[0] if len(raw) == 1 else raw}


def score_task(
    plan: TaskPlan, outputs: list[Any], on_error: str = "fail"
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Aggregates, one sample line per doc, and how many docs were left out because a request failed."""
    pipeline = FilterPipeline(plan.config.filter_list)
    metrics = task_metrics(plan)
    per_doc, samples, failed = [], [], 0
    for doc in plan.docs:
        sample = {
            "doc_id": doc.doc_id,
            "doc": doc.doc,
            "prompt": doc.prompt,
            "target": doc.target,
            "arguments": [list(r.args) for r in doc.requests],
            "doc_hash": doc_hash(doc.doc),
            "prompt_hash": sha256(doc.requests[0].args[0]),
            "target_hash": sha256(str(doc.target)),
        }
        errors = [outputs[r.index].message for r in doc.requests if isinstance(outputs[r.index], RequestError)]
        if errors:
            failed += 1
            sample["error"] = errors[0]
        else:
            try:
                filtered = filter_results(pipeline, doc, {r.index: outputs[r.index] for r in doc.requests})
                values = {name: doc_metrics(plan, doc, results, metrics) for name, results in filtered.items()}
            except Exception as exc:
                if on_error != "record":
                    raise
                failed += 1
                sample["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
                samples.append(sample)
                continue
            per_doc.append(values)
            sample.update(model_outputs(plan, doc, outputs))
            sample["filtered_resps"] = dict(filtered)
            sample["metrics"] = {f"{m},{f}": v for f, ms in values.items() for m, v in ms.items()}
        samples.append(sample)
    if not per_doc:
        raise RuntimeError(f"task {plan.config.task}: every doc failed; see samples_{plan.config.task}.jsonl")
    return aggregate(metrics, per_doc, list(pipeline.chains)), samples, failed


def task_hash(samples: list[dict[str, Any]], n_filters: int) -> str:
    """lm-eval's task hash: its samples file holds every doc once per filter, hashes joined in order."""
    per_filter = "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples)
    return sha256(per_filter * n_filters)


def write_outputs(
    config: RunConfig,
    topo: Topology,
    plans: list[TaskPlan],
    outputs: list[Any],
    model: dict[str, Any],
    rank_stats: list[dict[str, Any]],
    wall: float,
    resume: dict[str, int],
) -> None:
    results, all_samples, hashes, failed = {}, {}, {}, {}
    for plan in plans:
        scores, samples, failed[plan.config.task] = score_task(plan, outputs, config.on_error)
        task = plan.config.task
        results[task] = {"name": task, "alias": task, "sample_len": len(samples) - failed[task], **scores}
        all_samples[task] = samples
        hashes[task] = task_hash(samples, len(FilterPipeline(plan.config.filter_list).chains))
    carried = [s for s in rank_stats if s["tp_rank"] == 0]
    document = {
        "results": results,
        "group_subtasks": {p.config.task: [] for p in plans},
        "configs": {p.config.task: _config_echo(p) for p in plans},
        "versions": {p.config.task: p.config.metadata.get("version") for p in plans},
        "n-shot": {p.config.task: p.num_fewshot for p in plans},
        "higher_is_better": {p.config.task: {m.name: m.higher_is_better for m in task_metrics(p)} for p in plans},
        "n-samples": {
            p.config.task: {"original": p.n_docs_total, "effective": len(p.docs) - failed[p.config.task]} for p in plans
        },
        "errors": {task: n for task, n in failed.items() if n},
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
        "task_hashes": hashes,
        "package_versions": package_versions(),
        "git_hash": git_hash(),
        "date": time.time(),
        "total_evaluation_time_seconds": round(wall, 3),
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
        for task, samples in all_samples.items():
            write_jsonl_atomic(config.output / f"samples_{task}.jsonl", samples)
        write_json_atomic(config.output / "results.json", document)
    except OSError as exc:
        raise UsageError(f"cannot write to --output {config.output}: {exc.strerror}") from None
    print(format_table(results, document["versions"], document["n-shot"], document["higher_is_better"]), flush=True)
    print(f"results written to {config.output / 'results.json'}", flush=True)


def _config_echo(plan: TaskPlan) -> dict[str, Any]:
    cfg = plan.config
    echo = {k: v for k, v in vars(cfg).items() if v not in (None, (), {}, "")}
    echo["num_fewshot"] = plan.num_fewshot
    return json.loads(json.dumps(echo, default=str))
