"""Why a task cannot load, in one line that says what to do.

lm-eval raises whatever its task code raises (an ImportError from a task's utils.py, a
ConnectionError from ``datasets`` when a hub dataset is not available offline, a
FileNotFoundError from ``evaluate`` for a metric it would fetch from the hub). These are
turned into one line naming the task (and its group) and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from evalkit.errors import one_line

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


def reason(exc: BaseException, dataset: str | None = None) -> str:
    """What is wrong and how to fix it, for one task."""
    package = missing_package(exc)
    if package:
        return f"needs the Python package '{package}', which is not installed (pip install {package})"
    text = one_line(exc)
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
            f"dataset {where} is not available offline: it is not a local folder of that name under the working "
            f"folder and not in the Hugging Face datasets cache; download it where the hub is reachable and put it "
            f"in ./{path}/ (or set dataset_kwargs.data_files)"
        )
    return f"{type(exc).__name__}: {text[:300]}"


def explain(err: TaskLoadError) -> str:
    where = " > ".join([f"group '{g}'" for g in err.groups] + [f"task '{err.task}'"])
    return f"{where}: {reason(err.cause, err.dataset)}"
