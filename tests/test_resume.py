"""Nothing lost, nothing hung: killed, crashed, stalled and signalled runs, then resumed anywhere.

Every run here is real: torchrun on CPU with gloo, faults injected by tests/fault_entry.py.
A resumed run must reuse exactly the saved results, compute only the rest, and end with the
same results.json numbers and samples as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEMO_TASKS, REPO, free_port, model_args, run_evalkit

pytestmark = pytest.mark.multiprocess

FAULTS = str(REPO / "tests" / "fault_entry.py")
BOUND_SECONDS = 60
ALL_TASKS = ",".join(DEMO_TASKS)
TOTAL_REQUESTS = 592


def saved_lines(output) -> int:
    return sum(len(p.read_text().splitlines()) for p in (output / "shards").glob("*.jsonl"))


def assert_same_as_uninterrupted(run, reference_run):
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.results()["results"] == reference_run.results()["results"]
    assert run.results()["task_hashes"] == reference_run.results()["task_hashes"]
    for task in DEMO_TASKS:
        for want, have in zip(reference_run.docs(task), run.docs(task), strict=True):
            for key in ("arguments", "resps", "filtered_resps", "metrics"):
                assert have.get(key) == want.get(key), (task, want["doc_id"], key)


def resume(output, nproc, batch="4"):
    launcher = "python" if nproc == 1 else "torchrun"
    return run_evalkit(
        model_args("--tasks", ALL_TASKS, "--resume", "--batch-size", batch),
        launcher=launcher,
        nproc=nproc,
        output=output,
    )


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 2-process run whose rank 1 is SIGKILLed after 3 batches; results saved at every batch."""
    output = tmp_path_factory.mktemp("killed") / "out"
    run = run_evalkit(
        model_args("--tasks", ALL_TASKS, "--flush-interval", "0.001"),
        launcher="torchrun",
        nproc=2,
        output=output,
        script=FAULTS,
        env={"FAULT": "kill", "FAULT_AFTER": "3"},
    )
    return run, output


def test_kill_9_ends_every_rank_and_keeps_finished_work(killed):
    run, output = killed
    assert run.returncode != 0
    assert run.seconds < BOUND_SECONDS
    assert "rank      : 1 (local_rank: 1)" in run.stderr and "SIGKILL" in run.stderr
    assert 0 < saved_lines(output) < TOTAL_REQUESTS
    assert not (output / "results.json").exists()


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_on_another_world_size(killed, reference_run, tmp_path, nproc):
    _, output = killed
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    saved = saved_lines(copy)
    run = resume(copy, nproc)
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"] == {"reused": saved, "computed": TOTAL_REQUESTS - saved}
    assert saved_lines(copy) == TOTAL_REQUESTS


def test_raising_rank_keeps_results_and_resumes(tmp_path, reference_run):
    output = tmp_path / "out"
    crashed = run_evalkit(
        model_args("--tasks", ALL_TASKS, "--flush-interval", "0.001"),
        launcher="torchrun",
        nproc=2,
        output=output,
        script=FAULTS,
        env={"FAULT": "raise", "FAULT_AFTER": "4"},
    )
    assert crashed.returncode != 0 and crashed.seconds < BOUND_SECONDS
    assert "evalkit: rank 1 failed: RuntimeError: injected failure in the forward of rank 1" in crashed.stderr
    saved = saved_lines(output)
    assert saved > 0
    run = resume(output, 2)
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"]["reused"] == saved


def test_stalled_rank_ends_the_run(tmp_path):
    run = run_evalkit(
        model_args("--tasks", ALL_TASKS, "--stall-timeout", "4"),
        launcher="torchrun",
        nproc=2,
        output=tmp_path / "out",
        script=FAULTS,
        env={"FAULT": "stall", "FAULT_AFTER": "2"},
    )
    assert run.returncode != 0
    assert run.seconds < BOUND_SECONDS
    assert "evalkit: rank 1 made no progress for" in run.stderr


def test_sigterm_to_the_launcher_stops_cleanly_and_resumes(tmp_path, reference_run):
    output = tmp_path / "out"
    env = {**os.environ, "FAULT": "slow", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            FAULTS,
            *model_args("--tasks", ALL_TASKS, "--flush-interval", "0.001"),
            "--output",
            str(output),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while (not (output / "shards").is_dir() or saved_lines(output) < 20) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the run never saved 20 results"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=BOUND_SECONDS)
    assert stderr.count("stopped by SIGTERM; finished results are saved") == 2, stderr[-3000:]
    for path in (output / "shards").glob("*.jsonl"):
        assert all(json.loads(line) for line in path.read_text().splitlines()), "shards hold only whole lines"
    saved = saved_lines(output)
    assert 20 <= saved < TOTAL_REQUESTS
    run = resume(output, 2)
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"] == {"reused": saved, "computed": TOTAL_REQUESTS - saved}


def test_torn_last_line_is_dropped_and_recomputed(killed, reference_run, tmp_path):
    _, output = killed
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    shard = max((copy / "shards").glob("*.jsonl"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 20])  # the last line loses its end and its newline
    saved = saved_lines(copy) - 1
    run = resume(copy, 1)
    assert "dropped a half-written last line" in run.stderr
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"] == {"reused": saved, "computed": TOTAL_REQUESTS - saved}
