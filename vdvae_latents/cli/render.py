"""How the commands print their results on a terminal: tables and sentences, nothing computed.

Each function takes the dict a library call returned (the same dict ``--json`` prints) and
writes it to the console; the commands decide nothing here.
"""

from __future__ import annotations

from rich.table import Table

from .common import fmt, out


def presets(rows: list[dict]) -> None:
    table = Table(title="vdvl presets (paper = Table 3 parameter count)")
    table.add_column("name", no_wrap=True)
    for col in ("params", "paper", "image", "layers", "variates", "arch", "output"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        paper = f"{r['paper_parameters_m']}M" if "paper_parameters_m" in r else ""
        c, h, w = r["image_shape"]
        output = f"mol/{r['n_bits']}b" if r["output"] == "mol" else "bern"
        table.add_row(r["name"], f"{r['parameters'] / 1e6:.1f}M", paper, f"{c}x{h}x{w}",
                      str(r["latent_layers"]), str(r["latent_variates"]), r["architecture"], output)
    out.print(table)


def model(result: dict) -> None:
    out.print(f"[bold]{result['preset']}[/bold]: {result['parameters']:,} parameters, "
              f"{result['architecture']} architecture, image {result['image_shape']}")
    table = Table(title="latent layers per resolution")
    for col in ("resolution", "layers", "variates/layer", "width", "elements/image"):
        table.add_column(col, justify="right")
    for r in result["resolutions"]:
        table.add_row(f"{r['resolution']}x{r['resolution']}", str(r["layers"]), str(r["variates"]),
                      str(r["width"]), f"{r['elements']:,}")
    out.print(table)
    out.print(f"total: {result['latent_layers']} latent layers, {result['latent_variates']:,} variates, "
              f"{result['latent_elements']:,} latent elements per image")
    if "forward" in result:
        f = result["forward"]
        out.print(f"untrained forward pass on {f['images']} images of '{f['data']}' "
                  f"({f['seconds']:.2f} s): negative ELBO {f['bits_per_dim']:.3f} bits/dim "
                  f"(reconstruction {f['recon_bits_per_dim']:.3f}, KL {f['kl_bits_per_dim']:.4f})")


def run_info(result: dict) -> None:
    for key, value in result.items():
        if key in ("model_config", "train_config") or (key == "imported" and value is None):
            continue  # long; shown with --json
        if key == "imported":
            value = f"from {value['kind']}: " + "; ".join(
                f"{f['role']} {f['path']} (sha256 {f['sha256'][:12]}...)" for f in value["files"])
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        out.print(f"[bold]{key}[/bold]: {fmt(value)}")


def kl_analysis(result: dict, *, data: str, split: str, units: str, per_nat: float) -> None:
    rule = (f"top {result['value'] * 100:g}%" if result["rule"] == "keep" else f"average KL > {result['value']:g} nats")
    out.print(f"{result['n_dims']:,} {result['granularity']} dimensions over {result['n_images']:,} images "
              f"of {data}:{split}; rule: {rule}")
    out.print(f"active: {result['n_active']:,} ({result['pct_active']:.2f}%) carrying "
              f"{result['kl_share_active'] * 100:.2f}% of the total average KL "
              f"({result['total_avg_kl_nats'] * per_nat:.2f} {units}); "
              f"Burda active units (Var > 0.01): {result['n_au_active']:,}, of which {result['n_au_active_in_set']:,} "
              f"in the set")
    table = Table(title="active dimensions per resolution")
    for col in ("resolution", "layers", "dims", "active", f"KL {units}", "AU active"):
        table.add_column(col, justify="right")
    for r in result["resolutions"]:
        table.add_row(f"{r['resolution']}x{r['resolution']}", str(r["layers"]), f"{r['dims']:,}",
                      f"{r['active']:,}", f"{r['kl_nats'] * per_nat:.3f}", f"{r['au_active']:,}")
    out.print(table)
    if "sweep" in result:
        pruning_sweep(result["sweep"], data=data)
    written = [result["out"]] + [result[k] for k in ("div_stats", "plot") if result.get(k)]
    out.print("wrote " + ", ".join(written))


def pruning_sweep(sweep: dict, *, data: str) -> None:
    """The paper's Table 5 for this model: one row per kept percentage, both KL conventions."""
    binary = "nats_per_image" in sweep["rows"][0]
    unit = "nats/image" if binary else "bits/dim"
    t = Table(title=f"pruning sweep on {data}:{sweep['split']} ({sweep['n_images']:,} images, {unit})")
    for col in ("% kept", "dims", "neg. ELBO", "recon", "KL", "neg. ELBO*", "KL*", "float16 bytes",
                "float32 bytes"):
        t.add_column(col, justify="right")
    for r in sweep["rows"]:
        e, rc, k, e_all, k_all = (
            (r["nats_per_image"], r["recon_nats_per_image"], r["kl_nats_per_image"],
             r["nats_per_image_kl_all"], r["kl_all_nats_per_image"]) if binary else
            (r["bits_per_dim"], r["recon_bits_per_dim"], r["kl_bits_per_dim"], r["bits_per_dim_kl_all"],
             r["kl_all_bits_per_dim"]))
        t.add_row(f"{r['keep_pct']:g}", f"{r['n_active']:,}", f"{e:.4f}", f"{rc:.4f}", f"{k:.4f}",
                  f"{e_all:.4f}", f"{k_all:.4f}", f"{r['encoded_bytes_float16']:,}",
                  f"{r['encoded_bytes_float32']:,}")
    out.print(t)
    out.print("KL: pruned dimensions charged 0 (they follow the prior; a bound on -log p(x)). "
              "KL*: every dimension's KL(q||p) in the pruned pass, pruned ones included "
              "(the official code's convention, as in the paper's Table 5).")


def encoded_store(result: dict) -> None:
    out.print(f"{result['store']}: {result['rows']:,} rows x {result['features']:,} features "
              f"({result['dims_kept']:,} of {result['dims_total']:,} dims, {result['kl_share_kept'] * 100:.1f}% of the KL), "
              f"{result['statistic']}, {result['dtype']}, codec {result['codec']}")
    out.print(f"size on disk {result['bytes_on_disk']:,} B ({result['bytes_per_image']:,.0f} B/image); "
              f"{result['full_latents_dtype']} full latents {result['full_latents_bytes']:,} B "
              f"({result['full_latents_bytes'] / max(result['bytes_on_disk'], 1):.1f}x larger); raw pixels "
              f"{result['raw_pixel_bytes']:,} B; {result['images_per_s']:.0f} images/s")
    for key, what in (("error", "features"), ("error_std", "features_std")):
        e = result.get(key)
        if e:
            q = result["quantization"]
            unit = "prior std" if q and q["scheme"] == "prior-step" else "column std"
            how = (f"{result['dtype']} {q['scheme']}" + (f" step {q['step']:g} {unit}" if q["step"] else "")
                   if q else f"{result['dtype']} rounding")
            out.print(f"{what} error ({how}): RMS {e['rmse']:.3g} ({e['relative_rmse']:.3g} of the columns' std), "
                      f"max {e['max_abs_error']:.3g}, clipped {e['clipped_fraction'] * 100:.3g}% of values")
    for note in result["notes"]:
        out.print(f"note: {note}")


def packed_store(result: dict) -> None:
    n, h, w, c = result["shape"]
    out.print(f"{result['store']}: {n:,} images of {h}x{w}x{c}"
              + (", labels" if result["labels"] else "") + (", file names" if result["names"] else "")
              + (f", own split at row {result['n_train']:,}" if result["n_train"] is not None else "")
              + f"; {result['bytes_on_disk']:,} B on disk ({result['raw_bytes']:,} B of pixels), "
              f"{result['images_per_s']:.0f} images/s")
    if result["skipped"]:
        out.print(f"skipped {result['skipped']:,} unreadable files, e.g. {', '.join(result['skipped_files'][:3])}")


def verify_report(report: dict, problems) -> None:
    out.print(f"{report['store']}: {report['format']}, schema {report['schema_version']}, {report['dtype']}, "
              f"{report['n_rows']:,} rows in {report['n_chunks']} chunks, {report['chunks_written']} written")
    for key in problems:
        for item in report[key][:20]:
            out.print(f"  {key}: rows {item['rows'][0]}-{item['rows'][1] - 1} of {item['array']}"
                      + (f" ({item['count']} values)" if "count" in item else ""))
    if report["ok"]:
        out.print(report["summary"])


def probe_report(report: dict) -> None:
    split = f"test store {report['test_store']}" if report["test_store"] else "20% hold-out"
    table = Table(title=f"{report['model']} probe on {report['store']}: {report['n_train']:,} train / "
                        f"{report['n_test']:,} test rows ({split}), {report['n_classes']} classes, labels from "
                        f"{report['labels']}; mean ± std over {report['seeds']} seeds")
    for col in ("name", "features", "bytes/image", "test acc", "CV acc", "params", "fit s"):
        table.add_column(col, justify="left" if col in ("name", "params") else "right")
    for r in report["rows"]:
        params = sorted({", ".join(f"{k}={fmt(v)}" for k, v in p.items() if k != "alpha") for p in r["params"]})
        if r["fit"] == "streaming":
            params.append(f"streamed, {r['epochs']} epochs")
        table.add_row(r["name"], f"{r['features']:,}", f"{r['bytes_per_image']:,}",
                      f"{r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f}",
                      f"{r['cv_accuracy']:.3f} ± {r['cv_accuracy_std']:.3f}", " | ".join(params),
                      f"{r['fit_seconds']:.2f}")
    out.print(table)
    active = report["rows"][0]
    out.print(f"majority class: {report['chance_accuracy']:.3f} test accuracy; the store takes "
              f"{active['disk_bytes_per_image']:,.0f} B/image on disk ({active['dtype']})")
    for note in report["notes"]:
        out.print(f"note: {note}")
    if report.get("plot") is not None:
        out.print(f"wrote {report['plot']}")
