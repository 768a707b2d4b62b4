"""Few-shot prefixes reused from the KV cache give the same numbers at every layout.

lm-eval's own mmlu subjects, 5-shot (its ``first_n`` sampler: a subject's docs share the same five
examples), on a tiny Llama with 1,024 positions so whole prompts fit. The hf backend computes each
run of docs' few-shot block once and every doc in a row of its own over the block's cached keys and
values (``packing.Pack.split``). Real runs on CPU with gloo: one process at batch 1 is the
reference; torchrun dp=2 at batch 8 must give it bit for bit, DeepSpeed tp=2 within lm-eval's 1e-4
(its all-reduces reorder sums), and every value stays within 1e-4 of one request per row.
"""

from __future__ import annotations

import pytest
from library_data import write_mmlu

from conftest import Run, assert_same_docs, run_evalkit

pytestmark = pytest.mark.multiprocess

TASKS = ["mmlu_anatomy", "mmlu_virology"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

    root = tmp_path_factory.mktemp("mmlu")
    write_mmlu(root, test_docs=6)
    model = build_tiny_llama(root / "model", corpus_from_tasks(DEFAULT_TASKS_DIR), max_positions=1024)
    return root, model


def evaluate(workdir, name: str, *extra: str, launcher: str = "python", nproc: int = 1) -> Run:
    root, model = workdir
    args = ["--model", str(model), "--tasks", ",".join(TASKS), "--num-fewshot", "5", "--device", "cpu"]
    run = run_evalkit(
        [*args, "--bootstrap-iters", "0", *extra], launcher=launcher, nproc=nproc, output=root / name, cwd=root
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def reference(workdir) -> Run:
    return evaluate(workdir, "one", "--batch-size", "1")


def test_the_few_shot_block_is_computed_once_per_run_of_docs(workdir, reference):
    model = reference.results()["model"]
    assert "reused from the KV cache" in model["shared_prefix"], model["shared_prefix"]
    timings = reference.results()["timings"]
    assert timings["tokens_computed"] < 0.4 * timings["tokens_one_row_per_request"], timings
    alone = evaluate(workdir, "alone", "--batch-size", "8", "--no-shared-prefix")
    for task in TASKS:
        assert_same_docs(alone.docs(task), reference.docs(task), TOLERANCE)


def test_two_replicas_give_the_one_process_values_bit_for_bit(workdir, reference):
    run = evaluate(workdir, "dp2", "--batch-size", "8", launcher="torchrun", nproc=2)
    assert run.results()["parallel"]["dp"] == 2
    for task in TASKS:
        assert [d["resps"] for d in run.docs(task)] == [d["resps"] for d in reference.docs(task)], task


def test_deepspeed_tensor_parallel_gives_the_one_process_values(workdir, reference):
    run = evaluate(workdir, "tp2", "--batch-size", "4", "--tp", "2", launcher="torchrun", nproc=2)
    assert run.results()["parallel"]["tp"] == 2
    assert "reused from the KV cache" in run.results()["model"]["shared_prefix"]
    for task in TASKS:
        assert_same_docs(reference.docs(task), run.docs(task), TOLERANCE)
