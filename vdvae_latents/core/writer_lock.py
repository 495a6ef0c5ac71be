"""One writer at a time: an exclusive lock on a run directory or a store, held for a process's life.

Two ``vdvl train`` processes on one run directory would each overwrite the other's
checkpoints and interleave ``metrics.jsonl``; two packs or encodes resuming one store would
write the same chunks. The writer therefore takes an advisory lock (a POSIX record lock,
``lockf``; ``msvcrt.locking`` on Windows) on a small lock file before it changes anything.
The operating system releases it when the process ends in any way, ``kill -9`` included, so
a lock is never stale. A record lock belongs to the process, not to the descriptor: the
data-loading workers a writer forks do not inherit it (with ``flock`` they would, and keep a
killed writer's lock for as long as they linger). Within one process the held locks are
remembered here, since record locks never conflict inside a process.

The file records who holds it, for the message the second writer gets.
A writer that finishes deletes it while still holding the lock, and a writer that locked a
file checks that it is still the one at that path (else it locks again): so two writers never
hold two different files of one name, and no lock file outlives its writer except after a
kill (where it is harmless: nobody holds it). Readers never take the lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

RUN_LOCK_NAME = ".vdvl-writer.lock"
_ATTEMPTS = 10
_HELD_HERE: set[str] = set()  # lock files this process holds (real paths)


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError on POSIX, PermissionError on Windows
        return False
    return True


def _still_at(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at ``path`` (not deleted or replaced)."""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _busy(what: str, target: Path, holder: str) -> UserError:
    return UserError(f"{what} {target} is being written by {holder}; wait for it to finish or stop it first.")


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file ('another process' if unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"process {int(info['pid'])} on {info['host']} (`{info['command']}`, since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class WriterLock:
    """The exclusive writer lock of ``target`` (a run directory or a store), kept in ``lock_file``.

    ``acquire`` either returns with the lock held or raises a UserError that names ``target``
    and the process holding it; ``release`` (or leaving the ``with`` block, or the process
    ending) gives it up.
    """

    def __init__(self, target: str | os.PathLike[str], lock_file: str | os.PathLike[str], *, what: str) -> None:
        self.target = Path(target)
        self.lock_file = Path(lock_file)
        self.what = what
        self._fd: int | None = None
        self._key = ""

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WriterLock:
        if self._fd is not None:
            return self
        key = os.path.realpath(self.lock_file)
        if key in _HELD_HERE:
            raise UserError(f"{self.what} {self.target} is already being written by this process.")
        for _ in range(_ATTEMPTS):
            fd = self._open()
            if not _try_lock(fd):
                holder = _holder(fd)
                os.close(fd)
                raise _busy(self.what, self.target, holder)
            if _still_at(fd, self.lock_file):
                break
            os.close(fd)  # its writer finished and deleted it between our open and our lock
        else:
            raise UserError(f"cannot lock {self.what} {self.target} for writing: its lock file "
                            f"{self.lock_file} keeps being replaced.")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode("utf-8"))
        self._fd, self._key = fd, key
        _HELD_HERE.add(key)
        return self

    def _open(self) -> int:
        try:
            return os.open(self.lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        except OSError as exc:
            raise UserError(f"cannot lock {self.what} {self.target} for writing "
                            f"({exc.strerror or exc}: {self.lock_file}).") from exc

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if fcntl is not None:  # deleted while held (Windows cannot delete an open file)
                try:
                    self.lock_file.unlink(missing_ok=True)
                except OSError:
                    pass  # a folder made read-only meanwhile: the file is harmless, nobody holds it
            os.close(fd)  # closing the descriptor releases the lock
            _HELD_HERE.discard(self._key)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_run_dir(run_dir: str | os.PathLike[str]) -> WriterLock:
    """Take the writer lock of a run directory (created if missing): ``vdvl train`` and ``vdvl import``."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run directory {run_dir} ({exc.strerror or exc}).") from exc
    return WriterLock(run_dir, run_dir / RUN_LOCK_NAME, what="run directory").acquire()


def check_run_dir_free(run_dir: str | os.PathLike[str]) -> None:
    """Refuse now, before torch is even imported, a run directory another process is writing.

    Only a fast answer for the command line: the writer still takes the lock itself
    (:func:`writing_run_dir`), since the run can be claimed between this check and then.
    """
    lock_file = Path(run_dir) / RUN_LOCK_NAME
    if os.path.realpath(lock_file) in _HELD_HERE:
        # Not probed: closing a probe's descriptor would drop this process's own record lock.
        raise UserError(f"run directory {Path(run_dir)} is already being written by this process.")
    try:
        fd = os.open(lock_file, os.O_RDWR | getattr(os, "O_BINARY", 0))
    except OSError:
        return  # no lock file (or none this process may open): nobody is writing, or the writer will say
    try:
        if not _try_lock(fd):
            raise _busy("run directory", Path(run_dir), _holder(fd))
    finally:
        os.close(fd)  # releases the probe's lock, if it got one


@contextmanager
def writing_run_dir(run_dir: str | os.PathLike[str]) -> Iterator[WriterLock]:
    """Hold a run directory's writer lock for a ``with`` block. A directory this created is
    removed again when the block fails before writing anything into it, so a refused
    ``vdvl train`` or ``vdvl import`` leaves no empty run behind."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    lock = lock_run_dir(run_dir)
    try:
        yield lock
    except BaseException:
        lock.release()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    lock.release()


def lock_store(store: str | os.PathLike[str]) -> WriterLock:
    """Take the writer lock of a store: a hidden file beside it, so that replacing the store
    (``--overwrite`` removes a Zarr folder) never removes the lock with it."""
    store = Path(store)
    return WriterLock(store, store.with_name(f".{store.name}.lock"), what="store").acquire()


__all__ = ["RUN_LOCK_NAME", "WriterLock", "check_run_dir_free", "lock_run_dir", "lock_store", "writing_run_dir"]
