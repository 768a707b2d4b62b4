"""Why a task cannot load, in one line that says what to do.

lm-eval raises whatever its task code raises (an ImportError from a task's utils.py, a
ConnectionError from ``datasets`` when a hub dataset is not available offline, a
FileNotFoundError from ``evaluate`` for a metric it would fetch from the hub, a SystemExit from a
utils.py that gives up when imported). These are turned into one line naming the task (and its
group) and the fix. Import problems are told apart: a package that is not installed (pip install
it), and an installed package that lacks a module or a name the task imports (the task was written
for another version of that package).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import re
import shlex
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
    "math_verify": "math-verify[antlr4_11_0]",
    "sentencepiece": "sentencepiece",
    "google": "protobuf",
    "tinyBenchmarks": "git+https://github.com/felipemaiapolo/tinyBenchmarks",
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


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _pip_spec(top: str) -> str:
    """What to ``pip install`` for the import name ``top``."""
    return PIP_NAMES.get(top, top.replace("_", "-"))


def _package_name(top: str) -> str:
    """The package's name as the user knows it: its PyPI name, without extras; a package installed
    from a URL goes by its import name."""
    spec = _pip_spec(top)
    return top if "://" in spec else spec.split("[", 1)[0]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _provides(top: str, path: str | None) -> bool:
    """Whether the installed package ``top`` is where the module at ``path`` comes from (and not,
    say, a task's own ``utils.py`` that happens to share a name with something installed)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not path:
        return True
    path = os.path.realpath(path)
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        return os.path.realpath(spec.origin) == path
    return any(path.startswith(os.path.join(os.path.realpath(root), "")) for root in roots)


@functools.cache
def _version(top: str) -> str | None:
    """The installed version of the distribution that provides the import name ``top``."""
    names = [top, _package_name(top)]
    try:
        names += importlib.metadata.packages_distributions().get(top, [])
    except Exception:  # noqa: BLE001 - a broken distribution's metadata
        pass
    for name in names:
        try:
            return importlib.metadata.version(name)
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return None


def _installed_package(top: str) -> str | None:
    """'transformers 5.0.0' for an installed package (None when it is not a known installed one)."""
    version = _version(top)
    return f"{top} {version}" if version else None


_CANNOT_IMPORT = re.compile(r"cannot import name '([^']+)' from '([^']+)'")


def _import_problem(exc: BaseException) -> str | None:
    """A package that is not installed, or an installed one without what the task imports."""
    for err in causes(exc):
        if not isinstance(err, ImportError):
            continue
        if isinstance(err, ModuleNotFoundError) and err.name:
            top = err.name.split(".")[0]
            if top == "evalkit":
                continue
            if "." in err.name and _installed(top):
                installed = _installed_package(top) or top
                return f"the installed {installed} has no module {err.name} (a version mismatch)"
            if top == "lm_eval":
                continue
            spec = _pip_spec(top)
            return (
                f"needs the Python package '{_package_name(top)}', which is not installed "
                f"(pip install {shlex.quote(spec)})"
            )
        found = _CANNOT_IMPORT.search(one_line(err))
        if found:
            name, module = found.groups()
            top = module.split(".")[0]
            installed = _installed_package(top) if top != "evalkit" and _provides(top, err.path) else None
            if installed:
                what = name if module == top else f"{module}.{name}"
                return f"the installed {installed} has no {what} (a version mismatch)"
    return None


def _system_exit(exc: BaseException) -> SystemExit | None:
    for err in causes(exc):
        if isinstance(err, SystemExit):
            return err
    return None


def _exit_message(exc: SystemExit) -> str:
    code = exc.code
    if code is None:
        return "sys.exit()"
    if isinstance(code, int):
        return f"sys.exit({code})"
    return " ".join(str(code).split()) or "sys.exit()"


_ALREADY_REGISTERED = re.compile(r"'(\w+)' alias '([^']+)' already registered")


def _registered_twice(exc: BaseException) -> str | None:
    """lm-eval's registries are per process: two task folders registering one name collide."""
    for err in causes(exc):
        found = _ALREADY_REGISTERED.search(one_line(err))
        if not found:
            continue
        kind, alias = found.groups()
        modules = []
        for local in ("current", "target"):
            value = _frame_value(err, local, lambda v: True)
            module = value.split(":", 1)[0] if isinstance(value, str) else getattr(value, "__module__", None)
            if isinstance(module, str) and module not in modules:
                modules.append(module)
        where = f" ({' and '.join(modules)})" if len(modules) == 2 else ""
        return (
            f"two task folders register the same {kind} name '{alias}'{where}, and lm-eval keeps one registry "
            f"per process, so their tasks cannot be loaded in one run; evaluate them in separate runs"
        )
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


def _fewshot_config_fields() -> list[str]:
    from lm_eval.config.task import FewshotConfig

    return [f.name for f in dataclasses.fields(FewshotConfig)]


def reason(exc: BaseException, dataset: str | None = None) -> str:
    """What is wrong and how to fix it, for one task."""
    problem = _import_problem(exc)
    if problem:
        return problem
    exit_ = _system_exit(exc)
    if exit_ is not None:
        return f"the task's code exits when imported: {_exit_message(exit_)}"
    text = one_line(exc)
    unknown = re.search(r"TaskConfig.__init__\(\) got an unexpected keyword argument '([^']+)'", text)
    if unknown:
        return f"unknown key '{unknown.group(1)}'{did_you_mean(unknown.group(1), _task_config_fields())}"
    unknown = re.search(r"FewshotConfig.__init__\(\) got an unexpected keyword argument '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        return f"fewshot_config: unknown key '{key}'{did_you_mean(key, _fewshot_config_fields())}"
    registered = _registered_twice(exc)
    if registered:
        return registered
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
            f"folder, then beside the task's YAML, and for lmms-eval's tasks above its package)"
        )
    if isinstance(exc, StopIteration) or "Expected at least one" in text:
        return "the dataset is empty (an empty data file?); the task has no docs to evaluate"
    metric = re.search(
        r"Couldn't find a module script at \S+\. Module '([^']+)' doesn't exist on the Hugging Face Hub", text
    )
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


def dataset_label(config: dict[str, Any]) -> str | None:
    """ "path" or "path:config" of a task config's dataset, the form ``TaskLoadError.dataset`` takes."""
    path, name = config.get("dataset_path"), config.get("dataset_name")
    return f"{path}:{name}" if path and name else path


def explain(err: TaskLoadError) -> str:
    where = " > ".join([f"group '{g}'" for g in err.groups] + [f"task '{err.task}'"])
    return f"{where}: {reason(err.cause, err.dataset)}"
