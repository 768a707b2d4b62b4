"""lm-eval's own CLI, with the time its HF model spends inside the request methods recorded.

Used by ``benchmarks/vs_lmeval.py``; takes exactly lm-eval's flags::

    LMEVAL_TIMING_DIR=DIR python benchmarks/lmeval_timed.py --model hf --tasks ... [lm-eval flags]

It wraps ``HFLM.loglikelihood``, ``HFLM.loglikelihood_rolling`` and ``HFLM.generate_until`` with a
timer (outermost calls only), then hands over to ``lm_eval.__main__.cli_evaluate()``. At exit every
process writes ``DIR/rank<RANK>.json``: seconds inside those methods, the requests they were
given and torch's intra-op thread count. Nothing else about lm-eval's run changes.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMED_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


class CallTimer:
    """Accumulates wall seconds and request counts over the outermost timed calls."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.requests = 0
        self._depth = 0

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(lm: Any, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.monotonic()
            try:
                return method(lm, requests, *args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:  # a method calling another timed one is counted once
                    self.seconds += time.monotonic() - start
                    self.requests += len(requests)

        return timed


def write_report(timer: CallTimer, folder: Path) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "rank": rank,
        "seconds": timer.seconds,
        "requests": timer.requests,
        "threads": torch.get_num_threads(),
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(report) + "\n")


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.models.huggingface import HFLM

    timer = CallTimer()
    for name in TIMED_METHODS:
        setattr(HFLM, name, timer.wrap(getattr(HFLM, name)))
    atexit.register(write_report, timer, Path(os.environ["LMEVAL_TIMING_DIR"]))
    cli_evaluate()


if __name__ == "__main__":
    main()
