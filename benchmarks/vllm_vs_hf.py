"""The hf and vllm backends side by side on one device: a generation task and a multiple-choice task.

Run it from .venv-vllm (``make install-vllm``), which has both backends. It builds the randomly
initialised ~100M Llama of ``gpu_check.py`` (64-dim heads, which vLLM's attention takes), runs the
demo generation task (answers up to ``--max-gen-toks`` tokens) and the 3-shot multiple-choice task
through ``--backend hf`` and ``--backend vllm`` one after the other, and prints wall time, model-call
time and their ratios, with how many per-sample outputs agree (greedy generations compared as
strings, loglikelihoods by their largest difference).

    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py              # CUDA, bfloat16
    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py --device cpu  # a check of the script (float32)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import build_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = (("generation", "demo_gen"), ("multiple choice", "demo_mc_fewshot"))


def run(model: Path, backend: str, task: str, out: Path, args: argparse.Namespace) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "evalkit", "--model", str(model), "--tasks", task, "--output", str(out)]
    cmd += ["--backend", backend, "--device", args.device, "--dtype", args.dtype, "--bootstrap-iters", "0"]
    cmd += ["--batch-size", str(args.batch_size), "--gen-kwargs", f"max_gen_toks={args.max_gen_toks}"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"vllm_vs_hf: evalkit failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return wall, json.loads((out / "results.json").read_text())


def responses(out: Path, task: str) -> list:
    rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
    first = {}
    for row in rows:
        first.setdefault(row["doc_id"], row["resps"])
    return [first[k] for k in sorted(first)]


def agreement(a: list, b: list) -> str:
    pairs = [(x[0], y[0]) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    if isinstance(pairs[0][0], str):
        same = sum(x == y for x, y in pairs)
        return f"{same}/{len(pairs)} generations identical"
    worst = max(abs(float(x) - float(y)) for x, y in pairs)
    return f"{len(pairs)} loglikelihoods, max difference {worst:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-size", type=int, default=32, help="hf requests per call (vLLM batches itself)")
    parser.add_argument("--max-gen-toks", type=int, default=256)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("vllm_vs_hf: skipped: no CUDA device is visible (--device cpu checks the script)")
        return 0
    import vllm

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"hf vs vllm on {name}, torch {torch.__version__}, vllm {vllm.__version__}, {args.dtype}")
    print("| task | hf wall s | vllm wall s | wall ratio | hf model calls s | vllm model calls s | ratio | outputs |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
        for label, task in TASKS:
            measured = {}
            for backend in ("hf", "vllm"):
                out = Path(tmp) / f"{backend}-{task}"
                wall, results = run(model, backend, task, out, args)
                measured[backend] = (wall, results["timings"]["model_calls_s"], out)
            (hw, hm, ho), (vw, vm, vo) = measured["hf"], measured["vllm"]
            same = agreement(responses(ho, task), responses(vo, task))
            print(f"| {label} | {hw:.1f} | {vw:.1f} | {vw / hw:.2f}x | {hm:.1f} | {vm:.1f} | {vm / hm:.2f}x | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
