"""Same numbers as lm-evaluation-harness 0.4.13 on the same task YAML, model and seed.

The reference outputs in tests/reference/lmeval-0.4.13 were produced by lm-eval itself
(tests/reference/make_lmeval_reference.py records the exact command); nothing is installed or
run from lm-eval at test time.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import (
    DEMO_TASKS,
    LOGLIKELIHOOD_TOLERANCE,
    REFERENCE,
    TINY_MODEL,
    assert_same_metrics,
    assert_same_outputs,
    model_args,
    run_evalkit,
)


def reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_prompts_and_outputs_match(reference_run, task):
    ref = reference(task)
    assert_same_outputs(ref, reference_run.docs(task))
    assert reference_run.results()["task_hashes"][task] == ref["task_hash"]


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_metrics_match(reference_run, task):
    ref = reference(task)
    assert_same_metrics(ref, reference_run.docs(task), reference_run.results()["results"][task])
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
        for want, have in zip(ref["docs"], run.docs(task), strict=False):
            assert have["arguments"] == [list(a) for a in want["arguments"]]
            assert all(
                math.isclose(a[0][0], b[0][0], abs_tol=LOGLIKELIHOOD_TOLERANCE)
                for a, b in zip(want["resps"], have["resps"], strict=True)
            )


def test_instruct_prompts_follow_lm_eval(tmp_path):
    """--apply-chat-template, --fewshot-as-multiturn, --system-instruction and --gen-kwargs as lm-eval means them."""
    from evalkit.testing.tinymodel import with_chat_template

    chat_model = with_chat_template(TINY_MODEL, tmp_path / "tiny-chat")
    args = ["--model", str(chat_model), "--device", "cpu", "--tasks", "demo_mc_fewshot,demo_gen", "--limit", "12"]
    args += ["--apply-chat-template", "--fewshot-as-multiturn", "--system-instruction", "You are a careful assistant."]
    run = run_evalkit([*args, "--gen-kwargs", "max_gen_toks=16", "--batch-size", "4"], output=tmp_path / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    for task in ("demo_mc_fewshot", "demo_gen"):
        ref = reference(f"{task}.chat")
        assert "<|system|>\nYou are a careful assistant." in ref["docs"][0]["arguments"][0][0]
        assert_same_outputs(ref, run.docs(task))
        assert_same_metrics(ref, run.docs(task), run.results()["results"][task])
