"""Where a run's time goes on rank 0, phase by phase, recorded in results.json as ``timings``.

``startup_s`` is the time from the process's start (interpreter, imports, process group) to the
first line of the evaluation; the other phases are measured around the code that does them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # Fields after the command name, which sits in parentheses; starttime is field 22 of stat.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Seconds per named phase; a phase entered twice adds up."""

    def __init__(self) -> None:
        age = process_age()
        self.seconds: dict[str, float] = {} if age is None else {"startup": age}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self) -> dict[str, float]:
        return {f"{name}_s": round(value, 3) for name, value in self.seconds.items()}
