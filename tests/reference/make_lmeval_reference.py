"""Regenerate the lm-evaluation-harness reference outputs used by evalkit's tests.

This script is run by a developer, never by the test-suite.  It needs
lm-eval 0.4.13 installed in a *separate* virtual environment (evalkit itself
must not depend on lm-eval), e.g.::

    python3.11 -m venv /tmp/lmeval
    /tmp/lmeval/bin/pip install lm-eval==0.4.13      # plus torch/transformers

and the committed tiny model fixture, built with evalkit::

    python -m evalkit.testing.tinymodel tests/fixtures/tiny-llama

Then, from the repository root (any Python >= 3.11; only the stdlib is used)::

    python tests/reference/make_lmeval_reference.py [--lm-eval /tmp/lmeval/bin/lm_eval]

It runs the ``lm_eval`` CLI fully offline on the bundled demo tasks
(``evalkit/bundled_tasks/demo``, with that folder as the working directory so
the relative ``data_files`` paths in the YAMLs resolve), and writes one compact
JSON file per task to ``tests/reference/lmeval-0.4.13/<task>.json`` holding,
per document, the request arguments, raw responses, filtered responses per
filter, per-document metric values and lm-eval's hashes, plus the task-level
results, the resolved task config and the exact command line.  It also runs
``demo_mc`` and ``demo_mc_fewshot`` with ``--num_fewshot 1`` (stored as
``<task>.numfewshot1.json``; lm-eval ignores the override for demo_mc because
its YAML pins ``num_fewshot: 0``, and applies it to demo_mc_fewshot)
and repeats the main run with lm-eval's default seeds to confirm the outputs do
not depend on the seed choice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "evalkit" / "bundled_tasks" / "demo"
MODEL_DIR = REPO / "tests" / "fixtures" / "tiny-llama"
OUT_DIR = REPO / "tests" / "reference" / "lmeval-0.4.13"
LM_EVAL_VERSION = "0.4.13"
TASKS = ["demo_mc", "demo_mc_fewshot", "demo_mc_choices", "demo_gen", "demo_ll", "demo_ppl"]
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Keys of the top-level results.json "config" block worth keeping.
RUN_CONFIG_KEYS = [
    "model",
    "model_args",
    "batch_size",
    "device",
    "limit",
    "bootstrap_iters",
    "gen_kwargs",
    "random_seed",
    "numpy_seed",
    "torch_seed",
    "fewshot_seed",
]
RUN_TOP_KEYS = [
    "max_length",
    "tokenizer_pad_token",
    "tokenizer_eos_token",
    "tokenizer_bos_token",
    "eot_token_id",
    "fewshot_as_multiturn",
    "chat_template",
]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sanitize(value: Any) -> Any:
    """Make configs reproducible: relative paths, no object addresses."""
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [sanitize(v) for v in value]
    if isinstance(value, str):
        value = value.replace(str(REPO) + os.sep, "")
        return re.sub(r" at 0x[0-9a-fA-F]+>", ">", value)
    return value


def run_lm_eval(
    lm_eval: str, tasks: list[str], extra: list[str], label: str, model_dir: Path = MODEL_DIR
) -> tuple[list[str], Path, float]:
    """Run the lm_eval CLI; return (recorded argv, output folder, wall seconds)."""
    out = Path(tempfile.mkdtemp(prefix=f"lmeval-ref-{label}-"))
    argv = [
        lm_eval,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(DEMO_DIR),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out / "results"),
        *extra,
    ]
    env = {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(out / "hf_datasets_cache")}
    print(f"[{label}] cd {DEMO_DIR} && {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=DEMO_DIR, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    (out / "lm_eval.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"lm_eval failed (rc={proc.returncode}); log: {out / 'lm_eval.log'}\n{proc.stderr[-4000:]}")
    print(f"[{label}] finished in {elapsed:.1f}s; raw output in {out}", flush=True)
    # record the command without the random temporary folder name
    recorded = [a.replace(str(out), "<tmp>") for a in argv]
    return recorded, out / "results", elapsed


def _ll_pair(x: Any) -> list:
    """lm-eval logs (loglikelihood, is_greedy) as strings; parse them back."""
    ll, greedy = x
    return [float(ll), greedy if isinstance(greedy, bool) else str(greedy) == "True"]


def _parse_resp(output_type: str, resp: Any) -> Any:
    if output_type == "generate_until":
        return resp
    if output_type == "loglikelihood_rolling":
        return float(resp)
    return _ll_pair(resp)


def collect_docs(samples_file: Path, output_type: str) -> list[dict]:
    """Fold lm-eval's per-(doc, filter) sample rows into one record per doc_id."""
    docs: dict[int, dict] = {}
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rec = docs.get(row["doc_id"])
        if rec is None:
            args = [
                list(a.values())
                for _, a in sorted(row["arguments"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))
            ]
            rec = docs[row["doc_id"]] = {
                "doc_id": row["doc_id"],
                "target": row["target"],
                "arguments": args,
                "resps": [[_parse_resp(output_type, r) for r in rs] for rs in row["resps"]],
                "filtered_resps": {},
                "metrics": {},
                **{k: row[k] for k in ("doc_hash", "prompt_hash", "target_hash") if k in row},
            }
        filt = row["filter"]
        # one filtered response per request (per choice for multiple_choice)
        rec["filtered_resps"][filt] = [_parse_resp(output_type, r) for r in row["filtered_resps"]]
        rec["metrics"][filt] = {m: row[m] for m in row["metrics"]}
    return [docs[k] for k in sorted(docs)]


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (\w+)\s+\[([^\]]+)\] (.*)$")


def task_log_messages(log: str, task: str) -> list[str]:
    """lm-eval warnings (and evaluator notes) that name ``task``, without timestamps."""
    out = []
    for line in log.splitlines():
        m = LOG_LINE.match(line)
        if (
            m
            and re.search(rf"\b{re.escape(task)}\b", m.group(3))
            and (m.group(1) != "INFO" or m.group(2).startswith("evaluator:"))
        ):
            out.append(f"{m.group(1)} [{m.group(2)}] {m.group(3)}")
    return out


def build_references(argv: list[str], results_dir: Path, tasks: list[str]) -> dict[str, dict]:
    log = (results_dir.parent / "lm_eval.log").read_text()
    (results_file,) = results_dir.rglob("results_*.json")
    res = json.loads(results_file.read_text(encoding="utf-8"))
    refs: dict[str, dict] = {}
    for task in tasks:
        stamp = re.compile(rf"samples_{re.escape(task)}_\d{{4}}-\d\d-\d\dT.*\.jsonl")
        (samples_file,) = [p for p in results_dir.rglob("samples_*.jsonl") if stamp.fullmatch(p.name)]
        output_type = res["configs"][task]["output_type"]
        refs[task] = {
            "lm_eval_version": res.get("lm_eval_version", LM_EVAL_VERSION),
            "transformers_version": res.get("transformers_version"),
            "command": shlex.join(argv),
            "cwd": str(DEMO_DIR.relative_to(REPO)),
            "repo_root_at_generation": str(REPO),
            "env": OFFLINE_ENV,
            "model_dir": str(MODEL_DIR.relative_to(REPO)),
            "model_sha256": {f: sha256_file(MODEL_DIR / f) for f in ("model.safetensors", "tokenizer.json")},
            "task": task,
            "output_type": output_type,
            "version": res["versions"][task],
            "n-shot": res["n-shot"][task],
            "results": res["results"][task],
            "higher_is_better": res["higher_is_better"][task],
            "n-samples": res["n-samples"][task],
            "run_config": sanitize({k: res["config"].get(k) for k in RUN_CONFIG_KEYS}),
            "model_info": {k: res.get(k) for k in RUN_TOP_KEYS},
            "configs": sanitize(res["configs"][task]),
            "task_hash": res.get("task_hashes", {}).get(task),
            "log_messages": task_log_messages(log, task),
            "docs": collect_docs(samples_file, output_type),
        }
    return refs


def comparable(ref: dict) -> dict:
    return {k: v for k, v in ref.items() if k not in ("command", "run_config")}


def token_counts(python: str, texts: list[str]) -> list[int]:
    """Token counts (with BOS) under the fixture tokenizer, via the lm-eval venv's transformers."""
    code = (
        "import sys, json; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(MODEL_DIR)!r}); "
        "print(json.dumps([len(t(x)['input_ids']) for x in json.load(sys.stdin)]))"
    )
    proc = subprocess.run(
        [python, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sanity_check(refs: dict[str, dict], python: str) -> None:
    for task, ref in refs.items():
        for doc in ref["docs"]:
            for rs in doc["resps"]:
                for r in rs:
                    ll = r if isinstance(r, float) else (r[0] if isinstance(r, list) else None)
                    assert ll is None or math.isfinite(ll), (task, doc["doc_id"], r)
        if ref["output_type"] == "generate_until":
            gens = [doc["resps"][0][0] for doc in ref["docs"]]
            empty = sum(not g.strip() for g in gens)
            assert empty <= len(gens) // 4, f"{task}: {empty}/{len(gens)} empty generations"
            print(f"  {task}: {len(gens) - empty}/{len(gens)} non-empty generations")
        if ref["output_type"] == "loglikelihood_rolling":
            lens = token_counts(python, [doc["arguments"][0][0] for doc in ref["docs"]])
            max_len = ref["model_info"]["max_length"]
            long_docs = sum(n > max_len for n in lens)
            assert long_docs >= 5, f"{task}: only {long_docs} docs exceed max_length {max_len}"
            print(
                f"  {task}: {long_docs}/{len(lens)} docs longer than {max_len} tokens "
                f"(max {max(lens)}) -> rolling windows exercised"
            )
        print(
            f"  {task}: {len(ref['docs'])} docs, results "
            + ", ".join(f"{k}={v}" for k, v in ref["results"].items() if "," in k and "stderr" not in k)
        )


def write(refs: dict[str, dict], suffix: str = "") -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for task, ref in refs.items():
        path = OUT_DIR / f"{task}{suffix}.json"
        path.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KiB)")


# An instruct-style run: the tiny model with evalkit's chat template, few-shot turns as chat turns,
# a system instruction and generation settings from the command line.
CHAT_TASKS = ["demo_mc_fewshot", "demo_gen"]
CHAT_FLAGS = [
    "--apply_chat_template",
    "--fewshot_as_multiturn",
    "true",
    "--system_instruction",
    "You are a careful assistant.",
    "--gen_kwargs",
    "max_gen_toks=16",
    "--limit",
    "12",
    "--seed",
    "1234",
]


def make_chat_reference(lm_eval: str) -> dict[str, dict]:
    sys.path.insert(0, str(REPO))
    from evalkit.testing.tinymodel import with_chat_template

    chat_model = with_chat_template(MODEL_DIR, Path(tempfile.mkdtemp(prefix="lmeval-chat-model-")) / "tiny-chat")
    argv, results, _ = run_lm_eval(lm_eval, CHAT_TASKS, CHAT_FLAGS, "chat", model_dir=chat_model)
    return build_references(argv, results, CHAT_TASKS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lm-eval",
        default=os.environ.get("LMEVAL_BIN", "/tmp/lmeval/bin/lm_eval"),
        help="lm_eval executable of the separate lm-eval 0.4.13 venv",
    )
    parser.add_argument("--only", choices=["all", "chat"], default="all", help="which reference runs to make")
    args = parser.parse_args()
    python = str(Path(args.lm_eval).with_name("python"))
    if not (MODEL_DIR / "model.safetensors").exists():
        sys.exit(
            f"missing {MODEL_DIR}; build it first: python -m evalkit.testing.tinymodel {MODEL_DIR.relative_to(REPO)}"
        )
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m;print(m.version('lm_eval'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != LM_EVAL_VERSION:
        sys.exit(f"expected lm-eval {LM_EVAL_VERSION}, found {version}")

    chat_refs = make_chat_reference(args.lm_eval)
    write(chat_refs, ".chat")
    if args.only == "chat":
        return

    argv, results, secs = run_lm_eval(args.lm_eval, TASKS, ["--seed", "1234"], "main")
    refs = build_references(argv, results, TASKS)

    d_argv, d_results, d_secs = run_lm_eval(args.lm_eval, TASKS, [], "default-seed")
    d_refs = build_references(d_argv, d_results, TASKS)
    same = {t: comparable(refs[t]) == comparable(d_refs[t]) for t in TASKS}
    for task in TASKS:
        refs[task]["default_seed_check"] = {"command": shlex.join(d_argv), "identical_outputs": same[task]}
    if not all(same.values()):
        print("WARNING: default-seed run differs for", [t for t, s in same.items() if not s])
        write({t: d_refs[t] for t, s in same.items() if not s}, ".defaultseed")

    # demo_mc pins num_fewshot: 0 in its YAML, which lm-eval 0.4.13 keeps (ignoring the CLI
    # value); demo_mc_fewshot (num_fewshot: 3) shows the override taking effect.
    f_tasks = ["demo_mc", "demo_mc_fewshot"]
    f_argv, f_results, f_secs = run_lm_eval(
        args.lm_eval, f_tasks, ["--seed", "1234", "--num_fewshot", "1"], "numfewshot1"
    )
    f_refs = build_references(f_argv, f_results, f_tasks)

    print("sanity checks:")
    sanity_check(refs, python)
    sanity_check(f_refs, python)
    write(refs)
    write(f_refs, ".numfewshot1")
    print(f"lm_eval wall time: main {secs:.1f}s, default-seed {d_secs:.1f}s, num_fewshot=1 {f_secs:.1f}s")


if __name__ == "__main__":
    main()
