"""Stand-ins that let unchanged lm-eval tasks load and score offline with today's libraries.

:func:`install_compat` (idempotent, cheap: it imports nothing heavy) puts these in place; ``code_eval``
(evalkit.code_exec, always evalkit's own, sandboxed) is served by the same ``evaluate.load`` wrapper.

``transformers.data.metrics.squad_metrics``
    transformers 5 removed this module; about fifty lm-eval tasks (catalan_bench, galician_bench,
    spanish_bench, coqa, record, scrolls, xquad, ...) import it in their ``utils.py`` for the SQuAD
    answer scores. evalkit registers a module under that name (and its package
    ``transformers.data.metrics``) *only when the real import fails*: the finder sits at the end of
    ``sys.meta_path``, so an installed transformers 4 still provides its own. It has what the
    tasks use, with the semantics of the SQuAD v2.0 official script that transformers copied:

    * ``normalize_answer(s)``: lower-case, drop ASCII punctuation (``string.punctuation``), replace
      the whole words ``a``/``an``/``the`` by a space, collapse whitespace;
    * ``get_tokens(s)``: the normalized answer split on whitespace (``[]`` for an empty ``s``);
    * ``compute_exact(gold, pred)``: ``1`` when the normalized strings are equal, else ``0``;
    * ``compute_f1(gold, pred)``: token-level F1 over the multiset of shared tokens; when either side
      has no tokens (a no-answer), ``1`` if both have none, else ``0``; ``0`` when nothing is shared.

    Any other name of transformers' old module raises an AttributeError that says so.

``evaluate.load("rouge")``
    The evaluate package does not ship its metrics: it fetches their scripts from the Hugging Face
    Hub, so offline ``evaluate.load("rouge")`` fails (evalita-mp, galician_bench, french_bench,
    noticia, afrobench xlsum, darija summarization, the medical summarization tasks...). evalkit
    wraps ``evaluate.load`` so that for the name ``rouge`` it first asks evaluate itself (a local
    ``./rouge/rouge.py`` or a copy in evaluate's module cache still wins) and, when that fails, returns
    :class:`Rouge`, evalkit's implementation on the installed ``rouge_score`` package with the
    behaviour of HF's ``evaluate-metric/rouge``: ``compute(predictions, references,
    rouge_types=["rouge1", "rouge2", "rougeL", "rougeLsum"], use_aggregator=True, use_stemmer=False,
    tokenizer=None)``, where a reference is a string or a list of strings (the best-scoring one
    counts, ``RougeScorer.score_multi``); per type it returns the F-measure, either per sample
    (``use_aggregator=False``: lists) or aggregated as HF does, the ``mid`` of rouge_score's
    ``BootstrapAggregator`` (the median of 1000 bootstrap means, close to but not exactly the
    plain mean), under a numpy seed drawn when the metric is loaded (or ``seed=`` given to
    ``evaluate.load``) with numpy's global random state restored afterwards, as evaluate does.
    Every other metric name goes to evaluate unchanged. As with ``code_eval``
    (:mod:`evalkit.code_exec`), the wrapper is applied when ``evaluate`` is first imported, so code
    that runs ``from evaluate import load`` afterwards (evalita's ``sum_utils.py``) gets it too; a
    reference taken before :func:`install_compat` keeps the hub loader.

``lmms_eval.azure_openai_compat``
    lmms-eval 0.7.3's ``unig2u`` judge tasks import ``build_client`` and ``has_endpoint_support`` from
    this module, which its wheel does not ship. They use it only for an Azure endpoint, and only when
    ``OPENAI_API_KEY`` is unset; evalkit's judge (``--judge-base-url``) always sets that variable
    while task code loads and scores, so the OpenAI-compatible client is the one they build. The
    stand-in (registered only when the real import fails) says there is no Azure endpoint support
    (``has_endpoint_support()`` is False) and ``build_client`` raises an error saying to use
    ``--judge-base-url``.

Offline ``evaluate``
    evalkit never downloads. When ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true
    value (``1``, ``ON``, ``YES``, ``TRUE``), ``HF_EVALUATE_OFFLINE`` defaults to ``1`` as well (an
    explicit value of it is kept), so that evaluate fails at once for a metric it does not have
    locally instead of trying the hub. Without those variables nothing is changed: evaluate may try
    the hub, and ``rouge`` falls back to :class:`Rouge` once that fails.
"""

from __future__ import annotations

import collections
import functools
import importlib.abc
import importlib.util
import logging
import os
import re
import string
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "install_compat",
    "normalize_answer",
    "get_tokens",
    "compute_exact",
    "compute_f1",
    "Rouge",
    "ROUGE_TYPES",
]

log = logging.getLogger(__name__)

_TRUE = {"1", "ON", "YES", "TRUE"}
_LOCK = threading.RLock()


# ---------------------------------------------------------------- SQuAD answer scores

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, without ASCII punctuation, articles (a, an, the) or repeated whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def get_tokens(s: str) -> list[str]:
    """The normalized answer's words (none for an empty answer)."""
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    """1 when gold and prediction are equal once normalized, else 0."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token-level F1 of the prediction against the gold answer (SQuAD v2.0 semantics).

    A side without tokens is a no-answer: the score is 1 when both are, 0 when only one is."""
    gold, pred = get_tokens(a_gold), get_tokens(a_pred)
    if not gold or not pred:
        return int(gold == pred)
    shared = sum((collections.Counter(gold) & collections.Counter(pred)).values())
    if shared == 0:
        return 0
    precision, recall = shared / len(pred), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


_SQUAD_MODULE = "transformers.data.metrics.squad_metrics"
_SQUAD_PACKAGE = "transformers.data.metrics"
_SQUAD_NAMES = ("normalize_answer", "get_tokens", "compute_exact", "compute_f1")


class _StandInLoader(importlib.abc.Loader):
    """Fills the stand-in ``transformers.data.metrics`` package and its ``squad_metrics``, and
    ``lmms_eval.azure_openai_compat``."""

    def create_module(self, spec: Any) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        if module.__name__ == _AZURE_MODULE:
            module.__doc__ = "evalkit's stand-in for a module lmms-eval 0.7.3 does not ship (see evalkit.compat)."
            module.has_endpoint_support = _no_azure_endpoint
            module.build_client = _azure_client
            return
        if module.__name__ == _SQUAD_PACKAGE:
            module.__doc__ = "evalkit's stand-in for the package transformers 5 removed (see evalkit.compat)."
            return
        module.__doc__ = (
            "evalkit's stand-in for transformers' removed squad_metrics: the SQuAD v2.0 answer scores "
            "(see evalkit.compat)."
        )
        namespace = globals()
        for name in _SQUAD_NAMES:
            setattr(module, name, namespace[name])
        module.__all__ = list(_SQUAD_NAMES)

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            raise AttributeError(
                f"{_SQUAD_MODULE} is evalkit's stand-in for the module transformers 5 removed and has only "
                f"{', '.join(_SQUAD_NAMES)}; '{name}' needs transformers < 5"
            )

        module.__getattr__ = __getattr__


class _SquadMetricsFallback(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: answers for its stand-in names only when no real finder did."""

    _loader = _StandInLoader()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == _SQUAD_PACKAGE:
            return importlib.util.spec_from_loader(name, self._loader, origin="evalkit.compat", is_package=True)
        if name in (_SQUAD_MODULE, _AZURE_MODULE):
            return importlib.util.spec_from_loader(name, self._loader, origin="evalkit.compat")
        return None


_AZURE_MODULE = "lmms_eval.azure_openai_compat"


def _no_azure_endpoint() -> bool:
    return False


def _azure_client(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError(
        "this task asked for an Azure OpenAI endpoint client; evalkit sends judge calls to an "
        "OpenAI-compatible server: pass --judge-base-url URL and --judge-model NAME"
    )


def _install_squad_metrics() -> None:
    with _LOCK:
        if not any(isinstance(f, _SquadMetricsFallback) for f in sys.meta_path):
            sys.meta_path.append(_SquadMetricsFallback())


# ---------------------------------------------------------------- ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ROUGE_NAMES = ("rouge", "evaluate-metric/rouge")


def _numpy_seed() -> int:
    """The seed evaluate gives a metric loaded without one: a word of numpy's current global state."""
    import numpy as np

    _, words, position, *_ = np.random.get_state()
    return int(words[position] if position < 624 else words[0])


class _FunctionTokenizer:
    """A plain ``text -> tokens`` function as a rouge_score tokenizer (HF's ``tokenizer=`` argument)."""

    def __init__(self, function: Callable[[str], list[str]]) -> None:
        self.function = function

    def tokenize(self, text: str) -> list[str]:
        return self.function(text)


def _listed(values: Any, what: str) -> list[Any]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"rouge: {what} must be a list, got {type(values).__name__}")
    return list(values)


class Rouge:
    """What ``evaluate.load("rouge")`` returns when evaluate cannot load its own (see the module doc)."""

    name = "rouge"
    module_type = "metric"
    description = "ROUGE F-measures on rouge_score, evalkit's offline stand-in for evaluate-metric/rouge"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = _numpy_seed() if seed is None else int(seed)
        self._predictions: list[Any] = []
        self._references: list[Any] = []

    def add_batch(self, *, predictions: Sequence[str] = (), references: Sequence[Any] = ()) -> None:
        predictions, references = _listed(predictions, "predictions"), _listed(references, "references")
        if len(predictions) != len(references):
            raise ValueError(
                f"Mismatch in the number of predictions ({len(predictions)}) and references ({len(references)})"
            )
        self._predictions.extend(predictions)
        self._references.extend(references)

    def add(self, *, prediction: str, reference: Any) -> None:
        self.add_batch(predictions=[prediction], references=[reference])

    def compute(
        self,
        *,
        predictions: Sequence[str] | None = None,
        references: Sequence[Any] | None = None,
        rouge_types: Sequence[str] | None = None,
        use_aggregator: bool = True,
        use_stemmer: bool = False,
        tokenizer: Callable[[str], list[str]] | None = None,
    ) -> dict[str, Any]:
        """F-measure per ROUGE type: the bootstrap ``mid`` over samples, or per-sample lists.

        As with evaluate, inputs given here are added to those of ``add``/``add_batch``, and all of
        them are used and then forgotten."""
        if predictions is not None or references is not None:
            self.add_batch(
                predictions=[] if predictions is None else predictions,
                references=[] if references is None else references,
            )
        predictions, references = self._predictions, self._references
        self._predictions, self._references = [], []
        return self._score(predictions, references, rouge_types, use_aggregator, use_stemmer, tokenizer)

    def _score(
        self,
        predictions: list[Any],
        references: list[Any],
        rouge_types: Sequence[str] | None,
        use_aggregator: bool,
        use_stemmer: bool,
        tokenizer: Callable[[str], list[str]] | None,
    ) -> dict[str, Any]:
        from rouge_score import rouge_scorer, scoring

        types = list(ROUGE_TYPES if rouge_types is None else rouge_types)
        multi = bool(references) and not isinstance(references[0], str)
        for prediction, reference in zip(predictions, references, strict=True):
            refs = reference if multi else [reference]
            if not isinstance(prediction, str) or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
                kind = "lists of strings" if multi else "strings"
                raise TypeError(f"rouge: predictions must be strings and references {kind}")
        scorer = rouge_scorer.RougeScorer(
            rouge_types=types,
            use_stemmer=use_stemmer,
            tokenizer=_FunctionTokenizer(tokenizer) if tokenizer is not None else None,
        )
        samples = [
            scorer.score_multi(list(ref), pred) if multi else scorer.score(ref, pred)
            for pred, ref in zip(predictions, references, strict=True)
        ]
        if not use_aggregator:
            return {t: [sample[t].fmeasure for sample in samples] for t in (samples[0] if samples else types)}
        aggregator = scoring.BootstrapAggregator()
        for sample in samples:
            aggregator.add_scores(sample)
        with _numpy_seeded(self.seed):
            aggregated = aggregator.aggregate()
        return {t: score.mid.fmeasure for t, score in aggregated.items()}

    def __repr__(self) -> str:
        return "Rouge(evalkit, rouge_score)"


class _numpy_seeded:  # noqa: N801 - used as a context manager
    """numpy's global generator seeded for the block and restored after it (evaluate's ``temp_seed``)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        import numpy as np

        _LOCK.acquire()
        self.saved = np.random.get_state()
        np.random.seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        import numpy as np

        try:
            np.random.set_state(self.saved)
        finally:
            _LOCK.release()


_told: set[str] = set()


def _load_rouge(failure: BaseException, module_type: str | None, init_kwargs: dict[str, Any]) -> Rouge:
    if module_type not in (None, "metric"):
        raise failure
    try:
        import rouge_score.rouge_scorer  # noqa: F401 - fail here, naming the package, not at compute
    except ImportError as exc:
        raise exc from failure
    if "rouge" not in _told:
        _told.add("rouge")
        log.info(
            "evaluate cannot load the metric 'rouge' (%s: %s); using evalkit's implementation on rouge_score",
            type(failure).__name__,
            " ".join(str(failure).split())[:200],
        )
    return Rouge(seed=init_kwargs.get("seed"))


def _patch_evaluate(evaluate: Any) -> None:
    """Wrap ``evaluate.load`` (once): ``code_eval`` is always evalkit's sandboxed implementation
    (evalkit.code_exec), ``rouge`` falls back to :class:`Rouge`, every other name is untouched."""
    with _LOCK:
        current = evaluate.load
        if getattr(current, "_evalkit_compat", False):
            return

        @functools.wraps(current)
        def load(path: Any, *args: Any, **kwargs: Any) -> Any:
            if path == "code_eval":
                from evalkit.code_exec import CodeEval

                return CodeEval()
            if path not in _ROUGE_NAMES:
                return current(path, *args, **kwargs)
            try:
                return current(path, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - not loadable here, whatever the reason
                module_type = kwargs.get("module_type", args[1] if len(args) > 1 else None)
                return _load_rouge(exc, module_type, kwargs)

        load._evalkit_compat = True  # type: ignore[attr-defined]
        evaluate.load = load


class _PatchEvaluateWhenImported(importlib.abc.MetaPathFinder):
    """Patches ``evaluate`` right after its first import (which costs seconds, so it is not forced).

    It asks the other finders for the real spec and wraps that spec's loader; the guard makes a
    finder that asks this one in turn get None, instead of the two asking each other forever."""

    _busy = threading.local()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "evaluate" or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.active = False
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _patch_evaluate(module)

        loader.exec_module = exec_module  # this loader instance belongs to this spec only
        return spec


def _install_evaluate_stand_ins() -> None:
    module = sys.modules.get("evaluate")
    if module is None:
        with _LOCK:
            if not any(isinstance(f, _PatchEvaluateWhenImported) for f in sys.meta_path):
                sys.meta_path.insert(0, _PatchEvaluateWhenImported())
        module = sys.modules.get("evaluate")  # imported by another thread meanwhile
    if module is not None and hasattr(module, "load"):
        _patch_evaluate(module)


# ---------------------------------------------------------------- offline evaluate


def _is_true(variable: str) -> bool:
    return os.environ.get(variable, "").strip().upper() in _TRUE


def _evaluate_offline() -> None:
    """``HF_EVALUATE_OFFLINE=1`` when the hub or datasets are offline and it is not set already."""
    if "HF_EVALUATE_OFFLINE" in os.environ:
        return
    if not (_is_true("HF_HUB_OFFLINE") or _is_true("HF_DATASETS_OFFLINE")):
        return
    os.environ["HF_EVALUATE_OFFLINE"] = "1"
    config = sys.modules.get("evaluate.config")  # read at import: already imported, so set it there too
    if config is not None:
        config.HF_EVALUATE_OFFLINE = True


# ---------------------------------------------------------------- the API


def install_compat() -> None:
    """Put the stand-ins described in the module doc in place. Idempotent and cheap; every process
    that loads lm-eval tasks (ranks' rank 0, the sandbox, ``tasks validate``) calls it."""
    _evaluate_offline()
    _install_squad_metrics()
    _install_evaluate_stand_ins()
