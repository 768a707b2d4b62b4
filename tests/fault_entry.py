"""evalkit's CLI with one real fault injected, for the failure and resume tests (text and VLM).

FAULT picks what happens on rank FAULT_RANK (default 1) once it has finished FAULT_AFTER model
batches (default 1): "raise" raises inside the forward, "kill" sends itself SIGKILL, "stall"
sleeps far past any timeout, "gate" waits until the file FAULT_GATE exists. "slow" makes every batch on every rank take 0.25 s longer, so a
test can signal a run mid-way. "poison" fails every loglikelihood call whose contexts contain
FAULT_TEXT, on every rank. Everything else is the real evalkit run.
"""

import os
import signal
import sys
import time

from evalkit.cli import main
from evalkit.models import hf, hf_vlm

FAULT = os.environ.get("FAULT", "")
ON_THIS_RANK = os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "1")
AFTER = int(os.environ.get("FAULT_AFTER", "1"))

original_loglikelihood = hf.HFCausalLM.loglikelihood
batches = []


def faulty(original):
    """A model batch (text scoring or VLM generation) with the fault injected before it runs."""

    def batch(self, width, *args):
        if FAULT == "slow":
            time.sleep(0.25)
        elif ON_THIS_RANK and len(batches) >= AFTER:
            rank = os.environ.get("RANK")
            if FAULT == "raise":
                raise RuntimeError(f"injected failure in the forward of rank {rank}")
            if FAULT == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if FAULT == "stall":
                time.sleep(3600)
            if FAULT == "gate":
                while not os.path.exists(os.environ["FAULT_GATE"]):
                    time.sleep(0.1)
        batches.append(width)
        return original(self, width, *args)

    return batch


def poisoned_loglikelihood(self, pairs, progress):
    if any(os.environ["FAULT_TEXT"] in context for context, _ in pairs):
        raise RuntimeError("injected failure for a poisoned doc")
    return original_loglikelihood(self, pairs, progress)


hf.HFCausalLM._score_packs = faulty(hf.HFCausalLM._score_packs)
hf_vlm.HFVisionLM._generate_batch = faulty(hf_vlm.HFVisionLM._generate_batch)
if FAULT == "poison":
    hf.HFCausalLM.loglikelihood = poisoned_loglikelihood

sys.exit(main())
