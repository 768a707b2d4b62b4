"""evalkit against lm-eval 0.4.13 (``--model hf``): speed and per-request parity, side by side.

What runs: a ~18M-parameter Llama (fp32, random seeded weights, a byte-level BPE tokenizer trained
with evalkit.testing.tinymodel on the benchmark's own text) on three plain lm-eval YAML tasks with local,
synthetic, seeded jsonl data, grouped under the tag ``bench`` (1,860 requests):

- ``bench_mc_fewshot``: ARC-like multiple choice, 4 choices of 5-10 words, 5-shot, 300 docs;
- ``bench_arith``: "What is 37 plus 58?" with 4 numeric choices, 3-shot, 150 docs;
- ``bench_ppl``: wikitext-like rolling loglikelihood, 60 docs of 150-600 words.

Model and tasks are cached in REPO/.bench (``rm -rf .bench`` rebuilds them). Every
configuration runs ``--repeats`` times, interleaved so machine noise hits all of them alike, and
the tables show medians. Per configuration:

- command wall s: ``time.monotonic()`` around the whole command (start-up, imports, model load,
  request building, model calls, scoring, writing results);
- model calls s: the slowest process's time in the model's request methods. lm-eval runs through
  ``benchmarks/lmeval_timed.py``, which times ``HFLM.loglikelihood``, ``loglikelihood_rolling``
  and ``generate_until`` and then calls lm-eval's own CLI with the same flags; evalkit reports
  ``throughput.per_rank[].seconds`` (its executor loop) in results.json. Both include tokenizing,
  batching and the forward passes; the boundaries are close, not identical.

Launchers: 1 process is plain ``python``; N processes is ``python -m torch.distributed.run
--standalone --nproc_per_node=N`` for both tools. lm-eval's HFLM splits requests over processes
only when it counts more than one CUDA device (``gpus = torch.cuda.device_count()`` gates its
data-parallel branch), so on a CPU-only machine torchrun starts N processes that each evaluate
every request (rank 0 of world size 1 each); the table says so. ``accelerate launch --cpu
--num_processes 2`` is no alternative: without an MPI hostfile it starts a single process.

Threads are left as each tool sets them: neither lm-eval nor evalkit calls
``torch.set_num_threads``, so 1 process uses torch's default (one intra-op thread per physical
core: 2 on the 2-core development machine), and torchrun with N > 1 sets ``OMP_NUM_THREADS=1``
(1 thread per process) unless it is already set. lm-eval's counts are measured and printed.
All runs get TOKENIZERS_PARALLELISM=false, HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1 and a
datasets cache in .bench that an untimed evalkit run fills (with evalkit's task index) first.

Parity: the 1-process runs' per-request loglikelihoods (lm-eval's ``samples_*.jsonl`` against
evalkit's ``samples_<task>.jsonl``), matched by task, doc_id and request position, must have
identical request arguments and agree within 1e-4, or within 1e-6 relative for large values (a
rolling document's fp32 sum reaches ~-7,000 nats, where one fp32 step is ~5e-4); otherwise the
script exits 1 after the tables. Per task it prints the largest absolute and relative difference.

One repeat of all four configurations takes about 20-30 minutes on the 2-core development
machine, most of it lm-eval's.

``--suite mmlu`` runs lm-eval's own ``mmlu`` group instead (its installed YAMLs, unchanged) at
``--num_fewshot 5`` / ``--num-fewshot 5``, on a synthetic ``cais/mmlu`` in the hub layout written
by tests/library_data.py (``--mmlu-docs`` test docs per subject, 4 by default: 228 docs, 912
requests) into .bench, which is the working folder of both tools so ``load_dataset`` finds it.
mmlu's ``first_n`` few-shot sampler gives every doc of a subject the same five examples, the
prefix evalkit computes once per run of docs.

    python benchmarks/vs_lmeval.py [--repeats 1] [--batch-size 8] [--only both] [--nproc 1,2]
                                   [--json PATH] [--suite bench|mmlu] [--mmlu-docs 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / ".bench"
MODEL_DIR = BENCH / "llama-18m"
TASKS_DIR = BENCH / "tasks"
RUNS_DIR = BENCH / "runs"
DATASETS_CACHE = BENCH / "datasets-cache"
LMEVAL_TIMED = REPO / "benchmarks" / "lmeval_timed.py"
TAG = "bench"
TOLERANCE = 1e-4  # per request, absolute ...
REL_TOLERANCE = 1e-6  # ... or relative: fp32 keeps ~7 digits, and a rolling sum reaches ~-7,000
SEED = 1234
MAX_POSITIONS = 1024
TOOLS = {"lmeval": "lm-eval 0.4.13", "evalkit": "evalkit"}


# --------------------------------------------------------------------------------------------
# Synthetic, seeded task data
# --------------------------------------------------------------------------------------------

NAMES = """Alder Brisk Corran Dunmore Elswick Farrow Glenholt Harwick Ivel Kelvar Lanton Merrow
Norcott Orwell Penwick Redmere Stanhope Thornby Ulver Wexcombe Yarrow Ashby""".split()
PLACES = """village harbour valley market library bridge mill castle garden station river forest
farm school museum canal chapel workshop""".split()
NOUNS = """lantern farmer teacher engine basket letter window river stone record map wagon bell
clock rope ladder candle kettle boat field storm road tower merchant painter sailor baker student
doctor seed root leaf cloud shadow mirror magnet battery wire plant animal bird fish insect rock
metal glass water sand salt sugar ice""".split()
ADJECTIVES = """small old bright heavy quiet narrow wooden copper distant careful warm cold broken
green early hidden steady rough smooth tall famous simple strong gentle""".split()
PAST_VERBS = """carried moved repaired painted measured found lifted cooled heated crossed opened
closed filled covered followed reached pushed pulled collected watched""".split()
BASE_VERBS = """carry move repair measure find lift cool heat cross open fill cover follow reach
push pull collect protect change explain""".split()
PREPOSITIONS = "near behind across under beside above inside through along around".split()
TIMES = [
    "in the spring",
    "during the winter",
    "after the storm",
    "before dawn",
    "every morning",
    "at the end of summer",
    "in the autumn",
    "on market day",
]
DETERMINERS = ["the", "one", "each", "every", "that", "this"]


def _clause(rng: random.Random) -> str:
    """One declarative clause, 7-14 words, lower-case."""
    c = rng.choice
    patterns = [
        f"{c(DETERMINERS)} {c(ADJECTIVES)} {c(NOUNS)} {c(PREPOSITIONS)} the {c(PLACES)} "
        f"{c(PAST_VERBS)} the {c(NOUNS)} {c(TIMES)}",
        f"the {c(NOUNS)} of the {c(ADJECTIVES)} {c(PLACES)} {c(PAST_VERBS)} {c(DETERMINERS)} {c(NOUNS)} "
        f"{c(PREPOSITIONS)} the {c(NOUNS)}",
        f"{c(NAMES)} {c(PAST_VERBS)} the {c(ADJECTIVES)} {c(NOUNS)} {c(PREPOSITIONS)} the {c(PLACES)}",
    ]
    return c(patterns)


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    return text[0].upper() + text[1:] + "."


def _question_tail(rng: random.Random) -> str:
    c = rng.choice
    return c(
        [
            f"Which of the following would most likely {c(BASE_VERBS)} the {c(ADJECTIVES)} {c(NOUNS)}?",
            f"What is the best reason that the {c(NOUNS)} {c(PAST_VERBS)} the {c(NOUNS)}?",
            f"Which {c(NOUNS)} {c(PAST_VERBS)} the {c(ADJECTIVES)} {c(NOUNS)} {c(PREPOSITIONS)} the {c(PLACES)}?",
        ]
    )


def _mc_question(rng: random.Random) -> str:
    """Context sentences and a question, 15-40 words in all."""
    while True:
        target = rng.randint(15, 40)
        sentences: list[str] = []
        while sum(len(s.split()) for s in sentences) < target - 12:
            sentences.append(_sentence(rng))
        text = " ".join([*sentences, _question_tail(rng)])
        if 15 <= len(text.split()) <= 40:
            return text


def _mc_choice(rng: random.Random) -> str:
    """An answer phrase of 5-10 words."""
    c = rng.choice
    extras = [
        lambda: f"{c(PREPOSITIONS)} the {c(PLACES)}",
        lambda: c(TIMES),
        lambda: f"and the {c(NOUNS)}",
        lambda: f"of {c(NAMES)}",
    ]
    while True:
        words = f"the {c(ADJECTIVES)} {c(NOUNS)}".split()
        target = rng.randint(5, 10)
        while len(words) < target:
            words += c(extras)().split()
        if 5 <= len(words) <= 10:
            return " ".join(words)


def _distinct(make: Callable[[], Any], n: int) -> list[Any]:
    values: list[Any] = []
    while len(values) < n:
        value = make()
        if value not in values:
            values.append(value)
    return values


def mc_docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [
        {"question": _mc_question(rng), "choices": _distinct(lambda: _mc_choice(rng), 4), "answer": rng.randrange(4)}
        for _ in range(n)
    ]


def arith_docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    docs = []
    for _ in range(n):
        op = rng.choice(["plus", "minus", "times"])
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        else:
            a, b = rng.randint(10, 99), rng.randint(2, 99)
            if op == "minus":
                a, b = max(a, b), min(a, b)
            value = a + b if op == "plus" else a - b
        wrong = _distinct(lambda v=value: v + rng.choice([d for d in range(-10, 11) if d and v + d >= 0]), 3)
        choices = [value, *wrong]
        rng.shuffle(choices)
        docs.append(
            {"question": f"What is {a} {op} {b}?", "choices": [str(x) for x in choices], "answer": choices.index(value)}
        )
    return docs


def ppl_docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Wikitext-like articles: a title, then paragraphs; 150-600 words each."""
    docs = []
    for page in range(n):
        target = rng.randint(150, 600)
        paragraphs: list[str] = []
        words = 0
        while words < target:
            paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
            paragraphs.append(paragraph)
            words += len(paragraph.split())
        title = f"{rng.choice(NAMES)} {rng.choice(PLACES).title()}"
        docs.append({"page_id": page, "text": f"= {title} =\n\n" + "\n\n".join(paragraphs) + "\n"})
    return docs


# name -> (doc builder, number of docs, seed)
DATA_FILES: dict[str, tuple[Callable[[random.Random, int], list[dict[str, Any]]], int, int]] = {
    "mc_train": (mc_docs, 40, SEED + 1),
    "mc_test": (mc_docs, 300, SEED + 2),
    "arith_train": (arith_docs, 30, SEED + 3),
    "arith_test": (arith_docs, 150, SEED + 4),
    "ppl_test": (ppl_docs, 60, SEED + 5),
}

MC_METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _data_files(data: Path, splits: dict[str, str]) -> str:
    lines = ["dataset_path: json", "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {json.dumps(str(data / f'{name}.jsonl'))}" for split, name in splits.items()]
    return "\n".join(lines) + "\n"


def _mc_yaml(task: str, data: Path, prefix: str, shots: int, description: str) -> str:
    return (
        f"tag:\n  - {TAG}\ntask: {task}\n"
        + _data_files(data, {"train": f"{prefix}_train", "test": f"{prefix}_test"})
        + "output_type: multiple_choice\ntraining_split: train\nfewshot_split: train\ntest_split: test\n"
        + f"description: {json.dumps(description)}\n"
        + 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: answer\n'
        + f"num_fewshot: {shots}\n{MC_METRICS}metadata:\n  version: 1.0\n"
    )


def task_yamls(data: Path) -> dict[str, str]:
    ppl = (
        f"tag:\n  - {TAG}\ntask: bench_ppl\n"
        + _data_files(data, {"test": "ppl_test"})
        + 'output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ""\ndoc_to_target: text\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        + "metadata:\n  version: 1.0\n"
    )
    return {
        "bench_mc_fewshot.yaml": _mc_yaml(
            "bench_mc_fewshot", data, "mc", 5, "The following are multiple choice questions about everyday things.\n\n"
        ),
        "bench_arith.yaml": _mc_yaml("bench_arith", data, "arith", 3, "The following are arithmetic questions.\n\n"),
        "bench_ppl.yaml": ppl,
    }


def _write_if_changed(path: Path, text: str) -> None:
    """Keep the file (and its mtime, which the datasets cache keys on) when nothing changed."""
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def write_tasks(folder: Path) -> Path:
    """The bench task folder: YAMLs with absolute data paths and byte-identical jsonl data."""
    data = folder / "data"
    for name, (build, n, seed) in DATA_FILES.items():
        docs = build(random.Random(seed), n)
        _write_if_changed(data / f"{name}.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    for name, text in task_yamls(data).items():
        _write_if_changed(folder / name, text)
    return folder


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(out_dir: Path, tasks_dir: Path) -> None:
    """evalkit's tokenizer training on the bench and demo text, then a seeded fp32 Llama."""
    from safetensors import safe_open

    from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_llama(
        tmp,
        corpus_from_tasks(tasks_dir) + corpus_from_tasks(DEFAULT_TASKS_DIR),
        seed=SEED,
        hidden_size=512,
        intermediate_size=1376,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
        max_positions=MAX_POSITIONS,
        init_std=0.02,
        newline_scale=1.0,
    )
    tmp.rename(out_dir)  # a half-written model is never mistaken for a cached one
    with safe_open(out_dir / "model.safetensors", "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    print(f"built {out_dir} ({params / 1e6:.1f}M parameters)", flush=True)


def ensure_model(out_dir: Path, tasks_dir: Path) -> Path:
    if not (out_dir / "config.json").exists():
        build_model(out_dir, tasks_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Running the tools
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    tool: str  # "lmeval" or "evalkit"
    nproc: int

    @property
    def label(self) -> str:
        return f"{self.tool}-{self.nproc}p"


@dataclass
class Measurement:
    wall_s: float
    model_s: float
    requests: list[int]  # per process (lm-eval) or per rank (evalkit)
    threads: list[int] | None = None  # torch intra-op threads per process, where known
    timings: dict[str, float] | None = None  # evalkit's phase breakdown, where reported
    output: str = ""


@dataclass
class Settings:
    model: Path
    tasks: Path | None  # an --include-path folder (None: the installed library)
    batch_size: int
    env: dict[str, str] = field(default_factory=dict)
    names: str = TAG  # --tasks
    flags: tuple[str, ...] = ()  # the same flags for both tools (spelled alike: --num_fewshot, --num-fewshot)
    cwd: Path = REPO  # where datasets.load_dataset looks for hub ids
    device: str = "cpu"  # --device for both tools


@dataclass(frozen=True)
class Suite:
    """What a benchmark run evaluates: ``bench`` (the tasks above) or ``mmlu`` (lm-eval's own mmlu
    group, 5-shot, on a synthetic cais/mmlu in the hub layout, ``--mmlu-docs`` test docs per subject)."""

    name: str

    def settings(self, args: argparse.Namespace, env: dict[str, str]) -> Settings:
        tasks = write_tasks(TASKS_DIR)  # the model's tokenizer is trained on the bench text either way
        model = ensure_model(MODEL_DIR, tasks)
        if self.name == "bench":
            return Settings(model, tasks, args.batch_size, env, device=args.device)
        sys.path.insert(0, str(REPO / "tests"))
        from library_data import write_mmlu

        data = BENCH / f"mmlu-{args.mmlu_docs}"
        if not (data / "cais" / "mmlu").exists():
            write_mmlu(data, test_docs=args.mmlu_docs)
        # A datasets cache of its own: datasets keys a local folder's prepared data by config name,
        # so folders of different sizes sharing one cache would load each other's docs.
        env = {**env, "HF_DATASETS_CACHE": str(data / "datasets-cache")}
        return Settings(
            model, None, args.batch_size, env, names="mmlu", flags=("fewshot=5",), cwd=data, device=args.device
        )


def tool_env() -> dict[str, str]:
    return {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(DATASETS_CACHE),
        # transformers 5 fetches hub kernels for a model loaded onto a GPU (lm-eval's hf model),
        # which fails offline; evalkit loads without them, so both tools run the same kernels.
        "USE_HUB_KERNELS": "NO",
    }


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def lmeval_command(config: Config, s: Settings, out: Path) -> list[str]:
    # lmeval_timed.py is `python -m lm_eval` with HFLM's request methods timed.
    return [
        *launcher(config.nproc),
        str(LMEVAL_TIMED),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={s.model},dtype=float32",
        "--tasks",
        s.names,
        *(["--include_path", str(s.tasks)] if s.tasks else []),
        *(["--num_fewshot", "5"] if "fewshot=5" in s.flags else []),
        "--batch_size",
        str(s.batch_size),
        "--device",
        s.device,
        "--log_samples",
        "--output_path",
        str(out),
    ]


def evalkit_command(config: Config, s: Settings, out: Path) -> list[str]:
    return [
        *launcher(config.nproc),
        "-m",
        "evalkit",
        "--model",
        str(s.model),
        "--tasks",
        s.names,
        *(["--include-path", str(s.tasks)] if s.tasks else []),
        *(["--num-fewshot", "5"] if "fewshot=5" in s.flags else []),
        "--batch-size",
        str(s.batch_size),
        "--dtype",
        "float32",
        "--device",
        s.device,
        "--output",
        str(out),
    ]


def command_for(config: Config, s: Settings, out: Path) -> list[str]:
    return (lmeval_command if config.tool == "lmeval" else evalkit_command)(config, s, out)


def run_logged(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> float:
    """Run ``cmd`` with its output in ``log``; wall seconds. Exits with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"command failed (rc={proc.returncode}): {shlex.join(cmd)}\n--- {log} ---\n{tail}")
    return wall


def measure(config: Config, s: Settings, repeat: int) -> Measurement:
    run_dir = RUNS_DIR / f"{s.names}-{config.label}-r{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    out = run_dir / "results"
    env = {**s.env, "LMEVAL_TIMING_DIR": str(run_dir / "timing")}
    wall = run_logged(command_for(config, s, out), env, run_dir / "log.txt", s.cwd)
    if config.tool == "lmeval":
        reports = [json.loads(p.read_text()) for p in sorted((run_dir / "timing").glob("rank*.json"))]
        if len(reports) != config.nproc:
            raise SystemExit(f"{config.label}: expected {config.nproc} timing reports, found {len(reports)}")
        return Measurement(
            wall_s=wall,
            model_s=max(r["seconds"] for r in reports),
            requests=[r["requests"] for r in reports],
            threads=[r["threads"] for r in reports],
            output=str(out),
        )
    results = json.loads((out / "results.json").read_text())
    per_rank = results["throughput"]["per_rank"]
    timings = results.get("timings")
    return Measurement(
        wall_s=wall,
        model_s=max(r["seconds"] for r in per_rank),
        requests=[r["requests"] for r in per_rank],
        timings={k: float(v) for k, v in timings.items() if k.endswith("_s")} if isinstance(timings, dict) else None,
        output=str(out),
    )


def warm_up(s: Settings) -> None:
    """An untimed evalkit run on 2 docs per task: fills the datasets cache and evalkit's task index."""
    out = RUNS_DIR / "warm-up"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*evalkit_command(Config("evalkit", 1), s, out / "results"), "--limit", "2"]
    print(f"warm-up (untimed): {shlex.join(cmd)}", flush=True)
    run_logged(cmd, s.env, out / "log.txt", s.cwd)


# --------------------------------------------------------------------------------------------
# Parity of per-request loglikelihoods
# --------------------------------------------------------------------------------------------

Key = tuple[str, int, int]  # task, doc_id, request position


@dataclass
class TaskParity:
    compared: int = 0
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    outside_tolerance: int = 0


@dataclass
class Parity:
    tasks: dict[str, TaskParity]
    only_lmeval: int
    only_evalkit: int
    argument_mismatches: int

    @property
    def compared(self) -> int:
        return sum(t.compared for t in self.tasks.values())

    @property
    def passed(self) -> bool:
        return (
            self.compared > 0
            and not any(t.outside_tolerance for t in self.tasks.values())
            and not (self.only_lmeval or self.only_evalkit or self.argument_mismatches)
        )


LMEVAL_SAMPLES = re.compile(r"samples_(?P<task>.+)_\d{4}-\d\d-\d\dT[\d.-]+\.jsonl$")
EVALKIT_SAMPLES = re.compile(r"samples_(?P<task>.+)\.jsonl$")


def _loglikelihood(resp: Any) -> float:
    """A logged response: [ll, is_greedy] for loglikelihood, ll for rolling (strings in both tools)."""
    return float(resp[0] if isinstance(resp, list) else resp)


def _requests(files: Iterator[Path], pattern: re.Pattern[str]) -> dict[Key, tuple[Any, float]]:
    """(arguments, loglikelihood) per request; a doc logged once per filter is read once."""
    found: dict[Key, tuple[Any, float]] = {}
    for path in files:
        match = pattern.search(path.name)
        if not match:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            args = sorted(row["arguments"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))
            for i, ((_, arg), resps) in enumerate(zip(args, row["resps"], strict=True)):
                found.setdefault((match["task"], row["doc_id"], i), (arg, _loglikelihood(resps[0])))
    return found


def compare(lmeval_out: Path, evalkit_out: Path) -> tuple[Parity, int, int]:
    """Parity of the two runs, and the request counts found in each one's samples."""
    theirs = _requests(lmeval_out.rglob("samples_*.jsonl"), LMEVAL_SAMPLES)
    ours = _requests(evalkit_out.glob("samples_*.jsonl"), EVALKIT_SAMPLES)
    tasks: dict[str, TaskParity] = {}
    for key in sorted(theirs.keys() & ours.keys()):
        want, have = theirs[key][1], ours[key][1]
        diff = abs(want - have)
        t = tasks.setdefault(key[0], TaskParity())
        t.compared += 1
        t.max_abs_diff = max(t.max_abs_diff, diff)
        t.max_rel_diff = max(t.max_rel_diff, diff / abs(want) if want else 0.0)
        t.outside_tolerance += not math.isclose(want, have, rel_tol=REL_TOLERANCE, abs_tol=TOLERANCE)
    parity = Parity(
        tasks=tasks,
        only_lmeval=len(theirs.keys() - ours.keys()),
        only_evalkit=len(ours.keys() - theirs.keys()),
        argument_mismatches=sum(theirs[k][0] != ours[k][0] for k in theirs.keys() & ours.keys()),
    )
    return parity, len(theirs), len(ours)


def print_parity(parity: Parity, n_lmeval: int, n_evalkit: int) -> None:
    print(f"\nparity (1 process): requests in samples: lm-eval {n_lmeval}, evalkit {n_evalkit}")
    print("| task | compared | max abs diff | max rel diff | outside tolerance |")
    print("|---|---|---|---|---|")
    for name, t in parity.tasks.items():
        print(f"| {name} | {t.compared} | {t.max_abs_diff:.2g} | {t.max_rel_diff:.2g} | {t.outside_tolerance} |")
    print(
        f"compared {parity.compared} loglikelihoods (tolerance {TOLERANCE:g} absolute or {REL_TOLERANCE:g} "
        f"relative); only lm-eval {parity.only_lmeval}, only evalkit {parity.only_evalkit}, "
        f"argument mismatches {parity.argument_mismatches}: {'PASS' if parity.passed else 'FAIL'}"
    )


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def median_of(runs: list[Measurement], attr: str) -> float:
    return statistics.median(getattr(m, attr) for m in runs)


def _ratio(num: float, den: float | None) -> str:
    return f"{num / den:.2f}x" if den else "-"


def print_table(results: dict[Config, list[Measurement]]) -> None:
    lmeval = {c.nproc: runs for c, runs in results.items() if c.tool == "lmeval"}
    print("| tool | processes | command wall s | model calls s | evalkit/lm-eval wall | evalkit/lm-eval model |")
    print("|---|---|---|---|---|---|")
    for config, runs in results.items():
        wall, model = median_of(runs, "wall_s"), median_of(runs, "model_s")
        base = lmeval.get(config.nproc) if config.tool == "evalkit" else None
        ratios = (
            (_ratio(wall, median_of(base, "wall_s")), _ratio(model, median_of(base, "model_s"))) if base else ("", "")
        )
        print(f"| {TOOLS[config.tool]} | {config.nproc} | {wall:.1f} | {model:.1f} | {ratios[0]} | {ratios[1]} |")
    evalkit = {c.nproc: runs for c, runs in results.items() if c.tool == "evalkit"}
    if lmeval and evalkit:
        n = max(evalkit)
        best_n = min(lmeval, key=lambda k: median_of(lmeval[k], "wall_s"))
        ours, theirs = median_of(evalkit[n], "wall_s"), median_of(lmeval[best_n], "wall_s")
        print(
            f"\nevalkit, {n} processes: {ours:.1f} s wall against lm-eval's best, {theirs:.1f} s "
            f"({best_n} process{'es' if best_n > 1 else ''}): {ours / theirs:.2f}x the time, "
            f"{theirs / ours:.2f}x as fast"
        )


def print_requests(results: dict[Config, list[Measurement]]) -> None:
    print("\nrequests per process (first repeat):")
    for config, runs in results.items():
        m = runs[0]
        note = ""
        if config.tool == "lmeval" and config.nproc > 1 and len(set(m.requests)) == 1:
            note = " (every process evaluates every request: no data-parallel split without CUDA devices)"
        threads = f", torch threads per process {m.threads}" if m.threads else ""
        print(f"  {TOOLS[config.tool]}, {config.nproc} process(es): {m.requests} = {sum(m.requests)}{threads}{note}")


def print_timings(results: dict[Config, list[Measurement]]) -> None:
    """evalkit's own phase breakdown, when its results.json has one."""
    phases = {c: runs for c, runs in results.items() if c.tool == "evalkit" and all(m.timings for m in runs)}
    if not phases:
        return
    keys = list(dict.fromkeys(k for runs in phases.values() for m in runs for k in m.timings or {}))
    print("\nevalkit phases (median of repeats, seconds):")
    print("| phase | " + " | ".join(f"{c.nproc} process(es)" for c in phases) + " |")
    print("|---|" + "---|" * len(phases))
    for key in keys:
        cells = []
        for runs in phases.values():
            values = [m.timings[key] for m in runs if m.timings and key in m.timings]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; medians are reported")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=["evalkit", "lmeval", "both"], default="both")
    parser.add_argument(
        "--nproc", default="1,2", type=lambda s: [int(x) for x in s.split(",")], help="process counts, e.g. 1,2"
    )
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--suite", choices=["bench", "mmlu"], default="bench", help="what both tools evaluate")
    parser.add_argument("--mmlu-docs", type=int, default=4, help="--suite mmlu: test docs per subject")
    parser.add_argument("--device", default="cpu", help="--device for both tools: cpu (default) or cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Suite(args.suite).settings(args, tool_env())
    tools = ["lmeval", "evalkit"] if args.only == "both" else [args.only]
    configs = [Config(tool, n) for tool in tools for n in args.nproc]
    for c in configs:
        print(f"{c.label}: {shlex.join(command_for(c, settings, RUNS_DIR / f'{c.label}-rN' / 'results'))}")
    warm_up(settings)

    results: dict[Config, list[Measurement]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for c in configs:
            m = measure(c, settings, repeat)
            results[c].append(m)
            print(f"[{repeat + 1}/{args.repeats}] {c.label}: wall {m.wall_s:.1f} s, model calls {m.model_s:.1f} s")

    print()
    print_table(results)
    print_requests(results)
    print_timings(results)

    parity: Parity | None = None
    by_config = {c: runs[0] for c, runs in results.items()}
    lm1, ek1 = by_config.get(Config("lmeval", 1)), by_config.get(Config("evalkit", 1))
    if lm1 and ek1:
        parity, n_lmeval, n_evalkit = compare(Path(lm1.output), Path(ek1.output))
        print_parity(parity, n_lmeval, n_evalkit)
    if args.json:
        raw = {
            "commands": {c.label: command_for(c, settings, Path("OUT")) for c in configs},
            "runs": {c.label: [asdict(m) for m in runs] for c, runs in results.items()},
            "parity": {**asdict(parity), "compared": parity.compared, "passed": parity.passed} if parity else None,
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if parity and not parity.passed else 0


if __name__ == "__main__":
    sys.exit(main())
