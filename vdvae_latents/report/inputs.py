"""What `vdvl report` reads, checked before any work: the output path, the JSON files and their kinds.

Everything here is plain Python (json, os, pathlib and the core's path checks), so a wrong
file is refused in milliseconds, before torch or the store libraries are imported, let alone
a figure drawn.
Every refusal is a :class:`~vdvae_latents.core.errors.UserError` naming the flag and the file.

The out-of-distribution file is what `vdvl ood --json` prints (its ``sets``, each with a
``metrics`` entry per score, become rows), or a JSON list of rows from any other tool::

    [{"score": "elbo", "ood_set": "mnist", "auroc": 0.91, "auprc": 0.88, "fpr80": 0.12}, ...]

``score`` (the OOD score's name) and ``ood_set`` (the out-of-distribution data) are
non-empty strings; ``auroc``, ``auprc`` and ``fpr80`` (the false-positive rate at 80% true
positives) are numbers in [0, 1]. No other keys are allowed, so a typo is an error rather
than a silently missing column.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.outputs import prepare_output, require_input, require_matplotlib

OOD_FIELDS = ("score", "ood_set", "auroc", "auprc", "fpr80")
OOD_TEXT_FIELDS = ("score", "ood_set")
PROBE_KEYS = ("model", "store", "n_train", "n_test", "seeds", "chance_accuracy", "rows")
PROBE_ROW_KEYS = ("name", "features", "bytes_per_image", "test_accuracy", "test_accuracy_std")


@dataclass(frozen=True)
class ReportInputs:
    """The checked inputs of one report: paths, and the small JSON files already parsed."""

    run: Path
    out: Path
    active: Path | None
    stores: tuple[Path, ...]
    probe: dict | None
    probe_path: Path | None
    ood: list[dict] | None
    ood_path: Path | None


def check_inputs(run: str | os.PathLike, *, out: str | os.PathLike, active: str | os.PathLike | None = None,
                 stores: list | tuple = (), probe: str | os.PathLike | None = None,
                 ood: str | os.PathLike | None = None) -> ReportInputs:
    """Check every input of a report without importing anything heavy; UserError on the first problem.

    ``out`` follows every command's rule (:func:`~vdvae_latents.core.outputs.prepare_output`): its
    missing folders are created, a folder in its place or an unwritable folder is refused.
    """
    out_path = prepare_output(Path(out).expanduser(), what="report")
    require_matplotlib("vdvl report")  # its figures; found without importing it
    run_path = require_input(Path(run).expanduser(), what="RUN", kind="either")
    active_path = None
    if active is not None:
        active_path = Path(active).expanduser()
        _expect_kind(active_path, "--active", read_json(active_path, "--active"), "active set")
    probe_path = Path(probe).expanduser() if probe is not None else None
    probe_report = None
    if probe_path is not None:
        probe_report = _expect_kind(probe_path, "--probe", read_json(probe_path, "--probe"), "probe report")
        check_probe_report(probe_report, probe_path)
    ood_path = Path(ood).expanduser() if ood is not None else None
    ood_rows = check_ood_rows(read_json(ood_path, "--ood"), ood_path) if ood_path is not None else None
    store_paths = tuple(require_input(Path(s).expanduser(), what="--store", kind="either") for s in stores)
    return ReportInputs(run=run_path, out=out_path, active=active_path, stores=store_paths, probe=probe_report,
                        probe_path=probe_path, ood=ood_rows, ood_path=ood_path)


def read_json(path: Path, flag: str) -> Any:
    """The parsed JSON of ``path``; a UserError naming ``flag`` when it is missing, unreadable or not JSON."""
    require_input(path, what=flag)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path} cannot be read ({getattr(err, 'strerror', None) or err}).") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} {path} is not valid JSON ({err.msg} at line {err.lineno}).") from None


def json_kind(value: Any) -> str:
    """Which of the toolkit's JSON outputs ``value`` looks like: its name in a sentence, or "unknown JSON"."""
    if isinstance(value, dict):
        if value.get("schema") == "vdvl-active-set":
            return "active set"
        if "rows" in value and "chance_accuracy" in value:
            return "probe report"
        if "kl_share_active" in value and "n_active" in value:
            return "analyze-kl result"
        if "bytes_on_disk" in value and "full_latents_bytes" in value:
            return "encode result"
        if "checksum_mismatches" in value and "chunks_written" in value:
            return "verify report"
        if "bits_per_dim" in value and "split" in value:
            return "eval result"
    if isinstance(value, list) and value and all(isinstance(r, dict) and "auroc" in r for r in value):
        return "OOD results"
    return "unknown JSON"


WHAT_TO_GIVE = {
    "active set": "the ACTIVE.json that `vdvl analyze-kl --out` writes",
    "probe report": "the JSON that `vdvl probe --json` prints",
}


def _expect_kind(path: Path, flag: str, value: Any, kind: str) -> Any:
    """``value`` when it is a ``kind``; otherwise a UserError saying what it is and what to give instead."""
    found = json_kind(value)
    if found != kind:
        raise UserError(f"{flag} {path} is {article_for(found)} {found}, not {article_for(kind)} {kind}: give "
                        f"{WHAT_TO_GIVE[kind]}.")
    return value


def article_for(words: str) -> str:
    return "an" if words[:1] in tuple("aeiouAEIOU") else "a"


def check_probe_report(report: dict, path: Path) -> None:
    """The keys of a `vdvl probe --json` report that the report page reads; UserError naming the first missing."""
    missing = [key for key in PROBE_KEYS if key not in report]
    rows = report.get("rows")
    if not missing and (not isinstance(rows, list) or not rows):
        missing = ["rows (at least one)"]
    for i, row in enumerate(rows if not missing else []):
        absent = [key for key in PROBE_ROW_KEYS if not isinstance(row, dict) or key not in row]
        if absent:
            missing = [f"rows[{i}].{absent[0]}"]
            break
    if missing:
        raise UserError(f"--probe {path} is an incomplete probe report: it has no '{missing[0]}'.")


def check_ood_rows(rows: Any, path: Path) -> list[dict]:
    """The rows of an OOD results file (the module's schema); UserError naming the first thing wrong."""
    expected = f"a JSON list of rows with exactly the keys {', '.join(OOD_FIELDS)}"
    if isinstance(rows, dict) and isinstance(rows.get("sets"), list):
        rows = _rows_of_ood_report(rows["sets"], path)
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--ood {path} is {article_for(json_kind(rows))} {json_kind(rows)}, not OOD results: "
                        f"give {expected}.")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(OOD_FIELDS):
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"--ood {path}: row {i} has {keys or 'no keys'}; each row needs exactly "
                            f"{', '.join(OOD_FIELDS)}.")
        for key in OOD_TEXT_FIELDS:
            if not isinstance(row[key], str) or not row[key].strip():
                raise UserError(f"--ood {path}: row {i} '{key}' must be a non-empty string, not {row[key]!r}.")
        for key in OOD_FIELDS[len(OOD_TEXT_FIELDS):]:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 1:
                raise UserError(f"--ood {path}: row {i} '{key}' must be a number in [0, 1], not {value!r}.")
    return rows


def _rows_of_ood_report(sets: list, path: Path) -> list:
    """`vdvl ood --json`'s sets as rows: one per (score, out-of-distribution set)."""
    try:
        return [{"score": score, "ood_set": f"{entry['data']}:{entry['split']}", **metrics}
                for entry in sets for score, metrics in entry["metrics"].items()]
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"--ood {path} looks like a `vdvl ood --json` report but its sets are damaged.") from None


__all__ = ["ReportInputs", "check_inputs", "read_json", "json_kind", "check_probe_report",
           "check_ood_rows", "OOD_FIELDS"]
