"""`vdvl report`: one self-contained HTML page for a run, its active set, stores, probes and OOD results."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import out, print_json


def report(
    run: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint file."),
    out_file: Path = typer.Option(..., "--out", help="The HTML file to write (self-contained: open it offline, "
                                  "print it, mail it)."),
    active: Optional[Path] = typer.Option(None, "--active", help="ACTIVE.json from `vdvl analyze-kl`: the KL "
                                          "analysis, and the pruning sweep when --sweep recorded one."),
    stores: Optional[List[Path]] = typer.Option(None, "--store", help="A store from `vdvl encode` (repeat the "
                                                "flag for several): sizes, provenance, verification."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="The JSON `vdvl probe --json` prints."),
    ood: Optional[Path] = typer.Option(None, "--ood", help="Out-of-distribution results: a JSON list of rows with "
                                       "exactly the keys score, ood_set, auroc, auprc, fpr80."),
    as_json: bool = typer.Option(False, "--json", help="Print what the report holds as JSON."),
) -> None:
    """Write one HTML page with the model, its KL analysis and pruning sweep, stores, probes and OOD results.

    Figures are embedded; the page needs no server and no network, and prints cleanly.

    Nothing is recomputed with the model: the page shows what the other commands recorded (each store is verified).
    """
    from ..report.page import write_report  # the library (numpy, matplotlib, jinja2) only when the command runs

    result = write_report(run, out=out_file, active=active, stores=stores or (), probe=probe, ood=ood)
    if as_json:
        print_json(result)
        return
    stores_text = "" if result["stores_ok"] is None else (
        "; every store intact" if result["stores_ok"] else "; a store FAILED verification (see the page)")
    figures = f"{result['figures']} figure{'s' if result['figures'] != 1 else ''}"
    out.print(f"wrote {result['out']} ({result['bytes'] / 1e3:,.0f} kB, {figures}; sections: "
              f"{', '.join(result['sections'])}){stores_text}")
