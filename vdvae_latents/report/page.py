"""`vdvl report` as a library call: one self-contained HTML page for one run and what was made from it.

    from vdvae_latents.report import write_report
    write_report("runs/c1", active="active.json", stores=["train.zarr", "test.zarr"],
                 probe="probe.json", out="report.html")

Inputs are checked first (:mod:`~vdvae_latents.report.inputs`, then the run's checkpoint,
the active set and each store are opened), so a wrong file stops the command in seconds
with one sentence, before a figure is drawn or a store verified. The page is rendered from
the Jinja2 template ``templates/report.html.j2`` and written atomically: a reader sees the
previous report or the complete new one.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path

from ..core.atomic import write_text
from .inputs import check_inputs

TEMPLATE = "report.html.j2"


def write_report(run: str | os.PathLike, *, out: str | os.PathLike, active: str | os.PathLike | None = None,
                 stores: list | tuple = (), probe: str | os.PathLike | None = None,
                 ood: str | os.PathLike | None = None) -> dict:
    """Write the HTML report of ``run`` to ``out``; returns what it holds.

    Parameters:
        run: a run directory (its latest checkpoint) or a checkpoint file.
        out: the HTML file to write (its folder must exist).
        active: ACTIVE.json from `vdvl analyze-kl` (the KL analysis and, when recorded, the pruning sweep).
        stores: stores from `vdvl encode` (sizes, provenance, verification).
        probe: the JSON `vdvl probe --json` prints.
        ood: out-of-distribution results in the schema of :mod:`~vdvae_latents.report.inputs`.

    Returns:
        A dict: ``out``, ``bytes`` (the page's size), ``sections`` (those present, in page order),
        ``figures`` (how many are embedded), ``checkpoint`` and ``stores_ok`` (whether every store
        verified intact; None without stores).

    Raises:
        UserError: an input that is missing, of the wrong kind or damaged, a run without
            checkpoints, an ``out`` that cannot be written (its missing folders are created), or no
            matplotlib.
    """
    inputs = check_inputs(run, out=out, active=active, stores=stores, probe=probe, ood=ood)
    from ..latents.active_set import ActiveSet
    from ..model.checkpoints import resolve_checkpoint
    from ..stores.reader import open_encodings
    from . import sections

    resolve_checkpoint(inputs.run)  # a run without checkpoints is refused here, before any work
    active_set = ActiveSet.load(inputs.active) if inputs.active is not None else None
    for path in inputs.stores:  # a path that is not a store is refused before any is verified
        open_encodings(path, allow_incomplete=True, verify=False).close()

    model = sections.model_section(inputs.run)
    sha = model["info"]["sha256"]
    context = {
        "model": model,
        "kl": sections.kl_section(active_set, inputs.active, sha) if active_set is not None else None,
        "stores": sections.store_section(inputs.stores, sha),
        "probe": sections.probe_section(inputs.probe, inputs.probe_path),
        "ood": sections.ood_section(inputs.ood, inputs.ood_path),
    }
    info = model["info"]
    step = f" at step {info['step']:,}" if isinstance(info["step"], int) else ""
    data = f" on {model['data']}" if model["data"] else ""
    context["title"] = f"{info['preset'] or Path(info['checkpoint']).name}{step}{data}"
    html = render(context)
    write_text(inputs.out, html, what="report")
    present = ["model"] + [name for name in ("kl", "stores", "probe", "ood") if context[name] is not None]
    stores_ok = all(s["ok"] for s in context["stores"]["rows"]) if context["stores"] else None
    return {"out": str(inputs.out), "bytes": len(html.encode("utf-8")), "sections": present,
            "figures": html.count('src="data:image/png;base64,'), "checkpoint": info["checkpoint"],
            "stores_ok": stores_ok}


def render(context: dict) -> str:
    """The page's HTML from the template and ``context`` (the sections of :mod:`~vdvae_latents.report.sections`)."""
    import jinja2

    from .. import __version__

    env = jinja2.Environment(loader=jinja2.PackageLoader("vdvae_latents.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_thousands, fixed=_fixed, fixed_g=lambda v: f"{v:g}", bytes=_bytes, ratio=_ratio)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env.get_template(TEMPLATE).render(version=__version__, written=written, **context)


def _thousands(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.0f}" if isinstance(value, float) else str(value)


def _fixed(value, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _bytes(value) -> str:
    from ..downstream.figures import format_bytes

    return format_bytes(float(value))


def _ratio(value) -> str:
    from .sections import ratio_text

    return ratio_text(float(value))


__all__ = ["write_report", "render", "TEMPLATE"]
