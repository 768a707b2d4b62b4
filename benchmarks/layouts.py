"""Throughput of evalkit layouts on the bundled tiny model, measured side by side in one run.

Each layout evaluates the same demo tasks; the table reports wall time and the speed-up over the
first layout. Absolute seconds depend on the machine; the ratios are what to compare.

    python benchmarks/layouts.py [--model DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [
    ("1 process, batch 1", 1, ["--batch-size", "1"]),
    ("1 process, batch 8", 1, ["--batch-size", "8"]),
    ("2 processes (dp=2), batch 8", 2, ["--batch-size", "8"]),
    ("2 processes (tp=2), batch 8", 2, ["--batch-size", "8", "--tp", "2"]),
]


def run(nproc: int, flags: list[str], model: str) -> tuple[float, float]:
    """(whole command wall seconds, seconds of the slowest rank's model loop)."""
    with tempfile.TemporaryDirectory() as out:
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        )
        cmd = [
            *launcher,
            "-m",
            "evalkit",
            "--model",
            model,
            "--tasks",
            "demo",
            "--device",
            "cpu",
            "--output",
            out,
            *flags,
        ]
        start = time.monotonic()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        wall = time.monotonic() - start
        per_rank = json.loads((Path(out) / "results.json").read_text())["throughput"]["per_rank"]
        return wall, max(r["seconds"] for r in per_rank)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(REPO / "tests" / "fixtures" / "tiny-llama"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name, nproc, flags in LAYOUTS:
        runs = [run(nproc, flags, args.model) for _ in range(args.repeats)]
        rows.append((name, statistics.median(w for w, _ in runs), statistics.median(m for _, m in runs)))
    wall0, loop0 = rows[0][1], rows[0][2]
    print("| layout | command wall s | speed-up | model loop s (slowest rank) | speed-up |")
    print("|---|---|---|---|---|")
    for name, wall, loop in rows:
        print(f"| {name} | {wall:.1f} | {wall0 / wall:.2f}x | {loop:.2f} | {loop0 / loop:.2f}x |")


if __name__ == "__main__":
    main()
