"""Tensor parallel and hybrid TP x DP give the single-process numbers, with the model really sharded.

Real runs on CPU with gloo: DeepSpeed AutoTP at tp=2, tp=2 x dp=2 on 4 processes, and
transformers' own TP at tp=2. Every task kind: multiple choice, generation, rolling loglikelihood.
"""

from __future__ import annotations

import pytest

from conftest import Run, assert_same_docs, model_args, run_evalkit

pytestmark = pytest.mark.multiprocess

TASKS = "demo_mc,demo_mc_fewshot,demo_gen,demo_ppl"
LIMIT = "10"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Run:
    run = run_evalkit(model_args("--tasks", TASKS, "--limit", LIMIT), output=tmp_path_factory.mktemp("ws1"))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(
    scope="module",
    params=[("deepspeed", 2, 2), ("deepspeed", 4, 2), ("transformers", 2, 2)],
    ids=lambda p: f"{p[0]}-world{p[1]}-tp{p[2]}",
)
def tp_run(request, tmp_path_factory) -> tuple[tuple, Run]:
    backend, nproc, tp = request.param
    run = run_evalkit(
        model_args("--tasks", TASKS, "--limit", LIMIT, "--tp", str(tp), "--tp-backend", backend, "--batch-size", "4"),
        launcher="torchrun",
        nproc=nproc,
        output=tmp_path_factory.mktemp(f"{backend}{nproc}"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return request.param, run


def test_layout_is_recorded(tp_run):
    (backend, nproc, tp), run = tp_run
    assert run.results()["parallel"] == {
        "world_size": nproc,
        "dp": nproc // tp,
        "tp": tp,
        "placement": backend,
        "gpus_per_rank": 1,
        "backend": "gloo",
        "device": "cpu",
    }
    carriers = run.results()["throughput"]["per_rank"]
    assert sorted(r["rank"] for r in carriers) == list(range(0, nproc, tp)), "tp rank 0 of each group carries"


def test_each_rank_holds_only_its_shard(tp_run, single_process):
    (_, nproc, tp), run = tp_run
    full = single_process.results()["parameters_per_rank"]["0"]
    per_rank = run.results()["parameters_per_rank"]
    assert sorted(per_rank) == [str(r) for r in range(nproc)]
    for count in per_rank.values():
        assert full / tp <= count < full * 0.75, (count, full)


@pytest.mark.parametrize("task", TASKS.split(","))
def test_same_outputs_as_one_process(tp_run, single_process, task):
    _, run = tp_run
    assert_same_docs(single_process.docs(task), run.docs(task), TOLERANCE)
    ours, theirs = run.results()["results"][task], single_process.results()["results"][task]
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float) and ("perplexity" in key or "bits_per_byte" in key):
            assert ours[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert ours[key] == value, key
