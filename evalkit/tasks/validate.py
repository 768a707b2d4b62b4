"""Is a task, group or tag usable, short of loading its data and a model?

``validate(library, names)`` builds each name through lm-eval's own code (the library's task
factory and ``ConfigurableTask.__init__``) and stops where the data would be loaded: the task's
``download`` raises a private sentinel, and reaching it means everything before it was fine: the
YAML and its includes parse, ``!function`` references import (missing packages show up here),
``TaskConfig`` builds, ``output_type`` is known, every metric and aggregation resolves. What
``ConfigurableTask`` only does after the download is then checked on the half-built task: the
filter pipelines build, the few-shot sampler and samples are well-formed, the prompt templates
compile. A group is valid when every member is (recursively); its reason names the first member
that is not, e.g. ``group 'mmlu' > task 'mmlu_x': needs the Python package ...``.

Nothing is downloaded: the ``evaluate`` package is put in offline mode for the duration (it would
otherwise ask the hub for every metric name lm-eval does not know), ``datasets.load_dataset`` stops
the same way ``download`` does, and lm-eval's log output is silenced. All of this is undone when
``validate`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lm_eval.tasks._factory as lm_factory
from lm_eval.api.task import ConfigurableTask, Task
from lm_eval.tasks._index import Entry, Kind, TaskIndex

from evalkit.compat import install_compat
from evalkit.errors import did_you_mean, one_line
from evalkit.judge import task_environment
from evalkit.tasks.library import TaskLibrary, _Factory
from evalkit.tasks.problems import TaskLoadError, causes, dataset_label, reason

__all__ = ["validate", "kind_of"]

_LOCK = threading.RLock()


class _ReachedData(Exception):
    """Raised where a task would load its dataset: everything before it is valid."""


class _Problem(Exception):
    """A configuration mistake found by a check of our own, already worded for the user."""


# ---------------------------------------------------------------- the checked task classes


def _stop(*_args: Any, **_kwargs: Any) -> None:
    raise _ReachedData


@functools.cache
def _checked(cls: type) -> type:
    """``cls`` with data loading replaced by the sentinel and the post-download checks added.

    The ``__init__`` keeps the original's signature (lm-eval's factory inspects it to decide whether
    to pass ``config``). A failure names the task (a task defined inline in a group is built here
    directly, not through the factory's ``_build_task``)."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            try:
                original(self, *args, **kwargs)
            except _ReachedData:
                pass
            except Exception as exc:
                # lm-eval does not stop at an unknown metric (it logs and stores None) but may fail
                # a little later on it (looking up its default aggregation); name the metric.
                problem = _metric_problem(self)
                if problem:
                    raise _Problem(problem) from exc
                raise
            _check_after_download(self)
        except TaskLoadError:
            raise
        except Exception as exc:
            config = kwargs.get("config")
            if isinstance(config, dict) and isinstance(config.get("task"), str):
                raise TaskLoadError(config["task"], exc, dataset=dataset_label(config)) from exc
            raise

    return type(cls.__name__, (cls,), {"__init__": __init__, "download": _stop, "__module__": cls.__module__})


# ---------------------------------------------------------------- checks on the half-built task

# The metrics each output type computes itself in ConfigurableTask.process_results; only
# generate_until calls the metric function lm-eval looked up.
_COMPUTED = {
    "loglikelihood": {"perplexity", "acc"},
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "multiple_choice": {
        "acc",
        "f1",
        "mcc",
        "acc_norm",
        "acc_bytes",
        "exact_match",
        "brier_score",
        "likelihood",
        "acc_mutual_info",
    },
}


def _metric_problem(task: Any) -> str | None:
    config = getattr(task, "_config", None)
    metric_list = getattr(config, "metric_list", None)
    if not isinstance(metric_list, list):
        return None
    from lm_eval.api.registry import aggregation_registry, metric_agg_registry, metric_registry

    fns = getattr(task, "_metric_fn_list", {})
    aggregations = getattr(task, "_aggregation_list", {})
    output_type = getattr(config, "output_type", None)
    for item in metric_list:
        if not isinstance(item, dict) or "metric" not in item:
            return "an entry of metric_list has no 'metric' key"
        metric = item["metric"]
        name = getattr(metric, "__name__", metric) if callable(metric) else metric
        if not isinstance(name, str):
            return f"metric_list entry {metric!r} is neither a metric name nor a function"
        if name not in fns:
            # lm-eval stopped at this entry: the only failure there is a missing default aggregation
            if "aggregation" not in item and name not in metric_agg_registry:
                return (
                    f"metric '{name}' has no default aggregation in lm-eval; "
                    f"give its metric_list entry an 'aggregation:' (e.g. mean)"
                )
            return None
        # lm-eval stores None for a name neither its registry nor `evaluate` resolves. That breaks
        # generate_until (which calls the function); the other output types compute their metrics
        # by name (e.g. `f1` with `hf_evaluate: true` on a multiple_choice task works offline).
        computed = name in _COMPUTED.get(output_type, ())
        if fns[name] is None and not computed and getattr(config, "process_results", None) is None:
            return _unknown_metric(name, metric_registry.keys(), bool(item.get("hf_evaluate")))
        aggregation = item.get("aggregation")
        if isinstance(aggregation, str) and aggregations.get(name) is None:
            return (
                f"metric '{name}': unknown aggregation '{aggregation}'"
                f"{did_you_mean(aggregation, aggregation_registry.keys())}"
            )
    return None


@functools.cache
def _evaluate_failure(name: str) -> BaseException | None:
    try:
        import evaluate

        evaluate.load(name)
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return exc
    return None


def _unknown_metric(name: str, known: Any, hf_evaluate: bool) -> str:
    failure = _evaluate_failure(name)
    why = _reason(failure) if failure else "evaluate.load failed"
    if hf_evaluate:
        return f"metric '{name}' (hf_evaluate): {why}"
    return f"metric '{name}' is not one of lm-eval's metrics{did_you_mean(name, known)}; {why}"


def _check_after_download(task: Any) -> None:
    """What ``ConfigurableTask.__init__`` does after the download, without the data."""
    config = getattr(task, "_config", None)
    if config is None:  # a plain Task subclass downloads before it has a config: nothing to check
        return
    problem = _metric_problem(task)
    if problem:
        raise _Problem(problem)
    _check_filters(getattr(config, "filter_list", None))
    _check_fewshot(getattr(config, "fewshot_config", None))
    _check_prompt(getattr(config, "use_prompt", None))
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "description", "gen_prefix"):
        value = getattr(config, key, None)
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            error = _template_error(value)
            if error:
                raise _Problem(f"{key} is not a valid Jinja template: {error}")


def _check_filters(filter_list: Any) -> None:
    if filter_list is None:
        return
    from lm_eval.api.registry import filter_registry
    from lm_eval.filters import build_filter_ensemble

    if not isinstance(filter_list, list):
        raise _Problem(f"filter_list must be a list of {{name, filter}} entries, got {type(filter_list).__name__}")
    for i, pipeline in enumerate(filter_list):
        if not isinstance(pipeline, dict) or "name" not in pipeline or "filter" not in pipeline:
            raise _Problem(f"filter_list entry {i + 1} needs a 'name' and a 'filter' list")
        name, steps = pipeline["name"], pipeline["filter"]
        if not isinstance(steps, list):
            raise _Problem(f"filter '{name}': 'filter' must be a list of {{function: ...}} steps")
        components = []
        for step in steps:
            if not isinstance(step, dict) or "function" not in step:
                raise _Problem(f"filter '{name}': every step needs a 'function' key, got {step!r}")
            function = step["function"]
            if not callable(function) and function not in filter_registry:
                raise _Problem(
                    f"filter '{name}': unknown filter function '{function}'"
                    f"{did_you_mean(str(function), filter_registry.keys())}"
                )
            components.append([function, {k: v for k, v in step.items() if k != "function"}])
        ensemble = build_filter_ensemble(name, components)
        for (function, _), step in zip(components, ensemble.filters, strict=True):
            if isinstance(step.func, type):  # a Filter class: its constructor checks its arguments
                try:
                    step()
                except Exception as exc:  # noqa: BLE001
                    raise _Problem(f"filter '{name}': {function}: {type(exc).__name__}: {one_line(exc)}") from exc


def _check_fewshot(fewshot: Any) -> None:
    if fewshot is None or isinstance(fewshot, dict):  # TaskConfig turns a dict into a FewshotConfig
        return
    from lm_eval.api import samplers

    sampler = getattr(fewshot, "sampler", "default")
    if isinstance(sampler, str):
        if sampler not in samplers.SAMPLER_REGISTRY:
            raise _Problem(
                f"fewshot_config.sampler: unknown sampler '{sampler}'{did_you_mean(sampler, samplers.SAMPLER_REGISTRY)}"
                f" (known: {', '.join(samplers.SAMPLER_REGISTRY)})"
            )
    elif not (isinstance(sampler, type) and issubclass(sampler, samplers.ContextSampler)):
        raise _Problem(f"fewshot_config.sampler must be a sampler name or a ContextSampler class, got {sampler!r}")
    samples = getattr(fewshot, "samples", None)
    if samples is not None and not (isinstance(samples, list) or callable(samples)):
        raise _Problem("fewshot_config.samples must be a list of documents or a function returning one")
    indices = getattr(fewshot, "fewshot_indices", None)
    if indices is not None and not (isinstance(indices, list) and all(isinstance(i, int) for i in indices)):
        raise _Problem("fewshot_config.fewshot_indices must be a list of integers")


def _check_prompt(use_prompt: Any) -> None:
    if use_prompt is None:
        return
    if not isinstance(use_prompt, str) or ":" not in use_prompt:
        raise _Problem(f"use_prompt must look like 'promptsource:NAME', got {use_prompt!r}")
    if use_prompt.split(":", 1)[0] == "promptsource" and importlib.util.find_spec("promptsource") is None:
        error = ModuleNotFoundError("No module named 'promptsource'", name="promptsource")
        raise _Problem(f"use_prompt {use_prompt}: {_reason(error)}")


@functools.cache
def _template_error(text: str) -> str | None:
    from lm_eval.utils import env

    try:
        env.from_string(text)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateSyntaxError and friends
        return one_line(exc)
    return None


# ---------------------------------------------------------------- wording


def _reason(exc: BaseException, dataset: str | None = None) -> str:
    """``problems.reason``, plus validation's own findings."""
    if isinstance(exc, _Problem):
        return one_line(exc)
    for err in causes(exc):
        if isinstance(err, _Problem):
            return one_line(err)
        if isinstance(err, _ReachedData):  # not from ``download``: from a module being imported
            return "its code loads a dataset when it is imported, so it cannot be checked without the data"
    return reason(exc, dataset)


def kind_of(library: TaskLibrary, name: str) -> str:
    """'task', 'group', 'tag', 'file' (a YAML path) or 'unknown'."""
    found = library.resolve(name)
    if found is None:
        return "file" if name.endswith((".yaml", ".yml")) else "unknown"
    return {Kind.GROUP: "group", Kind.TAG: "tag"}.get(found[0].kind, "task")


def _explain(err: TaskLoadError, requested: str, index: dict[str, Entry]) -> str:
    line = _reason(err.cause, err.dataset)
    if err.task == requested and not err.groups:
        return line

    # the failure is in a task, or in a group itself (its YAML, or its own keys)
    entry = index.get(err.task) if isinstance(err.task, str) else None
    last = "group" if entry is not None and entry.kind is Kind.GROUP else "task"
    chain = [f"group '{g}'" for g in err.groups] + [f"{last} '{err.task}'"]
    return f"{' > '.join(chain)}: {line}"


# ---------------------------------------------------------------- the factory


def _freeze(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return repr(value)


@dataclasses.dataclass(frozen=True)
class _Built:
    """A task that validated, as a group holds it."""

    task_name: str


class _ValidatingFactory(_Factory):
    """The library's factory (lm-eval's, naming the failing task) with ``class:`` tasks swapped
    for their checked subclass and each (task or group, overrides) built once per validation."""

    def __init__(self, meta: dict[str, Any] | None) -> None:
        super().__init__(meta=meta)
        self._built: dict[tuple[str, ...], Any] = {}

    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = super()._load_full_config(entry, overrides)
        cls = cfg.get("class")
        if isinstance(cls, type) and issubclass(cls, Task):
            cfg["class"] = _checked(cls)
        elif "class" in cfg:
            raise _Problem(f"class: {cls!r} is not a Task subclass")
        return cfg

    def _memo(self, key: tuple[str, ...], build: Any) -> Any:
        hit = self._built.get(key)
        if hit is None:
            try:
                hit = build()
            except TaskLoadError as exc:
                hit = exc
            self._built[key] = hit
        if isinstance(hit, TaskLoadError):
            raise TaskLoadError(hit.task, hit.cause, hit.groups, hit.dataset)
        return hit

    def _build_task(self, entry: Entry, overrides: dict[str, Any] | None) -> Any:
        name = (overrides or {}).get("task") or entry.name
        if not isinstance(name, str):
            # lm-eval takes `- group: X` with a `task:` list in a group's task list for a reference
            # to X with overrides when X is already a name; when X is a task it builds that task
            # with `task: [list]` and fails much later (unhashable type: 'list').
            raise TaskLoadError(
                entry.name,
                _Problem(
                    f"a group's task list defines a group '{entry.name}' with its own task list, but "
                    f"'{entry.name}' is already a task, so lm-eval builds that task instead; rename the group"
                ),
            )
        rest = {k: v for k, v in (overrides or {}).items() if not (k == "task" and v == entry.name)}
        key = ("task", entry.name, str(entry.yaml_path), _freeze(rest))

        def build() -> Any:
            try:
                super(_ValidatingFactory, self)._build_task(entry, overrides)
            except SystemExit as exc:  # a task's utils.py that calls sys.exit() when imported
                raise TaskLoadError(name, exc) from exc
            # the half-built task is not kept (the whole library's would take a gigabyte and
            # more); a group only needs its members' names
            return _Built(name)

        return self._memo(key, build)

    def _build_group(self, group_name: str, raw_cfg: dict[str, Any], overrides: Any, registry: Any) -> Any:
        key = ("group", group_name, _freeze(raw_cfg), _freeze(overrides or {}))
        return self._memo(
            key, lambda: super(_ValidatingFactory, self)._build_group(group_name, raw_cfg, overrides, registry)
        )

    def build(self, entry: Entry, *, overrides: dict[str, Any] | None = None, registry: dict[str, Entry]) -> Any:
        try:
            return super().build(entry, overrides=overrides, registry=registry)
        except TaskLoadError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - e.g. a group YAML that does not load
            raise TaskLoadError(entry.name, exc) from exc


# ---------------------------------------------------------------- the scope of a validation


@contextlib.contextmanager
def _scope() -> Iterator[None]:
    """Quiet, offline, and with lm-eval's factory building checked tasks; all undone on exit."""
    import datasets

    saved_task_cls = lm_factory.ConfigurableTask
    saved_load_dataset = datasets.load_dataset
    saved_disable = logging.root.manager.disable
    saved_env = os.environ.get("HF_EVALUATE_OFFLINE")
    # lmms-eval's judge tasks build their OpenAI client when imported; a key is only needed to score
    saved_key = os.environ.get("OPENAI_API_KEY")
    os.environ.setdefault("OPENAI_API_KEY", "not-needed-to-validate")
    evaluate_config = sys.modules.get("evaluate.config")
    saved_offline = getattr(evaluate_config, "HF_EVALUATE_OFFLINE", None)
    os.environ["HF_EVALUATE_OFFLINE"] = "1"
    if evaluate_config is not None:
        evaluate_config.HF_EVALUATE_OFFLINE = True
    lm_factory.ConfigurableTask = _checked(ConfigurableTask)
    datasets.load_dataset = _stop
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(saved_disable)
        datasets.load_dataset = saved_load_dataset
        lm_factory.ConfigurableTask = saved_task_cls
        if saved_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        if saved_env is None:
            os.environ.pop("HF_EVALUATE_OFFLINE", None)
        else:
            os.environ["HF_EVALUATE_OFFLINE"] = saved_env
        evaluate_config = sys.modules.get("evaluate.config")
        if evaluate_config is not None:
            evaluate_config.HF_EVALUATE_OFFLINE = (
                saved_offline
                if saved_offline is not None
                else (saved_env or "AUTO").upper() in getattr(evaluate_config, "ENV_VARS_TRUE_VALUES", ())
            )


# ---------------------------------------------------------------- the API


def validate(library: TaskLibrary, names: list[str]) -> dict[str, str | None]:
    """Each name (task, group, tag or YAML path) to None when valid, else a one-line reason.

    An unknown name's reason says so (with a did-you-mean).
    """
    install_compat()
    _evaluate_failure.cache_clear()  # an evaluate metric may have been made available since
    results: dict[str, str | None] = {}
    # Task code sees what a run's task code sees while it loads: the judge variables, pointing nowhere
    # (judge task code may build its client when imported).
    with _LOCK, _scope(), task_environment(None, None):
        factory = _ValidatingFactory(library.metadata)
        for name in names:
            results[name] = library.unknown(name) or _validate_one(factory, library, name)
    return results


def _validate_one(factory: _ValidatingFactory, library: TaskLibrary, name: str) -> str | None:
    found = library.resolve(name)
    index = found[1] if found else library.task_index
    try:
        entry = found[0] if found else TaskIndex.entry_from_path(Path(name))
        if entry is None:
            return f"{name} has neither a 'task' nor a 'group' key"
        if not isinstance(entry.name, str):
            # lm-eval 0.4.13 names an entry read from a path `task or group`: for a group file
            # that is its task list, and loading it fails later (unhashable type: 'list')
            return (
                "lm-eval cannot load a group from its YAML path (it takes the group's task list for its "
                "name); add the YAML's folder with --include-path and use the group's name"
            )
        factory.build(entry, overrides=None, registry=index)
    except TaskLoadError as exc:
        return _one_line(_explain(exc, name, index))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - e.g. a YAML path that does not parse
        return _one_line(_reason(exc))
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "invalid (no reason given)"
