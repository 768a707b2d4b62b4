"""Launch paths a user takes: two nodes with c10d rendezvous, and the per-model-size make targets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import DEMO_TASKS, REPO, TINY_MODEL, free_port

pytestmark = pytest.mark.multiprocess


def test_two_nodes_on_localhost_match_one_node(tmp_path, reference_run):
    """2 nodes x 2 processes: global ranks 0..3, local ranks 0..1 on each node; nothing confused."""
    port = free_port()
    out = tmp_path / "two-nodes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=2",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=evalkit-test",
                "-m",
                "evalkit",
                "--model",
                str(TINY_MODEL),
                "--device",
                "cpu",
                "--tasks",
                ",".join(DEMO_TASKS),
                "--output",
                str(out),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    for proc in nodes:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["parallel"]["world_size"] == 4
    assert sorted(r["rank"] for r in results["throughput"]["per_rank"]) == [0, 1, 2, 3]
    assert results["results"] == reference_run.results()["results"]
    assert results["task_hashes"] == reference_run.results()["task_hashes"]


def test_make_target_runs_its_layout_on_a_small_box(tmp_path):
    out = tmp_path / "make-34b"
    proc = subprocess.run(
        [
            "make",
            "eval-34b",
            f"MODEL={TINY_MODEL}",
            "TASKS=demo_mc",
            "NPROC=2",
            f"OUT={out}",
            "EVAL_FLAGS=--limit 4 --device cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["parallel"]["tp"] == 2 and results["parallel"]["dp"] == 1
    assert results["config"]["deepspeed"].endswith("configs/deepspeed/tp2.json")
    assert results["config"]["dtype"] == "bfloat16"
