"""Errors that end a run with one line and exit code 2.

A user's mistake (bad flag, unknown task, missing file) is not a crash: it is reported as a
single line that says what is wrong and how to fix it, on every rank, with no traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
from collections.abc import Iterable

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """Bad input from the user. The message is shown as-is, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


class RunFailed(RuntimeError):
    """A run that cannot go on for a reason its message says in full (a server that stopped
    answering, after every retry): one line and exit code 1, no traceback; what finished is saved."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: BaseException | None) -> OSError | None:
    """The disk-full error (no space, or over quota) behind ``exc``, following its causes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(exc: OSError, output: object) -> str:
    """What a rank says when a disk filled: where, and how to go on."""
    where = f" writing {exc.filename}" if exc.filename else ""
    return (
        f"{exc.strerror or 'no space left on device'}{where}; free space for --output {output} "
        f"and rerun with --resume (finished results are saved)"
    )


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def raise_all(problems: list[str], where: str | None = None) -> None:
    """Report every problem found at once rather than one per attempt (after ``where: `` if given)."""
    if problems:
        raise UsageError(("" if where is None else f"{where}: ") + "; ".join(problems))


def say(line: str) -> None:
    """One line to stderr in a single write, so lines from several ranks never interleave."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line.rstrip("\n") + "\n").encode())


def one_line(exc: BaseException | str, lines: int | None = None, limit: int | None = None) -> str:
    """An exception's message on one line, for one-line errors.

    By default all of it, its whitespace and newlines folded. With ``lines``, only its first that
    many non-blank lines, each stripped, joined by spaces (a validation error's detail is on its
    second), or the exception's type name when it has no message. ``limit`` cuts the result to
    that many characters.
    """
    if lines is None:
        text = " ".join(str(exc).split())
    else:
        kept = [line.strip() for line in str(exc).splitlines() if line.strip()][:lines]
        text = " ".join(kept) or type(exc).__name__
    return text if limit is None else text[:limit]
