"""Shared helpers: the bundled tiny model, and launching evalkit the way a user does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-llama"
TASK_FIXTURES = REPO / "tests" / "fixtures" / "tasks"
REFERENCE = REPO / "tests" / "reference" / "lmeval-0.4.13"
DEMO_TASKS = ("demo_gen", "demo_ll", "demo_mc", "demo_mc_choices", "demo_mc_fewshot", "demo_ppl")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    output: Path | None

    def results(self) -> dict:
        return json.loads((self.output / "results.json").read_text())

    def samples(self, task: str) -> list[dict]:
        return [json.loads(line) for line in (self.output / f"samples_{task}.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_prefix(launcher: str, nproc: int) -> list[str]:
    if launcher == "python":
        return [sys.executable]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    if launcher == "accelerate":
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs" / "accelerate" / f"{nproc}proc.yaml"),
            "--main_process_port",
            str(free_port()),
        ]
    raise ValueError(launcher)


def run_evalkit(
    args: list[str],
    *,
    launcher: str = "python",
    nproc: int = 1,
    output: Path | None = None,
    script: str | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> Run:
    """Run evalkit as a user would (``-m evalkit`` or a wrapper script) and capture everything."""
    target = [script] if script else ["-m", "evalkit"]
    cmd = launcher_prefix(launcher, nproc) + target + args
    if output is not None:
        cmd += ["--output", str(output)]
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start, output)


def model_args(*extra: str) -> list[str]:
    return ["--model", str(TINY_MODEL), "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Run:
    """Every demo task at world size 1, batch size 1: the run compared with lm-eval and all layouts."""
    run = run_evalkit(
        model_args("--tasks", ",".join(DEMO_TASKS), "--batch-size", "1"), output=tmp_path_factory.mktemp("ws1_bs1")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run
