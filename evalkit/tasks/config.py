"""The typed form of one lm-eval task YAML, validated with every problem reported at once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.errors import did_you_mean, raise_all

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")

# Keys lm-eval accepts that change nothing evalkit computes.
IGNORED_KEYS = ("task_alias", "should_decontaminate", "doc_to_decontamination_query", "dataset_path_kwargs")
# Keys lm-eval accepts whose behaviour evalkit does not implement: refusing beats silently differing.
UNSUPPORTED_KEYS = (
    "group",
    "group_alias",
    "aggregate_metric_list",
    "process_results",
    "fewshot_config",
    "use_prompt",
    "doc_to_image",
    "doc_to_audio",
    "gen_prefix",
    "custom_dataset",
    "unsafe_code",
    "class",
    "multiple_input",
    "multiple_target",
)


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    metric: str
    aggregation: str | None = None
    higher_is_better: bool | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FilterStep:
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FilterChain:
    name: str
    steps: tuple[FilterStep, ...]


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    task: str
    source: Path
    tag: tuple[str, ...] = ()
    dataset_path: str | None = None
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    process_docs: Any = None
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    output_type: str = "generate_until"
    generation_kwargs: dict[str, Any] | None = None
    filter_list: tuple[FilterChain, ...] = ()
    metric_list: tuple[MetricSpec, ...] = ()
    repeats: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_split(self) -> str:
        return self.test_split or self.validation_split

    @property
    def folder(self) -> Path:
        return self.source.parent


FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig) if f.name != "source")
KNOWN_KEYS = FIELDS + IGNORED_KEYS + UNSUPPORTED_KEYS


def parse_task_config(data: dict[str, Any], source: Path) -> TaskConfig:
    """Check a merged task YAML dict and turn it into a TaskConfig."""
    problems: list[str] = []
    for key in data:
        if key in UNSUPPORTED_KEYS:
            problems.append(f"key '{key}' is not supported by evalkit")
        elif key not in KNOWN_KEYS:
            problems.append(f"unknown key '{key}'{did_you_mean(str(key), FIELDS)}")
    values = {k: v for k, v in data.items() if k in FIELDS}
    if not isinstance(values.get("task"), str):
        problems.append("missing 'task' (the task's name)")
    if values.get("output_type", "generate_until") not in OUTPUT_TYPES:
        kind = values["output_type"]
        problems.append(
            f"output_type '{kind}' is not one of {', '.join(OUTPUT_TYPES)}{did_you_mean(str(kind), OUTPUT_TYPES)}"
        )
    if not (values.get("test_split") or values.get("validation_split")):
        problems.append("no evaluation split: set test_split or validation_split")
    if values.get("output_type") == "multiple_choice" and values.get("doc_to_choice") is None:
        problems.append("multiple_choice needs doc_to_choice")
    tag = values.pop("tag", ())
    values["tag"] = (tag,) if isinstance(tag, str) else tuple(tag or ())
    values["metric_list"] = _parse_metrics(values.get("metric_list") or (), problems)
    values["filter_list"] = _parse_filters(values.get("filter_list") or (), problems)
    for key in ("description", "target_delimiter", "fewshot_delimiter"):
        if key in values and not isinstance(values[key], str):
            problems.append(f"'{key}' must be a string")
    for key in ("num_fewshot", "repeats"):
        if values.get(key) is not None and (not isinstance(values[key], int) or values[key] < 0):
            problems.append(f"'{key}' must be a non-negative integer")
    if values.get("dataset_kwargs") is None:
        values.pop("dataset_kwargs", None)
    if values.get("metadata") is None:
        values.pop("metadata", None)
    raise_all(problems, f"task file {source}")
    return TaskConfig(source=source, **values)


def _parse_metrics(items: Any, problems: list[str]) -> tuple[MetricSpec, ...]:
    specs = []
    for item in items:
        if not isinstance(item, dict) or "metric" not in item:
            problems.append(f"metric_list entry {item!r} needs a 'metric' key")
            continue
        extra = {k: v for k, v in item.items() if k not in ("metric", "aggregation", "higher_is_better")}
        specs.append(
            MetricSpec(
                metric=item["metric"],
                aggregation=item.get("aggregation"),
                higher_is_better=item.get("higher_is_better"),
                kwargs=extra,
            )
        )
    return tuple(specs)


def _parse_filters(items: Any, problems: list[str]) -> tuple[FilterChain, ...]:
    chains = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item or "filter" not in item:
            problems.append(f"filter_list entry {item!r} needs 'name' and 'filter'")
            continue
        steps = []
        for step in item["filter"]:
            if not isinstance(step, dict) or "function" not in step:
                problems.append(f"filter step {step!r} in '{item['name']}' needs a 'function'")
                continue
            steps.append(
                FilterStep(function=step["function"], kwargs={k: v for k, v in step.items() if k != "function"})
            )
        chains.append(FilterChain(name=item["name"], steps=tuple(steps)))
    return tuple(chains)
