"""Checkpoint files and run directories.

A checkpoint is one ``torch.save`` file holding a plain dict (the *payload*): the
step, the model and training configs, model / EMA / optimizer state dicts, RNG states
and the data position, plus two marker keys, ``format`` and ``format_version``.

Two rules shape this module:

* **Loading never runs code.** Every load goes through ``torch.load(weights_only=True)``,
  so a checkpoint downloaded from somewhere else can at worst be refused. For that
  to work the trainer's own files must contain nothing the safe loader rejects, which
  :func:`save_checkpoint` checks *before* writing anything.
* **A crash never leaves a half-written checkpoint under a real name.** Files are
  written to a hidden temp file in the same directory, fsynced and then renamed over
  the final name (a rename within one directory is atomic on POSIX and Windows).

A run directory written by ``vdvl train --run-dir DIR`` looks like::

    DIR/config.toml
    DIR/metrics.jsonl                    one JSON object per log line (may be absent)
    DIR/checkpoints/ckpt-00001000.pt     step zero-padded to 8 digits
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ..core.atomic import atomic_file
from ..core.errors import CheckpointError, ConfigError
from .config import ModelConfig
from .vae import VAE, count_parameters

FORMAT_NAME = "vdvl-checkpoint"
FORMAT_VERSION = 1

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.pt")
_HASH_CHUNK = 1 << 20  # 1 MiB: large enough to be fast, small enough to stream multi-GB files

# Types a payload may contain. This is deliberately a subset of what the installed
# torch's weights-only loader accepts: newer torch releases also allow e.g. sets, but
# the project supports torch >= 2.2, whose allow-list is shorter, and checkpoints
# should load on every supported version.
_SCALAR_TYPES = (type(None), bool, int, float, str, bytes, torch.dtype)
_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_MAPPING_TYPES = (dict, collections.OrderedDict)
_SEQUENCE_TYPES = (list, tuple, torch.Size)
_ALLOWED_NAMES = "tensors, dicts, lists, tuples, str, bytes, int, float, bool or None"

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- saving


def _check_payload(obj: Any, where: str, on_path: set[int]) -> None:
    """Raise TypeError if ``obj`` holds anything the weights-only loader would refuse.

    ``where`` is the key path so far (``payload['optimizer']['state'][0]``), so the
    error points at the offending entry. Types are compared exactly, not with
    ``isinstance``: a subclass (an IntEnum, a defaultdict, a tensor subclass) pickles
    as a reference to its class, which the safe loader refuses.
    """
    kind = type(obj)
    if kind in _SCALAR_TYPES or kind in _TENSOR_TYPES:
        return
    if kind not in _MAPPING_TYPES and kind not in _SEQUENCE_TYPES:
        raise TypeError(
            f"checkpoint payload entry {where} has type {kind.__module__}.{kind.__qualname__}, which "
            f"torch.load(weights_only=True) cannot load; store only {_ALLOWED_NAMES}."
        )
    # Containers that contain themselves would recurse forever.
    if id(obj) in on_path:
        raise TypeError(f"checkpoint payload entry {where} contains itself (a reference cycle).")
    on_path.add(id(obj))
    try:
        if kind in _MAPPING_TYPES:
            for key, value in obj.items():
                if type(key) not in _SCALAR_TYPES and type(key) is not tuple:
                    raise TypeError(
                        f"checkpoint payload entry {where} has a key of type {type(key).__qualname__}; "
                        "keys must be str, int, float, bool, None or tuples."
                    )
                _check_payload(key, f"{where} key {key!r}", on_path)
                _check_payload(value, f"{where}[{key!r}]", on_path)
        else:
            for i, value in enumerate(obj):
                _check_payload(value, f"{where}[{i}]", on_path)
    finally:
        on_path.discard(id(obj))


def save_checkpoint(path: PathLike, payload: dict) -> Path:
    """Write ``payload`` (plus the format markers) to ``path`` atomically; return the path.

    The caller's dict is not modified. Parent directories are created. The data goes to
    a hidden ``.<name>.<random>.tmp`` file next to the target, is flushed and fsynced,
    and only then renamed onto ``path``, so readers see either the old file or the
    complete new one. On any exception (including KeyboardInterrupt) the temp file is
    removed and the exception propagates (an OSError as CheckpointError).

    Raises:
        CheckpointError: the file cannot be written (permissions, disk full, ...).
        TypeError: the payload is not a dict or contains a value that
            ``torch.load(weights_only=True)`` would refuse (the message names its key path).
    """
    if type(payload) not in _MAPPING_TYPES:
        raise TypeError(f"checkpoint payload must be a dict, not {type(payload).__qualname__}.")
    _check_payload(payload, "payload", set())  # before touching the disk
    full = {**payload, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}

    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {final} ({exc.strerror or exc}).") from exc
    # The hidden .tmp name keeps list_checkpoints (and shell globs) from seeing a save in progress.
    with atomic_file(final, what="checkpoint", error=CheckpointError, fsync=True) as f:
        try:
            torch.save(full, f)
        except RuntimeError as exc:
            # A write that fails (a full disk) makes torch's zip writer fail again as it closes,
            # with a RuntimeError ("unexpected pos") over the OSError: raise the OSError, which
            # atomic_file turns into one sentence naming the file and the reason.
            cause = _os_error_under(exc)
            if cause is None:
                raise
            raise cause from exc
    _fsync_directory(final.parent)
    return final


def _os_error_under(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``'s chain of causes and contexts, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself: without this a power cut can undo it on POSIX.

    Opening a directory is not possible on Windows (where the rename is durable
    enough), so failures are ignored; the data is already safely on disk either way.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def read_torch_file(path: PathLike, map_location: str | torch.device | None = "cpu", *, mmap: bool = False,
                    opened: BinaryIO | None = None) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one CheckpointError.

    A file that would need arbitrary code to unpickle is refused, never executed; a
    missing, unreadable, truncated or foreign file gets a sentence that names it.
    Also reads files written by other code bases (it checks nothing about the content).
    ``opened``: the file already opened (binary, at its start), read instead of ``path``,
    which then only names it in messages (no mmap).
    """
    p = Path(path)
    if opened is None and not p.exists():
        raise CheckpointError(f"Checkpoint file {p} does not exist.")
    if opened is None and p.is_dir():
        raise CheckpointError(f"Checkpoint file {p} is a directory, not a checkpoint file.")
    try:
        # mmap only works on the zip container that torch.save writes by default; a
        # legacy-format file is simply read instead.
        use_mmap = mmap and opened is None and zipfile.is_zipfile(p)
        payload = torch.load(opened if opened is not None else p, map_location=map_location, weights_only=True,
                             mmap=use_mmap)
    except OSError as exc:
        raise CheckpointError(f"Checkpoint file {p} cannot be read ({exc.strerror or exc}).") from exc
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler raises this both for forbidden globals (a file
        # that would run code) and for bytes that are not a pickle at all.
        raise CheckpointError(
            f"Checkpoint file {p} was refused by the safe loader because it is corrupt or "
            "contains objects other than tensors and plain data."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch reports damage as EOFError, RuntimeError, ValueError, KeyError, ...
        raise CheckpointError(
            f"Checkpoint file {p} is not a readable PyTorch file (it may be truncated or corrupt)."
        ) from exc

    return payload


def load_checkpoint(path: PathLike, map_location: str | torch.device | None = "cpu", *,
                    mmap: bool = False, opened: BinaryIO | None = None) -> dict:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(weights_only=True)``: a file that would need arbitrary code to
    unpickle is refused, never executed. With ``mmap=True`` tensors are memory-mapped
    instead of read (cheap inspection of large files).

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt or truncated, holds
            objects the safe loader refuses, is not a vdvl checkpoint, or has a newer
            format version than this package understands.
    """
    p = Path(path)
    payload = read_torch_file(p, map_location=map_location, mmap=mmap, opened=opened)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"Checkpoint file {p} is not a vdvl checkpoint (it lacks the '{FORMAT_NAME}' marker).")
    version = payload.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"Checkpoint file {p} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint file {p} has format version {version}, but this version of vdvae-latents "
            f"reads at most version {FORMAT_VERSION}, so upgrade the package to load it."
        )
    return payload


# --------------------------------------------------------------------------- run directories


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``run_dir/checkpoints/ckpt-<step:08d>.pt``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, not {step!r}")
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:08d}.pt"


def _scan(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoint files directly inside ``folder``, sorted by step.

    Only ``ckpt-<digits>.pt`` files count; temp files (``.ckpt-...tmp``), directories
    and anything else are ignored. Steps wider than 8 digits are fine.
    """
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def list_checkpoints(run_dir: PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint of a run, oldest first ([] if none)."""
    return _scan(Path(run_dir) / CHECKPOINT_DIR)


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The checkpoint with the highest step, or None when the run has none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths.

    Temp files are never touched: they may belong to a save in progress.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    found = list_checkpoints(run_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in doomed:
        path.unlink(missing_ok=True)  # tolerate another process having removed it
    return doomed


def resolve_checkpoint(path: PathLike) -> Path:
    """Turn what the user typed into a checkpoint file.

    A file is returned as is (its contents are checked when loaded); a run directory
    gives its latest checkpoint; so does the ``checkpoints`` folder itself.

    Raises:
        CheckpointError: the path does not exist, or is a directory without checkpoints.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"Checkpoint path {p} does not exist.")
    if not p.is_dir():
        return p
    found = list_checkpoints(p) or _scan(p)
    if not found:
        raise CheckpointError(
            f"Run directory {p} has no checkpoints (expected files like {CHECKPOINT_DIR}/ckpt-00001000.pt)."
        )
    return found[-1][1]


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints need little memory."""
    with open(path, "rb") as f:
        return _stream_sha256(f)


def _stream_sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


# A run's latest checkpoint can be rotated away (keep-last) between finding and opening it.
_OPEN_ATTEMPTS = 5


def open_checkpoint(path: PathLike) -> tuple[Path, BinaryIO]:
    """Open the checkpoint ``path`` names (a file, or a run directory's latest) for reading.

    A reader never races a writer: checkpoints appear by an atomic rename, and when the
    trainer deletes the file this found before it could be opened, the run's new latest is
    taken. Once open, the handle keeps the bytes readable even if the file is deleted, so a
    hash and the weights read from it describe the same file.
    """
    for _ in range(_OPEN_ATTEMPTS):
        resolved = resolve_checkpoint(path)
        try:
            return resolved, open(resolved, "rb")
        except FileNotFoundError:
            if resolved == Path(path):  # the user named this file: its absence is the answer
                raise CheckpointError(f"Checkpoint file {resolved} does not exist.") from None
        except IsADirectoryError:
            raise CheckpointError(f"Checkpoint file {resolved} is a directory, not a checkpoint file.") from None
        except OSError as exc:
            raise CheckpointError(f"Checkpoint file {resolved} cannot be read ({exc.strerror or exc}).") from exc
    raise CheckpointError(f"Run directory {path} replaced its latest checkpoint {_OPEN_ATTEMPTS} times while it "
                          "was being opened; try again.")


# --------------------------------------------------------------------------- models


def _model_config(payload: dict, path: Path) -> ModelConfig:
    """The payload's ModelConfig; any problem with it is the file's problem."""
    data = payload.get("model_config")
    if not isinstance(data, dict):
        raise CheckpointError(f"Checkpoint file {path} has no model configuration.")
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError, ValueError) as exc:
        reason = str(exc).rstrip(".")
        raise CheckpointError(f"Checkpoint file {path} has an invalid model configuration ({reason}).") from exc


def describe_mismatch(expected: dict[str, torch.Tensor], state: dict) -> str | None:
    """A short account of how ``state`` differs from the model's state dict, or None."""

    def first(keys: list[str], what: str) -> str:
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        return f"{what} '{keys[0]}'{more}"

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state
             and (not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)]
    parts = []
    if missing:
        parts.append(first(missing, "missing"))
    if unexpected:
        parts.append(first(unexpected, "unexpected"))
    if wrong:
        parts.append(first(wrong, "wrong shape for"))
    return ", ".join(parts) or None


def load_model(path: PathLike, *, ema: bool = True, device: str | torch.device = "cpu",
               sha256: str | None = None) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (or a run directory's latest one).

    With ``ema=True`` the EMA weights are used when the checkpoint has them (they are
    what sampling and evaluation want), otherwise the raw training weights. The model
    is returned in eval mode on ``device``. ``sha256``: the file's SHA-256 when the caller
    has already computed it (to check it against a record), so that a command hashes a
    checkpoint once; otherwise it is computed here.

    Returns:
        ``(model, info)`` with info keys ``path`` (str), ``sha256``, ``step``, ``preset``,
        ``model_config``, ``train_config``, ``format_version`` (None when absent from
        the file) and ``weights`` (``"ema"`` or ``"model"``: which were loaded).

    Raises:
        CheckpointError: as :func:`resolve_checkpoint` / :func:`load_checkpoint`, or the
            config is invalid, or the weights do not fit it.
    """
    resolved, opened = open_checkpoint(path)
    with opened:
        if sha256 is None:
            sha256 = _stream_sha256(opened)
            opened.seek(0)
        # Load to CPU, then move only the model: the optimizer state (twice the model's
        # size for Adamax) never needs to reach the accelerator.
        payload = load_checkpoint(resolved, map_location="cpu", opened=opened)
    cfg = _model_config(payload, resolved)

    use_ema = ema and payload.get("ema") is not None
    which = "ema" if use_ema else "model"
    state = payload.get(which)
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint file {resolved} has no model weights.")
    model = VAE(cfg)
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"Checkpoint file {resolved} has {which} weights that do not match its model configuration ({problem})."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied; the shapes were checked above
        raise CheckpointError(f"Checkpoint file {resolved} has {which} weights that cannot be loaded into the model.") from exc
    model.eval().to(device)

    info = {
        "path": str(resolved),
        "sha256": sha256,
        "step": payload.get("step"),
        "preset": payload.get("preset"),
        "model_config": payload.get("model_config"),
        "train_config": payload.get("train_config"),
        "format_version": payload.get("format_version"),
        "weights": which,
    }
    return model, info


# --------------------------------------------------------------------------- `vdvl info`


def _tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file, streamed so the file may be large."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return list(collections.deque(f, maxlen=n))


def last_metrics(run_dir: PathLike) -> dict | None:
    """The last complete JSON object in ``run_dir/metrics.jsonl``, or None.

    A run killed mid-write leaves a truncated last line; it (and any other line that
    does not parse as a JSON object) is skipped in favour of the line before it.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    for line in reversed(_tail_lines(path, 8)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return record
    return None


def _run_dir_of(given: Path, checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to, if it sits in one."""
    if checkpoint.parent.name == CHECKPOINT_DIR:
        return checkpoint.parent.parent
    return given if given.is_dir() else None


def describe_run(path: PathLike) -> dict[str, Any]:
    """Everything `vdvl info PATH` shows, for a run directory or a checkpoint file.

    The checkpoint is memory-mapped rather than read, so describing a large run is
    cheap. Keys: ``path`` (as given), ``run_dir`` (None for a file outside a run),
    ``checkpoint``, ``sha256``, ``size_bytes``, ``step``, ``preset``, ``format_version``,
    ``architecture``, ``parameters``, ``image_shape`` ([C, H, W]), ``output``,
    ``n_bits``, ``latent_layers``, ``latent_variates``, ``latent_elements``,
    ``has_ema``, ``checkpoints`` (steps of all the run's checkpoints), ``last_metrics``
    (the last line of metrics.jsonl as a dict, or None), ``model_config``,
    ``train_config`` and ``imported`` (for imported runs: the source kind and its files'
    paths and sha256; None otherwise).

    Raises:
        CheckpointError: as :func:`resolve_checkpoint`, :func:`load_checkpoint`, or
            an invalid model config in the file.
    """
    given = Path(path)
    checkpoint = resolve_checkpoint(given)
    payload = load_checkpoint(checkpoint, map_location="cpu", mmap=True)
    cfg = _model_config(payload, checkpoint)
    run_dir = _run_dir_of(given, checkpoint)
    return {
        "path": str(given),
        "run_dir": None if run_dir is None else str(run_dir),
        "checkpoint": str(checkpoint),
        "sha256": file_sha256(checkpoint),
        "size_bytes": checkpoint.stat().st_size,
        "step": payload.get("step"),
        "preset": payload.get("preset"),
        "format_version": payload.get("format_version"),
        "architecture": cfg.architecture,
        "parameters": count_parameters(cfg),
        "image_shape": [cfg.channels, cfg.image_size, cfg.image_size],
        "output": cfg.output,
        "n_bits": cfg.n_bits,
        "latent_layers": cfg.n_layers,
        "latent_variates": cfg.n_latent_variates,
        "latent_elements": cfg.n_latent_elements,
        "has_ema": payload.get("ema") is not None,
        "checkpoints": [] if run_dir is None else [step for step, _ in list_checkpoints(run_dir)],
        "last_metrics": None if run_dir is None else last_metrics(run_dir),
        "model_config": payload.get("model_config"),
        "train_config": payload.get("train_config"),
        "imported": _imported_summary(payload.get("imported")),
    }


def _imported_summary(source: Any) -> dict[str, Any] | None:
    """Where an imported run's weights came from: the kind and every source file's path and sha256
    (the full record, with the key mapping and hyper-parameters, stays in the checkpoint)."""
    if not isinstance(source, dict):
        return None
    files = []

    def visit(role: str, value: Any) -> None:
        if isinstance(value, dict) and "sha256" in value:
            files.append({"role": role, "path": value.get("path"), "sha256": value["sha256"]})
        elif isinstance(value, dict):
            for key, inner in value.items():
                visit(key, inner)

    for key, value in source.items():
        visit(key, value)
    return {"kind": source.get("kind"), "files": files}


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "save_checkpoint", "read_torch_file", "load_checkpoint", "checkpoint_path",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "resolve_checkpoint", "open_checkpoint",
    "file_sha256",
    "load_model", "describe_run", "last_metrics",
]
