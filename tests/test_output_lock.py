"""One launch per output folder: the lock in-process (live, stale and remote holders), then real
launches: a second launch refused in one line at 1 and 2 ranks while the first completes, and a
SIGKILLed launch's lock taken over by ``--resume``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_input import evalkit_frames

from evalkit.errors import UsageError
from evalkit.output_lock import LEASE, LOCK, STALE_SECONDS, OutputLock

from conftest import REPO, model_args, run_evalkit


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(folder: Path, **fields) -> None:
    lease = {"launch": "20260101-000000-abcdef", "host": "vm", "pid": 1, "started": 0.0, "renewed": 0.0, **fields}
    (folder / LEASE).write_text(json.dumps(lease))


def test_a_second_holder_is_refused_and_the_folder_freed_after(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out, holder=True) as first:
        first.acquire()
        second = OutputLock(out, holder=True)
        with pytest.raises(UsageError) as refused:
            second.acquire()
        assert str(refused.value).startswith(f"--output {out} is in use by launch {first.launch} (host ")
        assert json.loads((out / LEASE).read_text())["launch"] == first.launch
    assert not out.exists()  # created by the lock, left empty: removed
    again = OutputLock(out, holder=True)
    again.acquire()
    (out / "results.json").write_text("{}")
    again.release()
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "results.json"]


def test_only_the_holding_rank_touches_the_folder(tmp_path):
    OutputLock(tmp_path / "out", holder=False).acquire()
    assert not (tmp_path / "out").exists()


def test_a_dead_launch_on_this_host_is_taken_over(tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    lock = OutputLock(out, holder=True)
    write_lease(out, host=lock.host, pid=dead_pid())
    lock.acquire()
    assert "launch 20260101-000000-abcdef" in capfd.readouterr().err
    assert json.loads((out / LEASE).read_text())["launch"] == lock.launch
    lock.release()


def test_another_hosts_lease_holds_until_it_goes_stale(tmp_path):
    """Where flock does not reach across nodes, a lease renewed by another host keeps the folder."""
    out = tmp_path / "out"
    out.mkdir()
    write_lease(out, host="node-b", renewed=time.time())
    with pytest.raises(UsageError, match="is in use by launch 20260101-000000-abcdef \\(host node-b"):
        OutputLock(out, holder=True).acquire()
    write_lease(out, host="node-b", renewed=time.time() - STALE_SECONDS - 1)
    lock = OutputLock(out, holder=True)
    lock.acquire()
    lock.release()


ARGS = model_args("--tasks", "demo_mc,demo_gen", "--limit", "6", "--batch-size", "2")
FAULTS = str(REPO / "tests" / "fault_entry.py")


def launch_env(**fault) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(fault)
    return env


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.multiprocess
def test_a_second_launch_is_refused_while_the_first_completes(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = subprocess.Popen(
        [sys.executable, FAULTS, *ARGS, "--output", str(out)],
        env=launch_env(FAULT="gate", FAULT_RANK="0", FAULT_GATE=str(gate)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(out / LEASE, first)
        holder = json.loads((out / LEASE).read_text())["launch"]
        for nproc in (1, 2):
            second = run_evalkit(ARGS, launcher="torchrun" if nproc > 1 else "python", nproc=nproc, output=out)
            assert second.returncode == (2 if nproc == 1 else 1), second.stderr[-3000:]  # torchrun ends 1
            lines = [line for line in second.stderr.splitlines() if line.startswith("evalkit:")]
            assert len(lines) == nproc, second.stderr[-3000:]
            for line in lines:  # rank 1 adds "(found on rank 0)": only rank 0 takes the folder
                assert line.startswith(f"evalkit: error: --output {out} is in use by launch {holder} (host ")
            assert not evalkit_frames(second.stderr)  # torchrun prints its own traceback, evalkit none
        gate.touch()
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert (out / "results.json").is_file() and not (out / LEASE).exists()


@pytest.mark.multiprocess
def test_a_killed_launchs_lock_is_taken_over_by_resume(tmp_path):
    out = tmp_path / "out"
    killed = run_evalkit(ARGS, output=out, script=FAULTS, env={"FAULT": "kill", "FAULT_RANK": "0"})
    assert killed.returncode == -9
    held = json.loads((out / LEASE).read_text())["launch"]
    resumed = run_evalkit([*ARGS, "--resume"], output=out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"launch {held} (host " in resumed.stderr and "taking it over" in resumed.stderr
    assert not (out / LEASE).exists()
    # resuming itself is tested against uninterrupted runs in test_resume.py
    assert [len(resumed.docs(task)) for task in ("demo_mc", "demo_gen")] == [6, 6]
