"""A rank that raises ends the whole run promptly, with that rank's message and a non-zero exit."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, model_args, run_evalkit

pytestmark = pytest.mark.multiprocess
BOUND_SECONDS = 60


@pytest.mark.parametrize("crash_rank", ["0", "1"])
def test_crashing_rank_ends_every_rank(tmp_path, monkeypatch, crash_rank):
    monkeypatch.setenv("FAULT", "raise")
    monkeypatch.setenv("FAULT_RANK", crash_rank)
    run = run_evalkit(
        model_args("--tasks", "demo", "--batch-size", "2"),
        launcher="torchrun",
        nproc=2,
        output=tmp_path / "out",
        script=str(REPO / "tests" / "fault_entry.py"),
        timeout=BOUND_SECONDS * 3,
    )
    assert run.returncode != 0
    assert (
        f"evalkit: rank {crash_rank} failed: RuntimeError: injected failure in the forward of rank {crash_rank}"
        in run.stderr
    )
    assert run.seconds < BOUND_SECONDS
    assert not (tmp_path / "out" / "results.json").exists()


def test_crash_without_torchrun_supervision_still_ends(tmp_path, monkeypatch):
    """Launchers that do not kill siblings (plain env:// ranks): the survivor's collective fails fast."""
    import subprocess
    import sys
    import time

    from conftest import free_port

    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "FAULT": "raise",
        "FAULT_RANK": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # one thread per rank, as torchrun gives (the machine runs other tests)
    }
    cmd = [
        sys.executable,
        str(REPO / "tests" / "fault_entry.py"),
        *model_args("--tasks", "demo", "--batch-size", "2", "--output", str(tmp_path / "out")),
    ]
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=BOUND_SECONDS * 3) for p in procs]
    assert time.monotonic() - start < BOUND_SECONDS
    assert all(p.returncode != 0 for p in procs)
    assert "injected failure in the forward of rank 1" in outs[1][1]
