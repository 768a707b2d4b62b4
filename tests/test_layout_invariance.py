"""World size, launcher and batch size change nothing: same prompts, values and metrics.

Real multi-process runs on CPU with gloo: torchrun at 2 and 4 ranks, accelerate launch at 2.
"""

from __future__ import annotations

import pytest

from conftest import DEMO_TASKS, Run, assert_same_docs, model_args, run_evalkit

pytestmark = pytest.mark.multiprocess


@pytest.fixture(
    scope="module",
    params=[("torchrun", 2, 8), ("torchrun", 4, 1), ("accelerate", 2, 3)],
    ids=lambda p: f"{p[0]}-ws{p[1]}-bs{p[2]}",
)
def layout_run(request, tmp_path_factory) -> tuple[tuple, Run]:
    launcher, nproc, batch = request.param
    run = run_evalkit(
        model_args("--tasks", ",".join(DEMO_TASKS), "--batch-size", str(batch)),
        launcher=launcher,
        nproc=nproc,
        output=tmp_path_factory.mktemp(f"{launcher}{nproc}"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return request.param, run


def test_topology_is_recorded(layout_run):
    (_, nproc, _), run = layout_run
    parallel = run.results()["parallel"]
    assert parallel == {
        "world_size": nproc,
        "dp": nproc,
        "tp": 1,
        "placement": "replica",
        "gpus_per_rank": 1,
        "backend": "gloo",
        "device": "cpu",
    }
    per_rank = run.results()["throughput"]["per_rank"]
    assert sorted(r["rank"] for r in per_rank) == list(range(nproc))
    assert sum(r["requests"] for r in per_rank) == sum(len(d["arguments"]) for t in DEMO_TASKS for d in run.docs(t))


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_same_samples_as_single_process(layout_run, reference_run, task):
    _, run = layout_run
    expected, got = reference_run.docs(task), run.docs(task)
    assert [d["doc_id"] for d in got] == list(range(len(expected))), "every doc exactly once, in order"
    # Bit-identical per-sample values (the README's claim): no tolerance at all.
    assert_same_docs(expected, got, tolerance=0.0)
    assert [d["resps"] for d in got] == [d["resps"] for d in expected]
    assert [d["filtered_resps"] for d in got] == [d["filtered_resps"] for d in expected]
    assert [d["metrics"] for d in got] == [d["metrics"] for d in expected]


def test_same_metrics_as_single_process(layout_run, reference_run):
    _, run = layout_run
    assert run.results()["results"] == reference_run.results()["results"]
    assert run.results()["task_hashes"] == reference_run.results()["task_hashes"]
