"""Heartbeats, the world's progress bar, and the stall watchdog.

Each rank publishes a heartbeat to the launcher's key-value store from a background thread:
requests finished, whether it is still working, and the docs it last finished. Rank 0 sums the
counts into one progress bar. Every rank watches every heartbeat: a rank that is still working
but has finished nothing for ``stall_timeout`` seconds ends the run, with a message naming it
and where it was, instead of leaving the others waiting at the final gather. A rank whose
heartbeat stops altogether for ``SILENT_SECONDS`` (its process died, or froze outside evalkit's
loop) ends the run too: the collectives normally notice a dead peer at once, and this bounds the
wait when they do not. A rank that fails announces it in the store (``FAILED_KEY``), and every
other rank's monitor ends at its next beat, rather than finishing its share first.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

from evalkit.errors import say
from evalkit.parallel import FAILED_KEY, Topology, ended_by_peer

POLL_SECONDS = 0.5
SILENT_SECONDS = 30.0  # 60 missed heartbeats


class Monitor:
    def __init__(
        self, topo: Topology, total: int, stall_timeout: float, before_exit: Callable[[], None] = lambda: None
    ) -> None:
        self.topo = topo
        self.before_exit = before_exit
        self.stall_timeout = stall_timeout
        self.done = 0
        self.working = True
        self.last_docs: list[str] = []
        self.store = topo.store()
        self.bar = tqdm(total=total, desc="requests (all ranks)", disable=not topo.is_main, dynamic_ncols=True)
        self._seen: dict[int, tuple[int, float]] = {}
        self._heard: dict[int, tuple[int, float]] = {}  # rank -> (its last beat number, when it changed)
        self._beats = 0
        self._everyone_seen = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def finished(self, docs: list[str], n: int) -> None:
        """Called by the loop after each batch (main thread; only plain attribute writes here)."""
        self.done += n
        self.last_docs = docs[-4:]

    def idle(self) -> None:
        """This rank has finished its share and now only waits for the others."""
        self.working = False

    def more(self, total: int) -> None:
        """Another wave of ``total`` requests (all ranks) begins; this rank works again."""
        self.bar.total += total
        self.bar.refresh()
        self.working = True

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._beat()

    def _beat(self) -> None:
        beats = self._exchange()
        if self.topo.is_main:
            carried = sum(b["done"] for r, b in beats.items() if self.topo.layout.carries_results(r))
            self.bar.n = min(self.bar.total, carried)
            self.bar.refresh()
        now = time.monotonic()
        for rank, beat in beats.items():
            count, since = self._seen.get(rank, (-1, now))
            if beat["done"] != count:
                self._seen[rank] = (beat["done"], now)
            elif beat["working"] and now - since > self.stall_timeout:
                self._end_stalled(rank, beat, now - since)
            number, heard = self._heard.get(rank, (-1, now))
            if beat["beat"] != number:
                self._heard[rank] = (beat["beat"], now)
            elif now - heard > SILENT_SECONDS:
                self._end_silent(rank, now - heard)

    def _exchange(self) -> dict[int, dict]:
        self._beats += 1
        mine = {"done": self.done, "working": self.working, "docs": self.last_docs, "beat": self._beats}
        if self.store is None:
            return {self.topo.rank: mine}
        self.store.set(f"evalkit/heartbeat/{self.topo.rank}", json.dumps(mine))
        if self.store.check([FAILED_KEY]):
            self._end_failed(self.store.get(FAILED_KEY).decode(errors="replace"))
        keys = [f"evalkit/heartbeat/{r}" for r in range(self.topo.layout.world_size)]
        # One round trip once every rank has published (multi_get would wait for missing keys).
        if not self._everyone_seen:
            self._everyone_seen = self.store.check(keys)
            if not self._everyone_seen:
                return {self.topo.rank: mine}
        return {rank: json.loads(value) for rank, value in enumerate(self.store.multi_get(keys))}

    def _end_stalled(self, rank: int, beat: dict, seconds: float) -> None:
        where = f"last finished {', '.join(beat['docs'])}" if beat["docs"] else "before finishing any request"
        self._end(
            f"evalkit: rank {rank} made no progress for {seconds:.0f} s ({beat['done']} requests done, {where}); "
            f"ending the run (--stall-timeout {self.stall_timeout:g}); finished results are kept, rerun with --resume"
        )

    def _end_failed(self, line: str) -> None:
        self._end(ended_by_peer(self.topo.rank, line))

    def _end_silent(self, rank: int, seconds: float) -> None:
        self._end(
            f"evalkit: rank {rank} sent no heartbeat for {seconds:.0f} s (its process died or froze); ending the run; "
            f"finished results are kept, rerun with --resume"
        )

    def _end(self, line: str) -> None:
        """End this rank with ``line``, its shard synced first."""
        say(line)
        try:
            self.before_exit()
        except OSError:  # a full disk: what did not reach the shard is computed again on --resume
            pass
        os._exit(1)

    def abandon(self) -> None:
        """The run ends early on this rank: no more beats, and the bar's line ends where it stood."""
        self._stop.set()
        self._thread.join()
        self.bar.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.n = self.bar.total  # closed once every rank has reported its share finished
        self.bar.close()
