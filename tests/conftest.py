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
PACKAGE = REPO / "evalkit"
TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-llama"
TASK_FIXTURES = REPO / "tests" / "fixtures" / "tasks"
REFERENCE = REPO / "tests" / "reference" / "lmeval-0.4.13"
LOGLIKELIHOOD_TOLERANCE = 1e-4
ROLLING_TOLERANCE = 1e-3
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

    def docs(self, task: str) -> list[dict]:
        """The task's sample rows folded to one record per doc, values parsed back from lm-eval's strings."""
        return fold_samples(self.samples(task), self.results()["configs"][task]["output_type"])


def parse_response(output_type: str, value):
    if output_type in ("multiple_choice", "loglikelihood"):
        ll, greedy = value
        return [float(ll), greedy == "True" if isinstance(greedy, str) else greedy]
    if output_type == "loglikelihood_rolling":
        return float(value)
    return value


def fold_samples(rows: list[dict], output_type: str) -> list[dict]:
    """lm-eval writes one row per (doc, filter); the same record shape as tests/reference files."""
    docs: dict[int, dict] = {}
    for row in rows:
        record = docs.setdefault(row["doc_id"], {"doc_id": row["doc_id"], "filtered_resps": {}, "metrics": {}})
        if "error" in row:
            record["error"] = row["error"]
            continue
        arguments = row["arguments"]
        record["arguments"] = (
            [list(a.values()) for a in arguments.values()] if isinstance(arguments, dict) else arguments
        )
        record["resps"] = [[parse_response(output_type, r) for r in rs] for rs in row["resps"]]
        record["filtered_resps"][row["filter"]] = [parse_response(output_type, r) for r in row["filtered_resps"]]
        record["metrics"][row["filter"]] = {m: row[m] for m in row["metrics"]}
        for key in ("doc_hash", "prompt_hash", "target_hash", "target"):
            record[key] = row[key]
    return [docs[k] for k in sorted(docs)]


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
    cwd: Path = REPO,
) -> Run:
    """Run evalkit as a user would (``-m evalkit`` or a wrapper script) and capture everything."""
    target = [script] if script else ["-m", "evalkit"]
    cmd = launcher_prefix(launcher, nproc) + target + args
    if output is not None:
        cmd += ["--output", str(output)]
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # One intra-op thread per process, as torchrun gives each rank: the test models are tiny, and
        # several processes share few cores (test files run in parallel), where extra threads only spin.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.update(extra)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
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


def assert_same_docs(expected: list[dict], got: list[dict], tolerance: float) -> None:
    """Two runs' per-doc records: identical requests, generations, greedy flags and metric keys;
    values within tolerance."""
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        assert have["doc_id"] == want["doc_id"]
        assert have["arguments"] == want["arguments"]
        assert have["prompt_hash"] == want["prompt_hash"]
        for want_resps, have_resps in zip(want["resps"], have["resps"], strict=True):
            for a, b in zip(want_resps, have_resps, strict=True):
                if isinstance(a, list):  # (loglikelihood, is_greedy)
                    assert abs(a[0] - b[0]) <= tolerance, (want["doc_id"], a, b)
                    assert b[1] == a[1], ("greedy flag", want["doc_id"], a, b)
                elif isinstance(a, float):
                    assert abs(a - b) <= tolerance, (want["doc_id"], a, b)
                else:
                    assert a == b, want["doc_id"]
        if want["resps"] and isinstance(want["resps"][0][0], str):
            assert have["filtered_resps"] == want["filtered_resps"]
        assert have["metrics"].keys() == want["metrics"].keys()


def assert_same_outputs(ref: dict, ours: list[dict]) -> None:
    """Per doc: the same requests byte for byte, loglikelihoods within tolerance, the same generations."""
    assert [d["doc_id"] for d in ours] == [d["doc_id"] for d in ref["docs"]]
    for want, have in zip(ref["docs"], ours, strict=True):
        assert have["arguments"] == [list(a) for a in want["arguments"]]
        for key in ("doc_hash", "prompt_hash", "target_hash"):
            assert have[key] == want[key], key
        for want_resps, have_resps in zip(want["resps"], have["resps"], strict=True):
            for a, b in zip(want_resps, have_resps, strict=True):
                if isinstance(a, list):  # (loglikelihood, is_greedy)
                    assert b[1] == a[1]
                    assert abs(a[0] - b[0]) <= LOGLIKELIHOOD_TOLERANCE
                elif isinstance(a, float):  # rolling loglikelihood
                    assert abs(a - b) <= ROLLING_TOLERANCE
                else:
                    assert b == a
        if ref["output_type"] == "generate_until":
            assert have["filtered_resps"] == want["filtered_resps"]


def assert_same_metrics(ref: dict, ours: list[dict], results: dict, rel: float = 0.0) -> None:
    """Per-doc metric values and the task's aggregates; ``rel`` for metrics computed from loglikelihoods."""
    for want, have in zip(ref["docs"], ours, strict=True):
        assert have["metrics"].keys() == want["metrics"].keys()
        for filter_name, values in want["metrics"].items():
            assert have["metrics"][filter_name].keys() == values.keys()
            for metric, value in values.items():
                got = have["metrics"][filter_name][metric]
                if isinstance(value, list):  # (loglikelihood, words or bytes)
                    assert got[1] == value[1]
                    assert abs(got[0] - value[0]) <= ROLLING_TOLERANCE
                elif metric == "perplexity":
                    assert abs(got - value) <= LOGLIKELIHOOD_TOLERANCE
                elif isinstance(value, float) and rel:
                    assert got == pytest.approx(value, rel=rel, abs=1e-12), (want["doc_id"], metric)
                else:
                    assert got == value, (want["doc_id"], metric)
    assert list(results) == list(ref["results"])
    for key, value in ref["results"].items():
        if isinstance(value, float) and ("perplexity" in key or "bits_per_byte" in key):
            assert results[key] == pytest.approx(value, rel=max(rel, 1e-5)), key
        elif isinstance(value, float) and rel:
            assert results[key] == pytest.approx(value, rel=rel), key
        else:
            assert results[key] == value, key


def pytest_configure(config) -> None:
    """In-process tests use one intra-op thread too (see ``run_evalkit``)."""
    import torch

    torch.set_num_threads(1)
