"""Write a file so that readers see either the old one or the complete new one, never a part.

Every file the toolkit writes (checkpoints, active sets, figures, image grids, run
configs) goes through :func:`atomic_file`: the bytes go to a hidden temporary file beside
the target, which is renamed onto it only when the writer finished without an error.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


@contextmanager
def atomic_file(path: str | Path, *, what: str, error: type[Exception] = UserError,
                fsync: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary binary file for ``path``; on success rename it onto ``path``.

    The temporary file is ``.<name>.<random>.tmp`` in the target's folder: hidden (so
    globs and listings skip it), unique (two writers never share one) and on the same
    file system (so ``os.replace`` is atomic). It is created with ``O_EXCL`` and mode
    0o666, so the umask decides its permissions as for any new file (``mkstemp`` would
    force 0o600). ``fsync`` flushes the data to disk before the rename (checkpoints).

    On any exception, KeyboardInterrupt included, the temporary file is removed and the
    target is left as it was; an OSError (no such folder, permissions, disk full) becomes
    ``error("cannot write <what> <path> (<reason>).")``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise error(f"cannot write {what} {path} ({exc.strerror or exc}).") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"cannot write {what} {path} ({exc.strerror or exc}).") from exc
        raise


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """``fig.savefig`` atomically, in the format the suffix names (PNG without one)."""
    path = Path(path)
    with atomic_file(path, what="figure") as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    return path


def write_text(path: str | Path, text: str, *, what: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically; UserError naming ``what`` on failure."""
    with atomic_file(path, what=what) as f:
        f.write(text.encode("utf-8"))
    return Path(path)
