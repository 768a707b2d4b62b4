"""The process :mod:`evalkit.code_exec` starts for one generated program: it runs the program in a
jail and decides pass/fail itself, from values the program returned.

Run as a script (``python -I -S code_child.py SPEC``, standard library only) with one JSON argument
the parent wrote. Three processes take part:

* **the judge** (this script's first process): it reads the candidate and its tests, reports
  "ready" and the verdict on the status pipe only it holds, and runs the *tests* itself. It never
  executes the candidate.
* **the warden** (forked by the judge): pid 1 of a new pid namespace, in new mount, network, IPC
  and UTS namespaces. It builds the program's file system (below), chroots into it and forks the
  program. When the warden ends, the kernel kills every process of its pid namespace: nothing the
  program started (setsid daemons included) outlives the run. The judge kills the warden at the
  end; the warden dies with the judge (``PR_SET_PDEATHSIG``), and the parent kills the judge's
  process group.
* **the program** (forked by the warden): user ``nobody`` with no groups, ``PR_SET_NO_NEW_PRIVS``,
  resource limits (which bind because it is not root), only its two pipes to the judge open. It
  executes the candidate, then serves the judge's calls.

The program's file system is an empty read-only tmpfs holding read-only binds of ``/usr`` (and
``/bin``, ``/lib``... as links or binds, as on the host), the interpreter's standard library and
site-packages (at their own paths, so imports work even when Python lives in a private home),
``/etc/ld.so.cache``, ``/dev/null``-like devices, and a small writable tmpfs as ``/tmp`` (its cwd,
``HOME`` and ``TMPDIR``). No ``/proc``, no user files, no other process visible.

The verdict: the test code runs in the judge with every top-level name the candidate defined bound
to a proxy (a standard-library module it imported is imported in the judge by name). A call through a proxy is a request on the pipe; the program answers with the value
*encoded by value* (``None``, bool, int, float, complex, str, bytes, bytearray and lists, tuples,
dicts, sets of them, subclasses reduced to their base type). Anything else comes back as an opaque
handle whose equality is identity: the program cannot hand the tests an object that equals
everything. So the tests see plain values the program computed, and "passed" means the tests ran
to the end in the judge. Writing to an inherited descriptor, calling the harness or returning a
forged object cannot change it. A program that exits, dies or sends garbage while the tests need
it fails.

When evalkit does not run as root (or ``isolate`` is off) there is no warden: the program runs as
the same user in a plain child process with the resource limits. The verdict is decided the same
way, and the judge is not dumpable, so a same-user program cannot attach to it.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
MAX_MESSAGE = 16 << 20
MAX_DEPTH = 100
BIG_NAME = 1 << 20  # a top-level name of the candidate bigger than this (encoded) is sent as a handle
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
GUARDED = (
    "system", "popen", "kill", "killpg", "fork", "forkpty", "posix_spawn", "posix_spawnp",
    "execv", "execve", "spawnv", "spawnve",
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir",
    "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid",
)  # fmt: skip


class TimedOut(BaseException):
    pass


class ProgramEnded(BaseException):
    """The program exited, died or broke the protocol while the tests needed it."""


class ProgramError(Exception):
    """An exception the program raised whose type is not one of Python's built-in ones."""


# ----- messages: a length, then JSON ----------------------------------------------------------


def send(fd: int, obj) -> None:
    data = json.dumps(obj, ensure_ascii=True, allow_nan=False).encode()
    view = memoryview(struct.pack(">Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ProgramEnded("the program ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int):
    (size,) = struct.unpack(">Q", _read_exactly(fd, 8))
    if size > MAX_MESSAGE:
        raise ProgramEnded(f"the program sent {size} bytes in one answer (at most {MAX_MESSAGE})")
    try:
        return json.loads(_read_exactly(fd, size))
    except (ValueError, RecursionError) as exc:
        raise ProgramEnded(f"the program sent an unreadable answer: {type(exc).__name__}") from None


# ----- values by value --------------------------------------------------------------------------


class Handle:
    """What the tests get for a value the program keeps (a function, a class, an instance).

    Calls and the few protocol methods below ask the program; equality is identity and truth is
    True, as for any object, and are never asked of the program."""

    __slots__ = ("_id", "_link")

    def __init__(self, ref: int, link: Link) -> None:
        self._id, self._link = ref, link

    def _ask(self, op: str, *args, **kwargs):
        return self._link.ask(op, self._id, list(args), kwargs)

    def __call__(self, *args, **kwargs):
        return self._ask("call", *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name)

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __len__(self):
        return self._ask("len")

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, key):
        return self._ask("getitem", key)

    def __contains__(self, item):
        return self._ask("contains", item)

    def __repr__(self) -> str:
        return str(self._ask("repr"))

    def __str__(self) -> str:
        return str(self._ask("str"))


def encode(value, keep, depth: int = 0):
    """``value`` as a JSON tree of tagged lists; ``keep(value)`` gives a handle id for the rest."""
    if depth > MAX_DEPTH:
        raise ValueError("a value nested too deeply to send")
    again = depth + 1
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", value is True]
    if isinstance(value, int):
        return ["i", format(int.__index__(value), "x")]
    if isinstance(value, float):
        return ["f", float.hex(float(value))]
    if isinstance(value, complex):
        return ["c", float.hex(value.real), float.hex(value.imag)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, (bytes, bytearray)):
        return ["a" if isinstance(value, bytearray) else "y", bytes(value).decode("latin-1")]
    if isinstance(value, (list, tuple, set, frozenset)):
        tag = "l" if isinstance(value, list) else "t" if isinstance(value, tuple) else "e"
        tag = "z" if isinstance(value, frozenset) else tag
        return [tag, [encode(v, keep, again) for v in value]]
    if isinstance(value, dict):
        return ["d", [[encode(k, keep, again), encode(v, keep, again)] for k, v in dict.items(value)]]
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return encode(value.item(), keep, depth)
    if isinstance(value, Handle):
        return ["r", value._id]
    return ["r", keep(value)]


def decode(tree, handle, depth: int = 0):
    """The value ``encode`` described; ``handle(id)`` makes what stands for a kept value. Anything
    malformed raises ValueError."""
    if depth > MAX_DEPTH or not isinstance(tree, list) or not tree or not isinstance(tree[0], str):
        raise ValueError("a malformed value")
    tag, rest, again = tree[0], tree[1:], depth + 1
    scalar = rest[0] if len(rest) == 1 else None
    if tag == "n" and not rest:
        return None
    if tag == "b" and isinstance(scalar, bool):
        return scalar
    if tag == "i" and isinstance(scalar, str) and len(scalar) <= 1 << 16:
        return int(scalar, 16)
    if tag == "f" and isinstance(scalar, str) and len(scalar) <= 64:
        return float.fromhex(scalar)
    if tag == "c" and len(rest) == 2 and all(isinstance(p, str) and len(p) <= 64 for p in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "s" and isinstance(scalar, str):
        return scalar
    if tag in ("y", "a") and isinstance(scalar, str):
        data = scalar.encode("latin-1")
        return bytearray(data) if tag == "a" else data
    if tag in ("l", "t", "e", "z") and isinstance(scalar, list):
        items = [decode(v, handle, again) for v in scalar]
        return {"l": list, "t": tuple, "e": set, "z": frozenset}[tag](items)
    if tag == "d" and isinstance(scalar, list):
        if not all(isinstance(p, list) and len(p) == 2 for p in scalar):
            raise ValueError("a malformed dict")
        return {decode(k, handle, again): decode(v, handle, again) for k, v in scalar}
    if tag == "r" and isinstance(scalar, int) and not isinstance(scalar, bool):
        return handle(scalar)
    raise ValueError(f"a malformed value (tag {tag!r})")


def _raise_as_program_did(kind: str, message: str, is_exception: bool):
    cls = getattr(builtins, kind, None)
    if not is_exception:
        raise ProgramEnded(f"the program raised {kind}: {message}")
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        try:
            error = cls(message)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError's five arguments
            error = ProgramError(f"{kind}: {message}")
        raise error
    raise ProgramError(f"{kind}: {message}")


class Link:
    """The judge's end of the pipes to the program."""

    def __init__(self, to_program: int, from_program: int) -> None:
        self.out, self.into = to_program, from_program
        self.handles: dict[int, Handle] = {}

    def handle(self, ref: int) -> Handle:
        if ref not in self.handles:
            self.handles[ref] = Handle(ref, self)
        return self.handles[ref]

    def value(self, tree):
        try:
            return decode(tree, self.handle)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise ProgramEnded(f"the program sent a malformed value: {exc}") from None

    def ask(self, op: str, ref: int, args: list, kwargs: dict):
        def refuse(value):
            raise TypeError(f"the tests passed a {type(value).__name__}; only plain values reach the program")

        request = {"op": op, "ref": ref, "args": encode(args, refuse), "kwargs": encode(kwargs, refuse)}
        send(self.out, request)
        reply = receive(self.into)
        if not isinstance(reply, dict):
            raise ProgramEnded("the program sent a malformed answer")
        if "raise" in reply:
            kind, message, is_exception = (reply["raise"] + [None, None, None])[:3]
            _raise_as_program_did(str(kind)[:200], str(message)[:2000], is_exception is True)
        if "value" not in reply:
            raise ProgramEnded("the program sent a malformed answer")
        value = self.value(reply["value"])
        changed = reply.get("args")
        if op == "call" and isinstance(changed, list) and len(changed) == len(args):
            for arg, tree in zip(args, changed, strict=True):  # lists, dicts, sets the function changed in place
                if tree is not None and isinstance(arg, (list, dict, set, bytearray)):
                    new = self.value(tree)
                    if type(new) is type(arg):
                        arg.clear()
                        arg.extend(new) if isinstance(arg, (list, bytearray)) else arg.update(new)
        return value


# ----- the program's side -----------------------------------------------------------------------


def _guard() -> None:
    """HF's reliability guard, as lm-eval's code_eval has it: calls that start processes, send
    signals or remove files raise PermissionError, so programs that need them fail as they do
    there. It is not the protection (a program can undo it); the jail is."""

    def blocked(name):
        def call(*args, **kwargs):
            raise PermissionError(name + " is disabled in evalkit's code sandbox")

        return call

    for name in GUARDED:
        if hasattr(os, name):
            setattr(os, name, blocked("os." + name))
    import _posixsubprocess

    _posixsubprocess.fork_exec = blocked("subprocess")


def by_value_or_handle(value, keep, most: int):
    """``encode(value)``, or a handle when that is over ``most`` characters (a big table the tests
    may never read is not copied; ``len`` and indexing still reach it)."""
    if not _smaller_than(value, most):
        return ["r", keep(value)]
    return encode(value, keep)


def _smaller_than(value, most: int) -> bool:
    """Whether ``value``'s plain parts add up to fewer than ``most`` units (one per character or
    byte, eight per other item): stops at the first ``most``, so a huge value costs nothing."""
    stack, total = [value], 0
    while stack and total < most:
        item = stack.pop()
        if isinstance(item, (str, bytes, bytearray)):
            total += len(item) * 2 + 8
        elif isinstance(item, dict):
            total += 8
            stack.extend(list(dict.keys(item))[: most - total])
            stack.extend(list(dict.values(item))[: most - total])
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 8
            stack.extend(list(item)[: most - total])
        else:
            total += 8
    return total < most


def serve(source: str, into: int, out: int) -> None:
    """In the program: execute the candidate, announce its names, answer calls until the pipe ends."""
    kept: list = []

    def keep(value) -> int:
        kept.append(value)
        return len(kept) - 1

    def described(exc: BaseException) -> list:
        try:
            message = str(exc)
        except BaseException:  # noqa: BLE001 - a hostile __str__
            message = ""
        return [type(exc).__name__, message[:2000], isinstance(exc, Exception)]

    names: dict = {}
    try:
        code = compile(source, "<candidate>", "exec", dont_inherit=True)
        del source
        _guard()
        exec(code, names)
        import types

        defined = {
            name: ["m", value.__name__]
            if isinstance(value, types.ModuleType)
            else by_value_or_handle(value, keep, BIG_NAME)
            for name, value in list(names.items())
            if not name.startswith("__")
        }
        send(out, {"defined": defined})
    except BaseException as exc:  # noqa: BLE001 - the program failed before its tests
        send(out, {"raise": described(exc)})
        return
    import operator

    ops = {
        "call": lambda target, args, kwargs: target(*args, **kwargs),
        "getattr": lambda target, args, kwargs: getattr(target, args[0]),
        "iter": lambda target, args, kwargs: iter(target),
        "next": lambda target, args, kwargs: next(target),
        "len": lambda target, args, kwargs: len(target),
        "getitem": lambda target, args, kwargs: target[args[0]],
        "contains": lambda target, args, kwargs: operator.contains(target, args[0]),
        "repr": lambda target, args, kwargs: repr(target),
        "str": lambda target, args, kwargs: str(target),
    }
    while True:
        try:
            request = receive(into)
        except ProgramEnded:
            return
        try:
            args = decode(request["args"], kept.__getitem__)
            kwargs = decode(request["kwargs"], kept.__getitem__)
            value = ops[request["op"]](kept[request["ref"]], args, kwargs)
            changed = [encode(a, keep) if isinstance(a, (list, dict, set, bytearray)) else None for a in args]
            reply = {"value": by_value_or_handle(value, keep, MAX_MESSAGE // 2), "args": changed}
        except BaseException as exc:  # noqa: BLE001 - the function's exception goes to the tests
            reply = {"raise": described(exc)}
        send(out, reply)


# ----- the jail ------------------------------------------------------------------------------------


class Kernel:
    """The few libc calls Python's os module lacks."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)

    def check(self, result: int, what: str) -> None:
        if result != 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def prctl(self, option: int, value: int) -> None:
        self.check(self.libc.prctl(option, value, 0, 0, 0), f"prctl({option})")

    def unshare(self, flags: int) -> None:
        self.check(self.libc.unshare(flags), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
        def c(text):
            return None if text is None else text.encode()

        self.check(self.libc.mount(c(source), c(target), c(fstype), flags, c(data)), f"mount {target}")


def _python_paths(site_dirs: list[str]) -> list[str]:
    """The folders the program's imports read: the standard library and site-packages."""
    found: list[str] = []
    for path in [*sys.path, *site_dirs]:
        path = os.path.realpath(path) if path else ""
        if os.path.isdir(path) and not any(path == f or path.startswith(f + os.sep) for f in found):
            found = [f for f in found if not f.startswith(path + os.sep)] + [path]
    return found


def build_root(kernel: Kernel, root: str, spec: dict) -> None:
    """In the warden: new namespaces, the program's file system at ``root``, chroot into it."""
    kernel.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)
    kernel.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.umask(0o022)
    # The program's /tmp first: Python itself may live under /tmp (a clone's venv), and its binds
    # then go inside it, in root-owned folders the program cannot change.
    uid, gid = spec["run_as"]
    os.mkdir(root + "/tmp")
    options = f"mode=0700,uid={uid},gid={gid},size={spec['tmp_bytes']}"
    kernel.mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options)

    def bind(source: str, is_dir: bool) -> None:
        target = root + source
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "wb").close()
        kernel.mount(source, target, None, MS_BIND | MS_REC)
        kernel.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)

    system = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    for path in system:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            bind(path, True)
    inside = [os.path.realpath(p) for p in system]
    for path in _python_paths(spec["site_dirs"]):
        if not any(path == f or path.startswith(f + os.sep) for f in inside):
            bind(path, True)
    if os.path.isfile("/etc/ld.so.cache"):
        bind("/etc/ld.so.cache", False)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            bind("/dev/" + name, False)
    kernel.mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755")
    os.chroot(root)
    os.chdir("/tmp")


def become_program(kernel: Kernel, spec: dict) -> None:
    """Drop to the program's user (when jailed) and set its limits; inherited by all it starts."""
    import resource

    if spec["run_as"] is not None:
        uid, gid = spec["run_as"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("could not switch user")
        os.environ.update(HOME="/tmp", TMPDIR="/tmp")
    kernel.prctl(PR_SET_NO_NEW_PRIVS, 1)
    kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for name, soft, hard in spec["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))


def warden(kernel: Kernel, spec: dict, source: str, into: int, out: int) -> None:
    """The forked child: jail (when asked), say so, then become or start the program."""
    try:
        kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        jailed = spec["run_as"] is not None
        if os.getppid() != (0 if jailed else spec["judge"]):  # the judge is outside a jail's pid namespace
            os._exit(1)
        if jailed:
            build_root(kernel, spec["root"], spec)
        send(out, {"jail": jailed, "uid": spec["run_as"][0] if jailed else os.getuid()})
    except BaseException as exc:  # noqa: BLE001 - reported to the judge as a setup error
        send(out, {"setup_error": f"{type(exc).__name__}: {exc}"})
        os._exit(70)
    if not jailed:
        become_program(kernel, spec)
        serve(source, into, out)
        os._exit(0)
    program = os.fork()
    if program == 0:
        try:
            become_program(kernel, spec)
        except BaseException:  # noqa: BLE001 - a program that cannot start fails
            os._exit(71)
        serve(source, into, out)
        os._exit(0)
    os.close(into)
    os.close(out)
    while True:  # pid 1: reap whatever is reparented here until the program itself ends
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == program:
            break
    os._exit(0)  # the kernel now kills everything left in this pid namespace


# ----- the judge ------------------------------------------------------------------------------------


def standard_module(rest: list):
    """A module the candidate imported, imported here too when it is the standard library's (the
    tests may use what the candidate's imports bound, as they do in one program); else None."""
    if len(rest) != 1 or not isinstance(rest[0], str) or rest[0].split(".")[0] not in sys.stdlib_module_names:
        return None
    import importlib

    try:
        return importlib.import_module(rest[0])
    except ImportError:
        return None


def run_tests(test: str, link: Link, timeout: float) -> str:
    """Run the tests against the program's names; "passed", "timed out" or "failed: ..."."""

    def alarm(signum, frame):
        raise TimedOut()

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            first = receive(link.into)
            if not isinstance(first, dict):
                raise ProgramEnded("the program sent a malformed answer")
            if "raise" in first:
                kind, message, _ = (list(first["raise"]) + [None, None, None])[:3]
                return f"failed: {str(message)[:2000]}" if message else f"failed: {str(kind)[:200]}"
            defined = first.get("defined")
            if not isinstance(defined, dict):
                raise ProgramEnded("the program sent a malformed answer")
            names = {}
            for name, tree in defined.items():
                if isinstance(tree, list) and tree[:1] == ["m"]:
                    module = standard_module(tree[1:])
                    if module is not None:
                        names[str(name)] = module
                else:
                    names[str(name)] = link.value(tree)
            exec(compile(test, "<test>", "exec", dont_inherit=True), names)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return "passed"
    except TimedOut:
        return "timed out"
    except BaseException as exc:  # noqa: BLE001 - a failed test, whatever it raised
        try:
            return f"failed: {exc}"
        except BaseException:  # noqa: BLE001
            return f"failed: {type(exc).__name__}"


def _close_all_but(*keep: int) -> None:
    """Close every descriptor above 2 except ``keep`` (the status pipe and the judge's ends)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def main() -> None:
    spec = json.loads(sys.argv[1])
    status = spec["status_fd"]

    def report(obj) -> None:
        try:
            os.write(status, (repr(obj) + "\n").encode())
        except OSError:
            pass

    try:
        kernel = Kernel()
        kernel.prctl(PR_SET_DUMPABLE, 0)  # no same-user ptrace or /proc/<pid>/mem of the judge
        kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spec["parent"]:
            os._exit(1)
        with open(spec["candidate"], encoding="utf-8", errors="surrogateescape") as f:
            source = f.read()
        with open(spec["test"], encoding="utf-8", errors="surrogateescape") as f:
            test = f.read()
        sys.path.extend(p for p in spec["site_dirs"] if p not in sys.path)
        if spec["run_as"] is not None:
            kernel.unshare(CLONE_NEWPID)  # the next child is pid 1 of a new pid namespace
        to_program, program_reads = os.pipe()[::-1]
        judge_reads, from_program = os.pipe()
        spec["judge"] = os.getpid()
        warden_pid = os.fork()
        if warden_pid == 0:
            _close_all_but(program_reads, from_program)
            warden(kernel, spec, source, program_reads, from_program)
            os._exit(0)
        os.close(program_reads)
        os.close(from_program)
        link = Link(to_program, judge_reads)
        jail = receive(judge_reads)
        if "setup_error" in jail:
            raise RuntimeError(jail["setup_error"])
    except BaseException as exc:  # noqa: BLE001 - the sandbox itself failed: not a candidate's failure
        report({"setup_error": f"{type(exc).__name__}: {exc}"})
        os._exit(70)
    report({"ready": True, "uid": jail["uid"], "net": bool(jail["jail"])})
    result = run_tests(test, link, spec["timeout"])
    try:
        os.kill(warden_pid, signal.SIGKILL)  # pid 1 of the jail: its whole pid namespace goes
        os.waitpid(warden_pid, 0)
    except OSError:
        pass
    report({"result": result[:2000]})
    os._exit(0)


if __name__ == "__main__":
    main()
