"""evalkit on CUDA: the demo tasks in bfloat16 with nccl, tokens per second and model-FLOPs utilisation.

Builds a randomly initialised Llama (about 100M parameters, evalkit's tiny tokenizer) from a config,
then evaluates the bundled loglikelihood tasks and the generation task with ``python -m evalkit``
on 1 process, and on 2 processes (dp=2) when 2 GPUs are visible. For each run it reports tokens per
second of the model loop (the slowest rank's loop time) and, for loglikelihood scoring one request
per row, the model-FLOPs utilisation: 2 x parameters FLOPs per token against the GPU's dense bf16
peak. Loglikelihood runs a second time with shared-prefix scoring (the default), where tokens/s
counts the requests' tokens as lm-eval would compute them (so no MFU: the model computes fewer),
and a line below it gives the tokens the model did compute (prefix reuse, from results.json).
Generation counts the tokens of the answers (cut at their stop sequences); a line below it gives
the decoding steps, the rows they advanced (a batch's rows step until the batch stops) and the
time per step.

On a machine without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_check.py     (make gpu-check)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOGLIKELIHOOD_TASKS = "demo_mc,demo_mc_fewshot,demo_ll"
GENERATION_TASKS = "demo_gen"
# Dense bf16 tensor-core peak per GPU, FLOP/s, from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def build_model(folder: Path) -> Path:
    """evalkit's tiny tokenizer with a Llama wide enough for GPU timings to mean something."""
    from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

    return build_tiny_llama(
        folder / "llama-100m",
        corpus_from_tasks(DEFAULT_TASKS_DIR),
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=8,
        num_heads=16,
        num_kv_heads=8,
        max_positions=2048,
        init_std=0.02,
        dtype="bfloat16",
        newline_scale=1.0,
    )


# (label, tasks, extra flags); MFU is computed for the first only.
RUNS = (
    ("loglikelihood, one row per request", LOGLIKELIHOOD_TASKS, ["--no-shared-prefix"]),
    ("loglikelihood, shared prefix", LOGLIKELIHOOD_TASKS, []),
    ("generation", GENERATION_TASKS, []),
)


def evaluate(model: Path, tasks: str, nproc: int, out: Path, device: str, flags: list[str]) -> dict:
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    cmd = [*launcher, "-m", "evalkit", "--model", str(model), "--tasks", tasks, "--output", str(out)]
    cmd += ["--device", device, "--dtype", "bfloat16", "--batch-size", "32", "--bootstrap-iters", "0", *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"gpu-check: evalkit failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return json.loads((out / "results.json").read_text())


def tokens_in(out: Path, tokenizer, generated: bool) -> int:
    """Tokens the model processed: prompt and continuation of every loglikelihood request, or the
    generated tokens of every generation. A doc counts once, though samples hold a row per filter."""
    total = 0
    for path in out.glob("samples_*.jsonl"):
        seen = set()
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["doc_id"] in seen:
                continue
            seen.add(row["doc_id"])
            if generated:
                total += sum(len(tokenizer.encode(r[0], add_special_tokens=False)) for r in row["resps"])
            else:
                for args in row["arguments"].values():
                    total += len(tokenizer.encode(args["arg_0"] + args["arg_1"]))
    return total


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script itself")
    args = parser.parse_args()
    reason = skip_reason() if args.device == "cuda" else None
    if reason:
        print(f"gpu-check: skipped: {reason}")
        return 0
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    on_gpu = args.device == "cuda"
    gpu = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    layouts = [1, 2] if on_gpu and torch.cuda.device_count() >= 2 else [1]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(model)
        params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
        peak = peak_flops(gpu)
        count = torch.cuda.device_count() if on_gpu else 1
        print(f"gpu-check on {count} x {gpu}, torch {torch.__version__}, model {params / 1e6:.0f}M bf16")
        print("| processes | kind | tokens | model-loop s | tokens/s | MFU |")
        print("|---|---|---|---|---|---|")
        for nproc in layouts:
            for number, (kind, tasks, flags) in enumerate(RUNS):
                out = Path(tmp) / f"run{number}-{nproc}"
                results = evaluate(model, tasks, nproc, out, args.device, flags)
                seconds = max(r["seconds"] for r in results["throughput"]["per_rank"])
                tokens = tokens_in(out, tokenizer, generated=kind == "generation")
                rate = tokens / seconds if seconds else float("nan")
                mfu = "n/a"
                if number == 0 and peak:
                    mfu = f"{2 * params * rate / (peak * nproc):.1%}"
                print(f"| {nproc} | {kind} | {tokens} | {seconds:.2f} | {rate:,.0f} | {mfu} |")
                timings = results.get("timings", {})
                if kind == "generation" and timings.get("generation_steps"):
                    steps, decoded = timings["generation_steps"], timings["tokens_generated"]
                    print(
                        f"|   | decoding: {steps} steps advanced {decoded} rows ({decoded / steps:.1f} per step), "
                        f"{1000 * seconds / steps:.1f} ms per step, {decoded / seconds:,.0f} rows/s |  |  |  |  |"
                    )
                if "tokens_computed" in timings and kind.endswith("shared prefix"):
                    computed, alone = timings["tokens_computed"], timings["tokens_one_row_per_request"]
                    print(
                        f"|   | prefix reuse: the model computed {computed} of {alone} tokens "
                        f"({computed / max(alone, 1):.2f}x), {computed / seconds if seconds else float('nan'):,.0f} "
                        "computed tokens/s |  |  |  |  |"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
