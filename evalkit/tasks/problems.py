"""Why a task cannot load, in one line that says what to do.

lm-eval raises whatever its task code raises (an ImportError from a task's utils.py, a
ConnectionError from ``datasets`` when a hub dataset is not available offline, a
FileNotFoundError from ``evaluate`` for a metric it would fetch from the hub). These are
turned into one line naming the task (and its group) and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from evalkit.errors import did_you_mean, one_line

# Import names whose PyPI distribution is called something else.
PIP_NAMES = {
    "sklearn": "scikit-learn",
    "rouge_score": "rouge-score",
    "antlr4": "antlr4-python3-runtime",
    "Levenshtein": "python-Levenshtein",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "cv2": "opencv-python",
    "attr": "attrs",
    "bs4": "beautifulsoup4",
    "fuzzywuzzy": "fuzzywuzzy",
    "pythainlp": "pythainlp",
    "jieba": "jieba",
    "math_verify": "math-verify",
    "sentencepiece": "sentencepiece",
    "google": "protobuf",
}


@dataclass
class TaskLoadError(Exception):
    """A task (or group) that lm-eval could not build, with the groups it sits in."""

    task: str
    cause: BaseException
    groups: tuple[str, ...] = ()
    # "path" or "path:config" of the task's dataset, to word a data error.
    dataset: str | None = None

    def inside(self, group: str) -> TaskLoadError:
        if group == self.task or group in self.groups:
            return self
        return TaskLoadError(self.task, self.cause, (group, *self.groups), self.dataset)

    def __str__(self) -> str:
        return explain(self)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def missing_package(exc: BaseException) -> str | None:
    """The PyPI name of the package whose import failed, if that is what happened."""
    for err in _chain(exc):
        if isinstance(err, ModuleNotFoundError) and err.name:
            top = err.name.split(".")[0]
            if top not in ("lm_eval", "evalkit"):
                return PIP_NAMES.get(top, top.replace("_", "-"))
    return None


def _frame_value(exc: BaseException, name: str, accept: Callable[[Any], bool]) -> Any:
    """A local variable of the innermost frame that has one, to word an error (e.g. the doc being read)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get(name)
        if value is not None and accept(value):
            found = value
        tb = tb.tb_next
    return found


def _task_config_fields() -> list[str]:
    from lm_eval.config.task import TaskConfig

    return [f.name for f in dataclasses.fields(TaskConfig)]


def reason(exc: BaseException, dataset: str | None = None) -> str:
    """What is wrong and how to fix it, for one task."""
    package = missing_package(exc)
    if package:
        return f"needs the Python package '{package}', which is not installed (pip install {package})"
    text = one_line(exc)
    unknown = re.search(r"TaskConfig.__init__\(\) got an unexpected keyword argument '([^']+)'", text)
    if unknown:
        return f"unknown key '{unknown.group(1)}'{did_you_mean(unknown.group(1), _task_config_fields())}"
    if isinstance(exc, KeyError):
        task = _frame_value(exc, "self", lambda v: hasattr(v, "dataset") and hasattr(v.dataset, "keys"))
        if task is not None and exc.args and exc.args[0] not in task.dataset:
            return f"split '{exc.args[0]}' does not exist; the dataset has: {', '.join(task.dataset)}"
    if type(exc).__name__ == "UndefinedError":
        doc = _frame_value(exc, "doc", lambda v: isinstance(v, dict))
        fields = f"; doc fields are: {', '.join(doc)}" if doc else ""
        return f"a template uses a field the doc lacks ({text}){fields}"
    missing_file = re.match(r"Unable to find '([^']+)'", text)
    if isinstance(exc, FileNotFoundError) and missing_file:
        return (
            f"data file '{missing_file.group(1)}' not found (relative data_files are looked up in the working "
            f"folder, then beside the task's YAML)"
        )
    if isinstance(exc, StopIteration) or "Expected at least one" in text:
        return "the dataset is empty (an empty data file?); the task has no docs to evaluate"
    metric = re.search(r"Couldn't find a module script at \S+\. Module '([^']+)' doesn't exist on the Hugging Face Hub", text)
    if metric:
        name = metric.group(1)
        return (
            f"needs the evaluate metric '{name}', which the evaluate package fetches from the Hugging Face Hub "
            f"and which is not in its local module cache; load it once where the hub is reachable "
            f"(python -c \"import evaluate; evaluate.load('{name}')\") and copy HF_HOME/modules here"
        )
    if re.search(r"Couldn't reach '([^']+)' on the Hub|OfflineModeIsEnabled|Dataset '[^']+' doesn't exist", text):
        path, _, config = (dataset or "<dataset_path>").partition(":")
        where = f"'{path}'" + (f" (config '{config}')" if config else "")
        return (
            f"dataset {where} is not available offline: there is no local copy in ./{path}/ (where load_dataset "
            f"looks from the working folder) or in the Hugging Face datasets cache, and the Hugging Face Hub is not "
            f"reachable; download it where the hub is reachable and put the local copy in ./{path}/ "
            f"(or point dataset_kwargs.data_files at local files)"
        )
    return f"{type(exc).__name__}: {text[:300]}"


def explain(err: TaskLoadError) -> str:
    where = " > ".join([f"group '{g}'" for g in err.groups] + [f"task '{err.task}'"])
    return f"{where}: {reason(err.cause, err.dataset)}"
