"""Same numbers as lm-evaluation-harness 0.4.13 on the same task YAML, model and seed.

The reference outputs in tests/reference/lmeval-0.4.13 were produced by lm-eval itself
(tests/reference/make_lmeval_reference.py records the exact command); nothing is installed or
run from lm-eval at test time.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import DEMO_TASKS, REFERENCE, model_args, run_evalkit

LOGLIKELIHOOD_TOLERANCE = 1e-4
ROLLING_TOLERANCE = 1e-3


def reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_prompts_and_requests_are_byte_identical(reference_run, task):
    ref = reference(task)
    ours = reference_run.samples(task)
    assert len(ours) == len(ref["docs"])
    for want, have in zip(ref["docs"], ours, strict=True):
        assert have["doc_id"] == want["doc_id"]
        assert have["arguments"] == [list(a) for a in want["arguments"]]
        for key in ("doc_hash", "prompt_hash", "target_hash"):
            assert have[key] == want[key], key
    assert reference_run.results()["task_hashes"][task] == ref["task_hash"]


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_model_outputs_match(reference_run, task):
    ref = reference(task)
    for want, have in zip(ref["docs"], reference_run.samples(task), strict=True):
        raw = [resp[0] for resp in want["resps"]]
        if "loglikelihoods" in have:
            assert have["is_greedy"] == [greedy for _, greedy in raw]
            for (ll, _), ours in zip(raw, have["loglikelihoods"], strict=True):
                assert abs(ll - ours) <= LOGLIKELIHOOD_TOLERANCE
        elif "loglikelihood" in have:
            assert abs(raw[0] - have["loglikelihood"]) <= ROLLING_TOLERANCE
        else:
            assert have["response"] == raw[0]
            assert have["filtered_resps"] == {name: values for name, values in want["filtered_resps"].items()}


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_metrics_match(reference_run, task):
    ref = reference(task)
    for want, have in zip(ref["docs"], reference_run.samples(task), strict=True):
        expected = {f"{m},{f}": v for f, values in want["metrics"].items() for m, v in values.items()}
        assert have["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, list):  # (loglikelihood, words or bytes)
                assert have["metrics"][key][1] == value[1]
                assert abs(have["metrics"][key][0] - value[0]) <= ROLLING_TOLERANCE
            elif key.startswith("perplexity"):
                assert abs(have["metrics"][key] - value) <= LOGLIKELIHOOD_TOLERANCE
            else:
                assert have["metrics"][key] == value
    ours = reference_run.results()["results"][task]
    assert list(ours) == list(ref["results"])
    for key, value in ref["results"].items():
        if isinstance(value, float) and ("perplexity" in key or "bits_per_byte" in key):
            assert ours[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert ours[key] == value, key
    assert reference_run.results()["n-shot"][task] == ref["n-shot"]


def test_num_fewshot_override_follows_lm_eval(tmp_path):
    """--num-fewshot 1 changes demo_mc_fewshot, while demo_mc keeps the 0 its YAML sets."""
    run = run_evalkit(
        model_args("--tasks", "demo_mc,demo_mc_fewshot", "--num-fewshot", "1", "--limit", "12"), output=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for task in ("demo_mc", "demo_mc_fewshot"):
        ref = reference(f"{task}.numfewshot1")
        assert run.results()["n-shot"][task] == ref["n-shot"]
        # The reference covers every doc; this run stops at --limit.
        for want, have in zip(ref["docs"], run.samples(task), strict=False):
            assert have["arguments"] == [list(a) for a in want["arguments"]]
            assert all(
                math.isclose(a[0][0], b, abs_tol=LOGLIKELIHOOD_TOLERANCE)
                for a, b in zip(want["resps"], have["loglikelihoods"], strict=True)
            )
