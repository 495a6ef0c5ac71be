"""Check inputs and outputs before the work that needs them.

A command that ranks a data set for a minute and then finds it cannot write its result has
thrown the minute away. Every command therefore checks its paths first, before it loads a
model or reads data: an input file that is missing, an output whose folder cannot be made or
written, a file where a folder is needed (or the reverse). Missing parent folders of an output
are created, as ``mkdir -p`` would; a run that then fails leaves at most empty folders, never
a file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UserError

KINDS = ("file", "folder", "either")


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the current folder at worst)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def prepare_output(path: str | os.PathLike[str], *, what: str, kind: str = "file",
                   error: type[Exception] = UserError) -> Path:
    """Make sure ``path`` can be written once the work is done; create its missing parent folders.

    ``what`` names the output in the message ("active set", "figure", "store"). ``kind`` is what
    the output will be: a ``file`` (an existing folder there is refused), a ``folder`` (an
    existing file there is refused: Zarr stores, run directories) or ``either``. Whether an
    existing output may be replaced is the caller's rule (``--overwrite``, ``--resume``); this
    checks only that the file system lets it be written. Raises ``error`` with one sentence.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise error(f"cannot write {what} {path}: it is a folder.")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise error(f"cannot write {what} {path}: it is a file, and a folder is needed there.")
    parent = path.parent
    found = _first_existing(parent)
    if not found.is_dir():
        raise error(f"cannot write {what} {path}: {found} is a file, not a folder.")
    if not os.access(found, os.W_OK | os.X_OK):
        raise error(f"cannot write {what} {path}: the folder {found} is not writable.")
    if found != parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise error(f"cannot create the folder {parent} for {what} {path} ({exc.strerror or exc}).") from exc
    return path


def require_input(path: str | os.PathLike[str], *, what: str, kind: str = "file",
                  error: type[Exception] = UserError) -> Path:
    """Make sure the input ``path`` exists, is a ``file`` / ``folder`` / ``either``, and is readable."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist.")
    if kind == "file" and path.is_dir():
        raise error(f"{what} {path} is a folder, not a file.")
    if kind == "folder" and not path.is_dir():
        raise error(f"{what} {path} is a file, not a folder.")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise error(f"{what} {path} is not readable.")
    return path


def require_matplotlib(flag: str = "--plot") -> None:
    """Refuse ``flag`` now when matplotlib is missing, rather than after the work it would plot."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"{flag} needs matplotlib: pip install 'vdvae-latents[plots]'.")


__all__ = ["prepare_output", "require_input", "require_matplotlib"]
