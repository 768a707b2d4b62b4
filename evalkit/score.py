"""Rank 0's scoring: filters, per-doc metric values and task aggregates, as lm-eval computes them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from evalkit.errors import UsageError
from evalkit.filters import FilterPipeline
from evalkit.metrics import AGGREGATIONS, METRICS, exact_match, stderr
from evalkit.tasks.build import DocPlan, TaskPlan
from evalkit.tasks.config import MetricSpec

DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}
SUPPORTED = {
    "multiple_choice": ("acc", "acc_norm", "exact_match"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}
BOOTSTRAP_ITERS = 100_000


@dataclass(frozen=True)
class Metric:
    name: str
    aggregation: str
    higher_is_better: bool
    kwargs: dict[str, Any]


def task_metrics(plan: TaskPlan) -> list[Metric]:
    """The task's metrics with their aggregations, checked before any model is loaded."""
    kind = plan.config.output_type
    specs = plan.config.metric_list or tuple(MetricSpec(metric=m) for m in DEFAULT_METRICS[kind])
    out = []
    for spec in specs:
        info = METRICS.get(spec.metric)
        if spec.metric not in SUPPORTED[kind]:
            raise UsageError(
                f"task {plan.config.task}: metric '{spec.metric}' does not apply to {kind} "
                f"(use one of {', '.join(SUPPORTED[kind])})"
            )
        aggregation = spec.aggregation or info.aggregation
        AGGREGATIONS.get(aggregation)
        hib = info.higher_is_better if spec.higher_is_better is None else bool(spec.higher_is_better)
        out.append(Metric(spec.metric, aggregation, hib, dict(spec.kwargs)))
    return out


def doc_metrics(plan: TaskPlan, doc: DocPlan, results: list[Any], metrics: list[Metric]) -> dict[str, Any]:
    """Per-doc values from one filtered result per request instance."""
    kind = plan.config.output_type
    wanted = {m.name for m in metrics}
    if kind == "loglikelihood":
        ll, greedy = results[0]
        values = {"perplexity": ll, "acc": int(greedy)}
    elif kind == "loglikelihood_rolling":
        (ll,) = results
        words, nbytes = len(re.split(r"\s+", doc.target)), len(doc.target.encode("utf-8"))
        values = {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes), "bits_per_byte": (ll, nbytes)}
    elif kind == "multiple_choice":
        values = _multiple_choice(doc, results)
    else:
        values = {m.name: _generation_score(doc, results[0], m) for m in metrics}
    return {name: value for name, value in values.items() if name in wanted}


def _multiple_choice(doc: DocPlan, results: list[tuple[float, bool]]) -> dict[str, float]:
    lls, greedy = zip(*results, strict=True)
    choices = doc.choices
    lengths = np.array([float(len(c)) for c in choices])
    pred, pred_norm = np.argmax(lls), np.argmax(np.array(lls) / lengths)
    gold = doc.target
    if isinstance(gold, list):
        gold = [g if g < len(choices) else -100 for g in gold]
        return {
            "acc": float(pred in gold),
            "acc_norm": float(pred_norm in gold),
            "exact_match": int(any(greedy[g] if g != -100 else 0 for g in gold)),
        }
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -100
    elif isinstance(gold, int) and gold >= len(choices):
        gold = -100
    return {
        "acc": float(pred == gold),
        "acc_norm": float(pred_norm == gold),
        "exact_match": int(greedy[gold]) if gold != -100 else 0,
    }


def _generation_score(doc: DocPlan, answer: Any, metric: Metric) -> float:
    gold = doc.target
    if doc.choices is not None:
        gold = doc.choices[gold]
    golds = (
        [str(g) for g in gold]
        if isinstance(gold, list)
        else [gold if isinstance(gold, type(answer)) else type(answer)(gold)]
    )
    scores = [exact_match(answer, g, **metric.kwargs) for g in golds]
    if not isinstance(gold, list):
        return scores[0]
    return 1.0 if any(scores) else 0.0


def filter_results(pipeline: FilterPipeline, doc: DocPlan, outputs: dict[int, Any]) -> dict[str, list[Any]]:
    """For each filter chain, one filtered value per request instance of the doc."""
    by_instance: dict[int, list[Any]] = {}
    for request in doc.requests:
        by_instance.setdefault(request.instance, []).append(outputs[request.index])
    filtered: dict[str, list[Any]] = {name: [] for name in pipeline.chains}
    for instance in sorted(by_instance):
        for name, value in pipeline.apply(by_instance[instance]).items():
            filtered[name].append(value)
    return filtered


def aggregate(metrics: list[Metric], per_doc: list[dict[str, dict[str, Any]]], filters: list[str]) -> dict[str, Any]:
    """Task-level "metric,filter" values and their standard errors."""
    out: dict[str, Any] = {}
    by_name = {m.name: m for m in metrics}
    for filter_name in filters:
        # Keys come in the order the per-doc values name them, as lm-eval writes them.
        for metric in [by_name[name] for name in per_doc[0][filter_name]]:
            values = [d[filter_name][metric.name] for d in per_doc if metric.name in d[filter_name]]
            out[f"{metric.name},{filter_name}"] = AGGREGATIONS.get(metric.aggregation)(values)
            out[f"{metric.name}_stderr,{filter_name}"] = stderr(metric.aggregation, values, BOOTSTRAP_ITERS)
    return out
