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


def whole_docs_saved(output, reference_run, damaged: frozenset = frozenset()) -> int:
    """Saved results a resume reuses: those of docs whose requests were all saved intact (a doc's
    choices share one packed row, so a resume computes a partly saved doc's requests together)."""
    counts: dict[tuple[str, int], int] = {}
    for path in (output / "shards").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            counts[record["task"], record["doc_id"]] = counts.get((record["task"], record["doc_id"]), 0) + 1
    needed = {(task, d["doc_id"]): len(d["arguments"]) for task in DEMO_TASKS for d in reference_run.docs(task)}
    return sum(n for doc, n in counts.items() if n == needed[doc] and doc not in damaged)


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
    saved, reused = saved_lines(copy), whole_docs_saved(copy, reference_run)
    run = resume(copy, nproc)
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"] == {"reused": reused, "computed": TOTAL_REQUESTS - reused}
    assert saved_lines(copy) == saved + TOTAL_REQUESTS - reused  # partly saved docs were computed whole
    if nproc == 1:  # a finished folder resumed again: the latest result of each request counts
        again = resume(copy, 2)
        assert_same_as_uninterrupted(again, reference_run)
        assert again.results()["resume"] == {"reused": TOTAL_REQUESTS, "computed": 0}


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
    assert saved_lines(output) > 0
    reused = whole_docs_saved(output, reference_run)
    run = resume(output, 2)
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"]["reused"] == reused


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
    assert 20 <= saved_lines(output) < TOTAL_REQUESTS
    reused = whole_docs_saved(output, reference_run)
    run = resume(output, 2)
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"] == {"reused": reused, "computed": TOTAL_REQUESTS - reused}


def damage_a_line(output, damage) -> tuple[str, int]:
    """Apply ``damage`` to the last line of the biggest shard it changes; (task, doc id) of that line."""
    shard = max((output / "shards").glob("*.jsonl"), key=lambda p: p.stat().st_size)
    lines = shard.read_bytes().splitlines(keepends=True)
    n = max(i for i, line in enumerate(lines) if damage(line) is not None)
    record = json.loads(lines[n])
    lines[n] = damage(lines[n])
    shard.write_bytes(b"".join(lines))
    return record["task"], record["doc_id"]


def tear(line: bytes) -> bytes:
    """The end of the file's last line lost, newline included (the process died mid-write)."""
    return line[:-20]


def change_a_digit(line: bytes) -> bytes | None:
    head, value = line.split(b'"r":', 1)
    digits = [i for i, c in enumerate(value) if chr(c) in "123456789"]
    return head + b'"r":' + value[: digits[0]] + b"0" + value[digits[0] + 1 :] if digits else None


@pytest.mark.parametrize("damage", [tear, change_a_digit], ids=["torn-last-line", "changed-digit"])
def test_damaged_line_is_recomputed_with_its_doc(killed, reference_run, tmp_path, damage):
    """A torn last line (the process died mid-write) or a changed digit fails its checksum: never
    used, counted in a warning, and recomputed with the rest of its doc's choices, so every value
    equals an uninterrupted run's."""
    _, output = killed
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    task, doc_id = damage_a_line(copy, damage)
    reused = whole_docs_saved(copy, reference_run, damaged=frozenset({(task, doc_id)}))
    run = resume(copy, 1)
    assert "evalkit: warning: 1 saved result(s) in " in run.stderr and "failed their checksum" in run.stderr
    assert_same_as_uninterrupted(run, reference_run)
    assert run.results()["resume"] == {"reused": reused, "computed": TOTAL_REQUESTS - reused}
