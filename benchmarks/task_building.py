"""Request building for the whole mmlu group: evalkit against lm-eval 0.4.13, side by side.

Both build the same prompts with lm-eval's own code; what differs is start-up: lm-eval's
TaskManager indexes its 14,000 task names on every start (every run, every rank), evalkit reads
its cached index. Each measurement is a fresh process (as a run is), on a synthetic MMLU of the
real size (57 subjects, ~14,000 test docs) in the hub layout, working folder = the data.

    python benchmarks/task_building.py [--docs-per-subject 246] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# Each snippet prints {"index": s, "load": s, "build": s, "requests": n} for mmlu at the given shots.
LM_EVAL = """
import json, sys, time
t0 = time.monotonic()
from lm_eval.tasks import TaskManager
manager = TaskManager()
t1 = time.monotonic()
loaded = manager.load(["mmlu"])
t2 = time.monotonic()
n = 0
for task in loaded["tasks"].values():
    if task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=int(sys.argv[1]))
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    n += len(task.instances)
t3 = time.monotonic()
print(json.dumps({"index": t1 - t0, "load": t2 - t1, "build": t3 - t2, "requests": n}))
"""

EVALKIT = """
import json, sys, time
t0 = time.monotonic()
from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.requests import PromptOptions, build_plans, number_requests
library = TaskLibrary()
t1 = time.monotonic()
loaded = library.load_checked(["mmlu"])
t2 = time.monotonic()
requests = number_requests(build_plans(loaded["tasks"], PromptOptions(num_fewshot=int(sys.argv[1]))))
t3 = time.monotonic()
print(json.dumps({"index": t1 - t0, "load": t2 - t1, "build": t3 - t2, "requests": len(requests)}))
"""


def measure(code: str, shots: int, data: Path, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", code, str(shots)], cwd=data, env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import os

    from library_data import write_mmlu

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs-per-subject", type=int, default=246)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_mmlu(data, test_docs=args.docs_per_subject)
        env = {
            **os.environ,
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(Path(tmp) / "cache"),
            "TQDM_DISABLE": "1",
        }
        measure(EVALKIT, 0, data, env)  # fills the datasets cache and evalkit's index cache for both tools
        print(f"mmlu: 57 subjects, {57 * args.docs_per_subject} test docs; medians of {args.repeats} fresh processes")
        print("| shots | tool | index s | load s | build s | total s | requests | evalkit speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for shots in (0, 5):
            rows = {}
            for name, code in (("lm-eval 0.4.13", LM_EVAL), ("evalkit", EVALKIT)):
                runs = [measure(code, shots, data, env) for _ in range(args.repeats)]
                rows[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = sum(rows["lm-eval 0.4.13"][k] for k in ("index", "load", "build"))
            for name, r in rows.items():
                total = r["index"] + r["load"] + r["build"]
                print(
                    f"| {shots} | {name} | {r['index']:.2f} | {r['load']:.2f} | {r['build']:.2f} | {total:.2f} "
                    f"| {int(r['requests'])} | {base / total:.2f}x |"
                )


if __name__ == "__main__":
    main()
