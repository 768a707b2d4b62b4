"""evalkit's CLI with one rank's model forward failing on its second batch.

Used by the bounded-failure test: the failure is real (an exception inside the scoring call of a
real run), only its place is chosen by the test through CRASH_RANK.
"""

import os
import sys

from evalkit.cli import main
from evalkit.models import hf

if os.environ.get("RANK", "0") == os.environ.get("CRASH_RANK", "1"):
    original = hf.HFCausalLM._score_batch
    calls = []

    def failing(self, width, batch):
        calls.append(width)
        if len(calls) > 1:
            raise RuntimeError(f"injected failure in the forward of rank {os.environ.get('RANK')}")
        return original(self, width, batch)

    hf.HFCausalLM._score_batch = failing

sys.exit(main())
