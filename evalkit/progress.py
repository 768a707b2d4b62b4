"""One progress bar on rank 0 for the whole world.

Other ranks add their finished-request counts to the launcher's key-value store; a thread on
rank 0 reads the sum twice a second, so the bar moves even while rank 0 itself is busy or done.
"""

from __future__ import annotations

import threading

import torch.distributed as dist
from tqdm import tqdm

from evalkit.parallel import Topology

KEY = "evalkit/requests_done"


class WorldProgress:
    def __init__(self, topo: Topology, total: int, desc: str = "requests (all ranks)") -> None:
        self.topo = topo
        self.local = 0
        self.store = dist.distributed_c10d._get_default_store() if topo.distributed else None
        self.bar = tqdm(total=total, desc=desc, disable=not topo.is_main, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = None
        if topo.is_main and self.store is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def update(self, n: int) -> None:
        if not self.topo.carries_results:
            return  # the other ranks of a TP group run the same requests; count them once
        self.local += n
        if self.topo.is_main:
            if self.store is None:
                self.bar.update(n)
        elif self.store is not None:
            self.store.add(KEY, n)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def _refresh(self) -> None:
        others = self.store.add(KEY, 0)
        self.bar.n = min(self.bar.total, others + self.local)
        self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._refresh()
        self.bar.close()
