"""Which tasks score their answers through an LLM judge.

lmms-eval's judge tasks call an OpenAI-compatible API from their scoring code (``process_results``
or an aggregation): through ``lmms_eval.llm_judge`` or its ``OpenAIVerifier``, the ``openai``
client, or ``requests.post`` to ``OPENAI_API_URL``. A task is a judge task when such a call can be
reached from its scoring functions: every global name their code uses is followed, through the
task's own code (functions, classes and instances defined in task files), until it reaches a judge
client. Only the scoring functions (filters included: mix_evals' multiple-choice filter asks the
judge for the chosen option) count, so ``mmmu_val`` (rule-based) is not a judge task while
``mmmu_val_reasoning`` (an ``OpenAIVerifier``) is, though both live in one ``utils.py``.
"""

from __future__ import annotations

import inspect
import sysconfig
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Modules whose objects, reached from scoring code, call a judge over HTTP.
JUDGE_CLIENTS = (
    "openai",
    "requests",
    "httpx",
    "aiohttp",
    "lmms_eval.llm_judge",
    "lmms_eval.verifiers.openai",
    "lmms_eval.verifiers.gemini",
)
# Scoring functions that reach a judge client's code but never call it, and why (the static analysis
# above cannot see a branch taken on an argument's value).
RULE_BASED = {
    "mmbench_aggregate_dev_results_static": "passes eval_method='static': MMBench_Evaluator extracts the "
    "option letter by rules and never calls its judge",
}
# Task code lives here, or anywhere outside the installed libraries (an --include-path folder).
TASK_FOLDERS = ("lmms_eval/tasks/", "lm_eval/tasks/")
LIBRARY_ROOTS = tuple(
    str(Path(p).resolve()) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]}
)


def judge_tasks(tasks: Mapping[str, Any]) -> list[str]:
    """The names of the lm-eval task objects among ``tasks`` whose scoring calls a judge."""
    return sorted(name for name, task in tasks.items() if needs_judge(task))


def needs_judge(task: Any) -> bool:
    seen: set[int] = set()
    return any(_reaches_judge(fn, seen) for fn in scoring_functions(task) if _name(fn) not in RULE_BASED)


def _name(fn: Any) -> str:
    return getattr(inspect.unwrap(fn), "__name__", "")


def scoring_functions(task: Any) -> Iterator[Any]:
    """The task's own code that runs at scoring: its filters, process_results and aggregations."""
    for ensemble in getattr(task, "_filters", None) or ():
        # each step is a partial of its filter class, instantiated when the pipeline runs
        yield from (getattr(step, "func", step) for step in getattr(ensemble, "filters", None) or ())
    config = getattr(task, "config", None)
    process = getattr(config, "process_results", None)
    if callable(process):
        yield process
    aggregations = getattr(task, "_aggregation_list", None) or {}
    yield from (fn for fn in aggregations.values() if callable(fn))


def _is_task_code(filename: str | None) -> bool:
    if not filename:
        return False
    path = str(Path(filename).resolve())
    if any(folder in path.replace("\\", "/") for folder in TASK_FOLDERS):
        return True
    return not path.startswith(LIBRARY_ROOTS)


def _module_of(value: Any) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return getattr(value, "__module__", None) or ""
    return type(value).__module__ or ""


def _is_judge_client(value: Any) -> bool:
    module = _module_of(value)
    return any(module == m or module.startswith(m + ".") for m in JUDGE_CLIENTS)


def _reaches_judge(value: Any, seen: set[int]) -> bool:
    """Whether ``value`` is a judge client or task code that uses one, at any depth."""
    return next(_clients(value, seen), None) is not None


def _clients(value: Any, seen: set[int]) -> Iterator[Any]:
    """The judge clients (objects, classes, functions or modules of ``JUDGE_CLIENTS``) that
    ``value`` is or that task code reaches from it, at any depth, each once."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if _is_judge_client(value):
        yield value
        return
    value = inspect.unwrap(value) if callable(value) else value
    if isinstance(value, types.MethodType):
        value = value.__func__
    if isinstance(value, types.FunctionType):
        if _is_task_code(value.__code__.co_filename):
            for used in _globals_used(value):
                yield from _clients(used, seen)
        return
    cls = value if isinstance(value, type) else type(value)
    if not _is_task_code(_source_file(cls)):
        return
    members = [inspect.getattr_static(cls, name) for name in vars(cls)]
    members = [m.__func__ if isinstance(m, (staticmethod, classmethod)) else m for m in members]
    attributes = list(vars(value).values()) if not isinstance(value, type) and hasattr(value, "__dict__") else []
    for member in members + attributes:
        if member is not None:
            yield from _clients(member, seen)


def aim_clients(tasks: Mapping[str, Any], base_url: str, api_key: str) -> int:
    """Point every OpenAI client object that the tasks' scoring code holds at ``base_url`` (the
    judge proxy) with ``api_key``: task code that built its client with an address of its own
    (phyx's is api.deepseek.com) then asks the judge as every other judge task does. Returns how
    many clients were pointed."""
    try:
        from openai import AsyncOpenAI, OpenAI
    except ImportError:  # no openai package: task code cannot have built such a client
        return 0
    seen: set[int] = set()
    found = [
        client
        for task in tasks.values()
        for fn in scoring_functions(task)
        for client in _clients(fn, seen)
        if isinstance(client, (OpenAI, AsyncOpenAI))
    ]
    for client in found:
        client.base_url = base_url
        client.api_key = api_key
    return len(found)


def _source_file(cls: type) -> str | None:
    """Where a class is defined: its methods' file (lm-eval imports task files under names that
    are not in sys.modules, so ``inspect`` cannot find them), else inspect's answer."""
    for member in vars(cls).values():
        if isinstance(member, types.FunctionType):
            return member.__code__.co_filename
    try:
        return inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None


def _globals_used(fn: types.FunctionType) -> Iterator[Any]:
    """The values of the global names ``fn`` (and the functions nested in it) refer to."""
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        for name in code.co_names:
            if name in fn.__globals__:
                yield fn.__globals__[name]
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    for cell in fn.__closure__ or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell
            continue
