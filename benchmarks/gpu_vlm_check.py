"""lmms-eval image tasks on CUDA against lmms-eval's own reference outputs.

Builds the tiny vision-language models of ``evalkit.testing.tinyvlm`` and local data in the hub
schemas (``evalkit.testing.lmms_data``), runs lmms-eval's image tasks by name with ``python -m
evalkit --device cuda --dtype float32``, and compares each sample with the references that lmms-eval
0.7.3's own model classes produced on CPU (tests/reference/lmms-eval-0.7.3): the prompt, the
generation, the filtered answer and the per-sample metrics. It prints one line per family and task
with the counts that match, and the run's wall time.

On a machine without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_vlm_check.py     (make gpu-check)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCES = REPO / "tests" / "reference" / "lmms-eval-0.7.3"
IMAGE_DATA = "mme,pope,chartqa,ai2d,scienceqa_img,mmbench_en_dev,mmmu_val,docvqa_val"
# family -> (evalkit flags, tasks), as tests/test_lmms_parity.py runs them (image tasks only).
RUNS = {
    "llava": (
        ["--batch-size", "4", "--gen-kwargs", "temperature=0", "--dtype", "float32"],
        ["mme", "pope", "chartqa", "ai2d", "scienceqa_img", "mmbench_en_dev_static", "mmmu_val", "docvqa_val"],
    ),
    "qwen2_vl": (["--batch-size", "1", "--dtype", "float32"], ["mme"]),
    "qwen2_5_vl": (["--batch-size", "1", "--dtype", "float32"], ["mme"]),
    "internvl": (["--batch-size", "1", "--dtype", "float32"], ["mme"]),
    "llava_onevision": (["--batch-size", "2", "--dtype", "float32"], ["mme"]),
}


def build(family: str, folder: Path) -> Path:
    from evalkit.testing.tinyvlm import build_tiny_vlm, with_released_pixels

    return with_released_pixels(build_tiny_vlm(family, folder / family), family)


def matches(family: str, task: str, out: Path) -> tuple[int, int, int, int]:
    """(docs, prompts equal, generations equal, metrics equal) against lmms-eval's reference."""
    reference = json.loads((REFERENCES / f"{family}.{task}.json").read_text())
    rows = {row["doc_id"]: row for row in map(json.loads, (out / f"samples_{task}.jsonl").read_text().splitlines())}
    prompts = generations = metrics = 0
    for doc in reference["docs"]:
        row = rows.get(doc["doc_id"])
        if row is None:
            continue
        prompt = row["arguments"]["gen_args_0"]["arg_0"]
        prompts += prompt == (doc["messages"] if isinstance(prompt, list) else doc["input"])
        generations += row["resps"][0][0].strip() == doc["resps"].strip()
        metrics += {name: row[name] for name in doc["metrics"]} == doc["metrics"]
    return len(reference["docs"]), prompts, generations, metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script itself")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-vlm-check: skipped: no CUDA device is visible (torch.cuda.is_available() is False)")
        return 0
    from evalkit.testing.lmms_data import HF_HOME
    from evalkit.testing.lmms_data import main as write_data

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"gpu-vlm-check on {gpu}, torch {torch.__version__}: lmms-eval tasks against lmms-eval 0.7.3's outputs")
    print("| family | task | docs | prompts equal | generations equal | metrics equal | run wall s |")
    print("|---|---|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_data([str(data), "--tasks", IMAGE_DATA])
        for family, (flags, tasks) in RUNS.items():
            model = build(family, Path(tmp) / "models")
            built = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
            wanted = json.loads((REFERENCES / f"{family}.{tasks[0]}.json").read_text())["model_sha256"]
            if built != wanted:  # the references are evidence only for the weights they were made with
                print(
                    f"| {family} | {','.join(tasks)} | weights built here ({built[:12]}) differ from the "
                    f"references' ({wanted[:12]}) | | | | |"
                )
                failed += 1
                continue
            out = Path(tmp) / f"out-{family}"
            cmd = [sys.executable, "-m", "evalkit", "--model", str(model), "--device", args.device]
            cmd += ["--tasks", ",".join(f"lmms:{t}" for t in tasks), "--output", str(out), *flags]
            env = {**os.environ, "HF_HOME": str(data / HF_HOME), "PYTHONPATH": os.pathsep.join(sys.path)}
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=data, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                print(f"| {family} | {','.join(tasks)} | evalkit failed (exit {done.returncode}) | | | | {wall:.1f} |")
                print(done.stderr[-3000:])
                failed += 1
                continue
            for task in tasks:
                docs, prompts, generations, metrics = matches(family, task, out)
                failed += (prompts, generations, metrics) != (docs, docs, docs)
                print(f"| {family} | {task} | {docs} | {prompts} | {generations} | {metrics} | {wall:.1f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
