"""One launch per output folder, held from preflight until the results are written.

Global rank 0 of a launch holds the folder through two files in it:

* ``.evalkit.lock``: an exclusive ``flock`` on it, which the kernel drops when the process dies, so
  a killed launch never leaves a live-looking lock on a local filesystem (and on network
  filesystems that carry ``flock`` across nodes);
* ``.evalkit.lease``: who holds it (launch id, host, pid, start) and when the holder last renewed it
  (every ``RENEW_SECONDS``). It answers where ``flock`` cannot: on a filesystem without it, or one
  whose locks stay on one node, a lease renewed in the last ``STALE_SECONDS`` by another host, or
  held by a live process of this host, keeps the folder taken.

A second launch is refused at once, in one line naming the launch that holds the folder. A lock
whose holder is gone (flock free and, for this host, its pid dead; for another host, its lease
not renewed for ``STALE_SECONDS``) is stale: the next launch, such as a ``--resume``, takes it over
and says so. A launch that created the folder and leaves it empty (refused input, a crash before
anything was written) removes it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import IO, Any

from evalkit.errors import UsageError, say
from evalkit.report import write_json_atomic

LOCK = ".evalkit.lock"
LEASE = ".evalkit.lease"
RENEW_SECONDS = 10.0
STALE_SECONDS = 60.0
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # the filesystem has no flock


def new_launch_id() -> str:
    """Names a launch: its start time and a random tail (its shard files carry it)."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe(lease: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("started", 0)))
    return f"launch {lease.get('launch', '?')} (host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, started {started})"


class OutputLock:
    """The folder's lock for this launch; only the holder (global rank 0) touches the files."""

    def __init__(self, output: Path, *, holder: bool) -> None:
        self.output = output
        self.holder = holder
        self.launch = new_launch_id()
        self.host = socket.gethostname()
        self._file: IO[bytes] | None = None
        self._created = False
        self._lease: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the folder, or refuse with who holds it (UsageError); no-op off the holder."""
        if not self.holder:
            return
        self._created = not self.output.exists()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot write to --output {self.output}: {exc.strerror or exc}; choose a writable folder"
            ) from None
        try:
            self._take()
        except OSError as exc:
            self.release()
            raise UsageError(
                f"cannot write to --output {self.output}: {exc.strerror or exc}; free space or choose another folder"
            ) from None
        except BaseException:
            self.release()
            raise

    def _take(self) -> None:
        self._file = (self.output / LOCK).open("a+b")
        flocked = True
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise UsageError(self._refusal(self._read_lease())) from None
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            flocked = False
        held = self._read_lease()
        if held is not None and held.get("launch") != self.launch:
            if self._alive(held, flocked):
                raise UsageError(self._refusal(held))
            say(f"evalkit: --output {self.output}: {describe(held)} ended without releasing the folder; taking it over")
        now = time.time()
        self._lease = {"launch": self.launch, "host": self.host, "pid": os.getpid(), "started": now, "renewed": now}
        write_json_atomic(self.output / LEASE, self._lease)
        self._renewer = threading.Thread(target=self._renew, name="evalkit-lease", daemon=True)
        self._renewer.start()

    def _alive(self, lease: dict[str, Any], flocked: bool) -> bool:
        if lease.get("host") == self.host:
            # flock held by us means its holder's process is gone; without flock, ask the kernel.
            return not flocked and isinstance(lease.get("pid"), int) and pid_alive(lease["pid"])
        return time.time() - float(lease.get("renewed", 0)) < STALE_SECONDS

    def _refusal(self, lease: dict[str, Any] | None) -> str:
        who = describe(lease) if lease else "another launch"
        return (
            f"--output {self.output} is in use by {who}; wait for it to end, or choose another folder "
            f"(a launch that died leaves the folder to the next one)"
        )

    def _read_lease(self) -> dict[str, Any] | None:
        try:
            lease = json.loads((self.output / LEASE).read_text())
        except (OSError, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            if self._lease is not None:
                self._lease["renewed"] = time.time()
                with contextlib.suppress(OSError):  # a full disk: the flock still holds the folder
                    write_json_atomic(self.output / LEASE, self._lease)

    def release(self) -> None:
        """Give the folder back; remove it when this launch created it and left nothing in it."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._lease is not None:
            held = self._read_lease()
            if held is not None and held.get("launch") == self.launch:
                with contextlib.suppress(OSError):
                    (self.output / LEASE).unlink()
            self._lease = None
        if self._file is not None:
            self._file.close()  # drops the flock
            self._file = None
        if self._created:
            self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        try:
            left = {p.name for p in self.output.iterdir()}
            if left <= {LOCK, LEASE, f"{LEASE}.tmp"} and not (self.output / LEASE).exists():
                for name in left:
                    (self.output / name).unlink()
                self.output.rmdir()
        except OSError:
            pass

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
