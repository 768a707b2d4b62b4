"""The heartbeat watchdog, in-process: rank 0's monitor over a real key-value store, with the other
rank's heartbeats written by the test (a rank that keeps beating, and one that went silent)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from evalkit import monitor as monitor_module
from evalkit.monitor import Monitor
from evalkit.parallel import FAILED_KEY, Layout, Topology


class StoreTopology(Topology):
    """Rank 0 of two, its heartbeats in ``kv`` (the launcher's store in a run)."""

    def store(self) -> Any:
        return self.kv


def rank0(kv: Any) -> Topology:
    topo = StoreTopology(layout=Layout(world_size=2), rank=0, local_rank=0, device=torch.device("cpu"), backend="gloo")
    object.__setattr__(topo, "kv", kv)
    return topo


def beat(kv: Any, number: int) -> None:
    kv.set("evalkit/heartbeat/1", json.dumps({"done": 0, "working": True, "docs": [], "beat": number}))


@pytest.fixture
def exits(monkeypatch) -> Iterator[tuple[threading.Event, list[int]]]:
    """os._exit as the monitor's thread calls it: recorded, and that thread held until the test ends."""
    ended, codes, release = threading.Event(), [], threading.Event()

    def exit_thread(code: int) -> None:
        codes.append(code)
        ended.set()
        release.wait()

    monkeypatch.setattr(monitor_module, "SILENT_SECONDS", 1.5)
    monkeypatch.setattr(monitor_module.os, "_exit", exit_thread)
    yield ended, codes
    release.set()


def test_a_rank_whose_heartbeat_stops_ends_the_run(exits, capfd):
    ended, codes = exits
    kv = dist.HashStore()
    beat(kv, 1)  # rank 1 beat once, then its process died
    kept = []
    watch = Monitor(rank0(kv), total=4, stall_timeout=3600, before_exit=lambda: kept.append(True))
    try:
        assert ended.wait(30)
    finally:
        watch._stop.set()
    assert codes == [1] and kept == [True]
    err = capfd.readouterr().err
    assert re.search(r"evalkit: rank 1 sent no heartbeat for \d+ s \(its process died or froze\); ending the run", err)


def test_a_rank_that_keeps_beating_is_left_alone(exits):
    ended, codes = exits
    kv = dist.HashStore()
    watch = Monitor(rank0(kv), total=4, stall_timeout=3600)
    try:
        for number in range(12):  # 6 s of rank 1's heartbeats, 4 x SILENT_SECONDS
            beat(kv, number)
            assert not ended.wait(monitor_module.POLL_SECONDS)
    finally:
        watch._stop.set()
    assert codes == []


def test_a_failure_announced_by_another_rank_ends_the_run_at_once(exits, capfd):
    ended, codes = exits
    kv = dist.HashStore()
    beat(kv, 1)
    watch = Monitor(rank0(kv), total=4, stall_timeout=3600)
    try:
        kv.set(FAILED_KEY, "evalkit: rank 1 failed: RuntimeError: out of memory")
        assert ended.wait(10)  # the next beat, not SILENT_SECONDS later
    finally:
        watch._stop.set()
    assert codes == [1]
    assert (
        "evalkit: rank 0 ends the run: another rank failed (rank 1 failed: RuntimeError: out of memory)"
        in capfd.readouterr().err
    )
