"""Metrics, aggregations and standard errors, computed the way lm-eval 0.4.13 computes them.

A metric turns one doc's outputs into a per-doc value; an aggregation turns the per-doc values
into the task's number; a standard error comes either from the closed form for a mean or from
lm-eval's seeded bootstrap (reproduced exactly, vectorised).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from evalkit.registry import Registry

AGGREGATIONS: Registry[Callable[[list], float]] = Registry("aggregation")


@AGGREGATIONS.register("mean")
def mean(values: list) -> float:
    return sum(values) / len(values)


@AGGREGATIONS.register("median")
def median(values: list) -> float:
    return values[len(values) // 2]


@AGGREGATIONS.register("perplexity")
def perplexity(values: list) -> float:
    return math.exp(-mean(values))


@AGGREGATIONS.register("weighted_perplexity")
def weighted_perplexity(values: list) -> float:
    return math.exp(-_weighted_mean(values))


@AGGREGATIONS.register("bits_per_byte")
def bits_per_byte(values: list) -> float:
    return -_weighted_mean(values) / math.log(2)


def _weighted_mean(pairs: list) -> float:
    loglikelihoods, weights = zip(*pairs, strict=True)
    return sum(loglikelihoods) / sum(weights)


@dataclass(frozen=True)
class MetricInfo:
    aggregation: str
    higher_is_better: bool


# Defaults for each metric name, as lm-eval registers them.
METRICS: Registry[MetricInfo] = Registry("metric")
for _name, _agg, _hib in [
    ("acc", "mean", True),
    ("acc_norm", "mean", True),
    ("exact_match", "mean", True),
    ("perplexity", "perplexity", False),
    ("word_perplexity", "weighted_perplexity", False),
    ("byte_perplexity", "weighted_perplexity", False),
    ("bits_per_byte", "bits_per_byte", False),
]:
    METRICS.register(_name)(MetricInfo(_agg, _hib))


def exact_match(
    prediction: str,
    reference: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    regexes_to_ignore: Sequence[str] | None = None,
) -> float:
    """1.0 when prediction equals reference after the requested normalisations."""
    for pattern in regexes_to_ignore or ():
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def sample_stddev(values: Sequence[float]) -> float:
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float:
    return sample_stddev(values) / math.sqrt(len(values))


BOOTSTRAP_CHUNK = 1000


def bootstrap_stderr(aggregate: Callable[[list], float], values: list, iters: int) -> float:
    """lm-eval's bootstrap: chunk i of 1000 resamples draws from ``random.Random(i)``.

    Python's ``Random(i).choices`` takes ``floor(random() * n)`` per draw. NumPy's legacy
    generator is the same Mersenne Twister with the same ``random()`` construction, so loading
    Python's seeded state into it yields the same resamples without a Python loop per draw.
    """
    n = len(values)
    chunk = min(BOOTSTRAP_CHUNK, iters)
    stats = []
    array = np.asarray(values, dtype=object)
    for i in range(iters // chunk):
        rng = _numpy_twin(random.Random(i))
        picks = np.floor(rng.random_sample((chunk, n)) * n).astype(np.int64)
        if aggregate is perplexity:
            floats = np.asarray(values, dtype=np.float64)
            stats.extend(math.exp(-float(m)) for m in _row_means(floats[picks]))
        else:
            stats.extend(aggregate(list(array[row])) for row in picks)
    return sample_stddev(stats)


def _numpy_twin(python_rng: random.Random) -> np.random.RandomState:
    _, internal, _ = python_rng.getstate()
    twin = np.random.RandomState()
    twin.set_state(("MT19937", np.array(internal[:-1], dtype=np.uint32), internal[-1]))
    return twin


def _row_means(matrix: np.ndarray) -> list[float]:
    # Sum left to right like Python's sum(), so every resample's mean is bit-identical.
    total = np.zeros(matrix.shape[0], dtype=np.float64)
    for column in range(matrix.shape[1]):
        total = total + matrix[:, column]
    return list(total / matrix.shape[1])


BOOTSTRAPPED = ("median", "perplexity")


def stderr(aggregation: str, values: list, bootstrap_iters: int) -> float | str:
    """The standard error lm-eval reports for an aggregation, or "N/A" where it reports none."""
    if len(values) < 2:
        return "N/A"
    if aggregation == "mean":
        return mean_stderr(values)
    if aggregation in BOOTSTRAPPED and bootstrap_iters > 0:
        return bootstrap_stderr(AGGREGATIONS.get(aggregation), values, bootstrap_iters)
    return "N/A"
