"""SIGTERM handled like Ctrl-C, so a job stopped either way cleans up the same way.

Python turns SIGINT into ``KeyboardInterrupt``, which unwinds the stack: an atomic write
removes its temporary file, a store stays as written so far with ``complete = False``
(``--resume`` finishes it), DataLoader workers are shut down. SIGTERM (``kill PID``, a job
scheduler's stop, torchrun tearing down a failed job) by default ends the process at once,
leaving whatever was half-written. :func:`sigterm_as_interrupt` raises :class:`Terminated`,
a ``KeyboardInterrupt``, instead, so every cleanup path written for one serves both; the
CLI then tells the two apart for its message and exit code (130 and 143, as shells do).

Training handles both signals itself (a checkpoint at the next step boundary) and installs
its own handlers for as long as it runs.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where Ctrl-C would have raised ``KeyboardInterrupt``."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`; the previous handler comes back after.

    Only the main thread may install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: a handler installed from C, which Python cannot re-install; the default is the
        # closest it can restore.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def interrupt_exit(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for the interrupt ``exc`` (SIGINT or SIGTERM).

    130 for SIGINT and 143 for SIGTERM, what a shell reports for a process those signals
    ended; the message adds any note the interrupted job left on the exception (say, how to
    resume the store it was writing).
    """
    code, word = (143, "terminated (SIGTERM)") if isinstance(exc, Terminated) else (130, "interrupted")
    notes = " ".join(getattr(exc, "__notes__", ()))
    return code, f"vdvl: {word}." + (f" {notes}" if notes else "")


def quiet_background_threads() -> None:
    """Drop what background threads report from here on: for a process ending on an interrupt,
    after which its one-line message must be the last word.

    The data loader's worker processes hand batches over through multiprocessing's resource
    sharer, a thread that reports a failed hand-over through ``sys.excepthook``; a worker
    stopped mid-hand-over while the process winds down made it print a traceback after the
    message (twice in eight suite runs on a loaded 2-core machine, in the test that sends
    `vdvl encode` a SIGTERM). Threads that
    end on an exception report through ``threading.excepthook``; both become no-ops."""
    sys.excepthook = _drop
    threading.excepthook = _drop


def _drop(*args) -> None:
    return None


@contextmanager
def resumable_writes(path, *, what: str) -> Iterator[None]:
    """Writes of ``path`` (a store) that stop early leave it incomplete: say so and how to finish it.

    An interrupt gets a note (``add_note``), so the CLI's one line and a notebook's traceback
    both tell the user to resume rather than start again; a failed write (a full disk, a file
    system turned read-only) becomes a :class:`UserError` naming the store and the reason.
    """
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.add_note(f"{path} is incomplete; run the same command with --resume to finish it.")
        raise
    except OSError as exc:
        raise UserError(f"cannot write {what} {path} ({exc.strerror or exc}), so it is incomplete; run the same "
                        f"command with --resume to finish it once that is fixed.") from exc
