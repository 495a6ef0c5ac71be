"""The report's sections as plain data: what each shows, read from files the toolkit already wrote.

Nothing here runs the model. The model section reads the checkpoint's metadata
(memory-mapped) and metrics.jsonl; the KL section and the pruning sweep read ACTIVE.json
(the sweep is there when `vdvl analyze-kl --sweep` made one); the store section reads each
store's attributes and verifies its chunks (a read of the store, no model); the probe and
OOD sections are the JSON files as given. Each function returns a dict for the template,
with its figures already encoded as ``data:`` URIs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.errors import ConfigError
from ..downstream.figures import probe_figure
from ..latents.active_set import ActiveSet
from ..latents.pruning import kl_figure
from ..model.checkpoints import METRICS_FILE, describe_run
from ..model.config import ModelConfig
from ..stores.reader import open_encodings
from ..stores.schema import disk_bytes
from ..stores.verify import verify_store
from ..train.loop import CONFIG_NAME
from ..train.run_config import load_run_config
from .figures import data_uri, store_sizes_figure, sweep_figure, training_figure

FLOAT16_BYTES, FLOAT32_BYTES = 2, 4


def loss_units(binary: bool) -> dict[str, str]:
    """The unit the toolkit reports a negative ELBO in, and the record keys holding it:
    nats per image for binary data (as the paper does), bits per dimension otherwise."""
    if binary:
        return {"unit": "nats/image", "key": "nats_per_image", "kl_key": "kl_nats_per_image",
                "recon_key": "recon_nats_per_image", "key_all": "nats_per_image_kl_all",
                "kl_all_key": "kl_all_nats_per_image"}
    return {"unit": "bits/dim", "key": "bits_per_dim", "kl_key": "kl_bits_per_dim", "recon_key": "recon_bits_per_dim",
            "key_all": "bits_per_dim_kl_all", "kl_all_key": "kl_all_bits_per_dim"}


# ----------------------------------------------------------------------------- the model
def model_section(run: Path) -> dict:
    """Preset, size, data and steps of the run's latest checkpoint, and its training curve."""
    info = describe_run(run)
    run_dir = Path(info["run_dir"]) if info["run_dir"] else None
    notes, data, planned_steps = [], None, None
    if run_dir is not None and (run_dir / CONFIG_NAME).is_file():
        try:
            config = load_run_config(run_dir / CONFIG_NAME)
            data, planned_steps = config.data, config.train.steps
        except ConfigError as err:
            notes.append(f"the run's {CONFIG_NAME} could not be read ({err})")
    units = loss_units(info["output"] == "bernoulli")
    train, val = read_metrics(run_dir / METRICS_FILE) if run_dir is not None else ([], [])
    figure = None
    if train or val:
        figure = data_uri(training_figure(train, val, unit=units["unit"], key=units["key"], kl_key=units["kl_key"]))
    else:
        notes.append(f"no training metrics ({METRICS_FILE}) beside the checkpoint, so no training curve")
    return {"info": info, "data": data, "planned_steps": planned_steps, "units": units, "figure": figure,
            "last_train": train[-1] if train else None, "last_val": val[-1] if val else None, "notes": notes}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's training records and validation records, each in step order.

    A resumed run logs again the steps after its last checkpoint: the later record of a step
    wins (it is the one the checkpoint's weights continued from). Lines that do not parse
    (a write cut short by a kill) are skipped.
    """
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    if not path.is_file():
        return [], []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            if isinstance(record.get("validation"), dict):
                val[record["step"]] = record
            else:
                train[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


# ----------------------------------------------------------------------------- KL analysis and the sweep
def kl_section(active: ActiveSet, path: Path, checkpoint_sha256: str) -> dict:
    """The active set of ACTIVE.json: its summary, per-layer table, the KL figure and its pruning sweep."""
    summary = active.summary()
    title = f"{Path(active.checkpoint).name or 'checkpoint'} on {active.data}:{active.split}"
    sweep = active.extra.get("sweep")
    rule_text = (f"the top {active.value * 100:g}% by average KL" if active.rule == "keep"
                 else f"average KL above {active.value:g} nats")
    return {"path": str(path), "summary": summary, "active": active, "rule_text": rule_text, "layers": summary["layers"],
            "resolutions": summary["resolutions"], "figure": data_uri(kl_figure(active, title=title)),
            "same_checkpoint": not active.checkpoint_sha256 or active.checkpoint_sha256 == checkpoint_sha256,
            "sweep": sweep_section(sweep, active) if sweep else None}


def sweep_section(sweep: dict, active: ActiveSet) -> dict:
    rows = sorted(sweep["rows"], key=lambda r: r["keep_pct"])
    units = loss_units("nats_per_image" in rows[0])
    keep_pct = active.value * 100 if active.rule == "keep" else None
    figure = sweep_figure(rows, unit=units["unit"], key=units["key"], key_all=units["key_all"], keep_pct=keep_pct,
                          split=sweep.get("split", "test"))
    full = next((r for r in rows if r["keep_pct"] >= 100), None)
    return {"split": sweep.get("split"), "n_images": sweep.get("n_images"), "rows": rows, "units": units,
            "full": full, "figure": data_uri(figure)}


# ----------------------------------------------------------------------------- stores
def store_section(paths: tuple[Path, ...], checkpoint_sha256: str) -> dict | None:
    """Each store's provenance, size beside the pixels and the full latents, and its verification."""
    if not paths:
        return None
    stores = [_store_row(path, checkpoint_sha256) for path in paths]
    bars, seen = [], set()
    for s in stores:
        bars.append((f"{s['name']} ({s['dtype']}, on disk)", s["bytes_per_image"], True))
    for s in stores:  # the references once per distinct model and data
        for label, size in ((f"raw pixels of {s['data']} (uint8)", s["pixel_bytes"]),
                            ("all latents, float16", s["full_float16_bytes"]),
                            ("all latents, float32", s["full_float16_bytes"] * 2)):
            if (label, size) not in seen:
                seen.add((label, size))
                bars.append((label, size, False))
    return {"rows": stores, "figure": data_uri(store_sizes_figure(bars))}


def _store_row(path: Path, checkpoint_sha256: str) -> dict:
    with open_encodings(path, allow_incomplete=True, verify=False) as enc:
        attrs = dict(enc.attrs)
        n_rows, n_features = enc.n_rows, enc.n_features
    cfg = ModelConfig.from_dict(attrs["model_config"])
    on_disk = disk_bytes(path)
    per_image = on_disk / max(n_rows, 1)
    pixels = cfg.channels * cfg.loss_size ** 2
    full16 = int(attrs.get("n_latent_scalars_total", cfg.n_latent_elements)) * FLOAT16_BYTES
    verified = verify_store(path)
    return {
        "name": path.name, "path": str(path), "data": attrs.get("data"), "split": attrs.get("split"),
        "rows": n_rows, "features": n_features, "kept": attrs.get("n_dims_kept"), "total": attrs.get("n_dims_total"),
        "granularity": attrs.get("granularity"), "kl_share": attrs.get("kl_share_kept"), "dtype": attrs.get("dtype"),
        "statistic": attrs.get("statistic"), "codec": attrs.get("codec"), "bytes_on_disk": on_disk,
        "bytes_per_image": per_image, "pixel_bytes": pixels, "full_float16_bytes": full16,
        "vs_pixels": pixels / per_image, "vs_full": full16 / per_image,
        "same_checkpoint": attrs.get("checkpoint_sha256") == checkpoint_sha256,
        "checkpoint_step": attrs.get("checkpoint_step"), "ok": verified["ok"], "verify": verified["summary"],
    }


# ----------------------------------------------------------------------------- probes and OOD
def probe_section(report: dict | None, path: Path | None) -> dict | None:
    if report is None:
        return None
    best = max(report["rows"], key=lambda r: r["test_accuracy"])
    return {"path": str(path), "report": report, "figure": data_uri(probe_figure(report)), "best": best["name"],
            "rows": report["rows"], "skipped": report.get("skipped", []), "notes": report.get("notes", [])}


def ood_section(rows: list[dict] | None, path: Path | None) -> dict | None:
    """OOD rows grouped by OOD set, best AUROC first within each (the order a reader compares scores in)."""
    if rows is None:
        return None
    ordered = sorted(rows, key=lambda r: (r["ood_set"], -r["auroc"], r["score"]))
    best = {}
    for row in ordered:
        best.setdefault(row["ood_set"], row["score"])
    return {"path": str(path), "rows": ordered, "best": best}


def ratio_text(ratio: float) -> str:
    """8.3 -> '8.3x smaller'; 0.5 -> '2.0x larger' (a store beside a reference size)."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    return f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.1f}x larger"


__all__ = ["model_section", "read_metrics", "kl_section", "sweep_section", "store_section", "probe_section",
           "ood_section", "loss_units", "ratio_text"]
