"""`vdvl verify`: check every chunk of a store, and say exactly which rows are damaged.

A store passes when it is complete and every chunk of every row array is present, decodes,
matches the CRC-32 written with it and holds only finite values. The readers make the same
checks on the chunks they read (:class:`~vdvae_latents.stores.schema.ChunkChecker`); this reads all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .schema import ChunkChecker, error_summary, open_layout

#: Report keys that list damaged chunks, and how a sentence names them.
PROBLEMS = {"missing": "missing", "undecodable": "undecodable", "checksum_mismatches": "with a checksum mismatch",
            "nonfinite": "with NaN/inf values"}


def verify_store(path: str | os.PathLike[str], *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read and check every chunk of ``path``; returns the report `vdvl verify --json` prints.

    Keys: ``store``, ``format``, ``schema_version``, ``dtype``, ``n_rows``, ``chunk_rows``,
    ``n_chunks``, ``complete``, ``chunks_written``, ``unwritten_chunks`` (chunk indices),
    ``checksummed`` (False for schema-1 stores), ``missing``, ``undecodable``,
    ``checksum_mismatches`` and ``nonfinite`` (lists of ``{"array", "chunk", "rows": [start,
    stop]}``, ``nonfinite`` with ``count``), ``errors`` (what storing lost, per value array),
    ``ok`` (complete and nothing damaged) and ``summary`` (one sentence).
    A store whose structure cannot be read at all raises :class:`~vdvae_latents.stores.backends.StoreError`.
    """
    path = Path(path)
    backend, layout = open_layout(path, writable=False)
    try:
        checker = ChunkChecker(backend, layout, path)
        written = np.flatnonzero(checker.flags == 1).tolist()
        found = _find_damage(checker, written, progress)
        unwritten = np.flatnonzero(checker.flags != 1).tolist()
        damaged = sum(len(v) for v in found.values())
        report = {
            "store": str(path), "format": backend.format, "schema_version": layout.version, "dtype": layout.dtype,
            "n_rows": layout.n_rows, "chunk_rows": layout.chunk_rows, "n_chunks": layout.n_chunks,
            "complete": layout.complete, "chunks_written": len(written), "unwritten_chunks": unwritten,
            "checksummed": checker.checksums is not None, **found,
            "errors": error_summary(backend, layout), "ok": layout.complete and not unwritten and not damaged,
        }
    finally:
        backend.close()
    report["summary"] = _sentence(report)
    return report


def _find_damage(checker: ChunkChecker, written: list[int],
                 progress: Callable[[int], None] | None) -> dict[str, list[dict[str, Any]]]:
    """Every damaged chunk of every row array among the ``written`` chunks, by :data:`PROBLEMS` key."""
    found: dict[str, list[dict[str, Any]]] = {key: [] for key in PROBLEMS}
    for i in written:
        lo, hi = checker.layout.chunk_range(i)
        for name in checker.layout.row_arrays:
            where = {"array": name, "chunk": int(i), "rows": [lo, hi]}
            values, problem = checker.read(name, i, finite=False)
            if problem is None:
                bad = int(np.count_nonzero(~np.isfinite(values))) if values.dtype.kind == "f" else 0
                if bad:
                    found["nonfinite"].append({**where, "count": bad})
            elif "missing" in problem:
                found["missing"].append(where)
            elif "checksum" in problem:
                found["checksum_mismatches"].append(where)
            else:
                found["undecodable"].append({**where, "reason": problem})
        if progress is not None:
            progress(hi - lo)
    return found


def _sentence(report: dict[str, Any]) -> str:
    """One sentence: what is wrong with the store, naming the first damaged rows, or that it is fine."""
    path = report["store"]
    parts = []
    first = None
    for key, words in PROBLEMS.items():
        items = report[key]
        if items:
            parts.append(f"{len(items)} chunk{'s' if len(items) > 1 else ''} {words}")
            first = first or items[0]
    if report["unwritten_chunks"] or not report["complete"]:
        parts.append(f"{len(report['unwritten_chunks'])} of {report['n_chunks']} chunks not written "
                     f"(incomplete: `vdvl encode --resume` finishes it)")
    if not parts:
        checked = "checksums match" if report["checksummed"] else "no checksums (schema version 1)"
        return (f"{path} is complete and intact: {report['n_chunks']} chunks, {report['n_rows']:,} rows, "
                f"{checked}, all values finite.")
    where = (f" (first: rows {first['rows'][0]}-{first['rows'][1] - 1} of {first['array']})" if first else "")
    return f"{path} fails verification: {', '.join(parts)}{where}."
