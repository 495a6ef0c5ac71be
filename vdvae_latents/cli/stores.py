"""Commands over stores of encodings: encode, decode, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.errors import UserError
from ..stores.choices import (
    DEFAULT_STEP as DEFAULT_QUANT_STEP,  # plain Python: the help stays light
)
from . import render
from .common import WORKERS_HELP, out, print_json, progress


def encode(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Data spec to encode."),
    out_file: Path = typer.Option(..., "--out", help="STORE.zarr (default format) or STORE.h5."),
    split: str = typer.Option("test", "--split"),
    keep: Optional[str] = typer.Option(None, "--keep", help="Keep the top P% by average KL (ranked on the train split)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep dims with average KL > T nats."),
    active: Optional[Path] = typer.Option(None, "--active", help="Reuse an ACTIVE.json from `vdvl analyze-kl`."),
    stat: str = typer.Option("mean", "--stat", help="mean (deterministic), sample, or mean+std."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, float32, or int8/uint8 codes (quantised "
                              "per column; see --quantize)."),
    quantize: str = typer.Option("std-step", "--quantize", help="With int8/uint8: std-step (a step of "
                                 "--quant-step column stds), prior-step (--quant-step prior stds) or range (each "
                                 "column's calibration range over 256 levels)."),
    quant_step: float = typer.Option(DEFAULT_QUANT_STEP, "--quant-step", help="With std-step/prior-step: the step "
                                     "in standard deviations."),
    codec: Optional[str] = typer.Option(None, "--codec", help="Compression, e.g. zstd:9+transpose (Zarr) or "
                                        "gzip:9:shuffle (HDF5); default: the measured best."),
    granularity: str = typer.Option("variate", "--granularity", help="With --keep/--threshold: variate or element."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    chunk_rows: int = typer.Option(1024, "--chunk-rows", min=1, help="Rows per store chunk (the resume unit)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (autocast), or auto: bf16 where the CPU or GPU computes it natively, else fp32."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted store (writes only missing chunks)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write the active dimensions of every image of a split to a Zarr or HDF5 store."""
    from ..stores.encode import encode_to_store

    with progress("encode", quiet or as_json) as tick:
        result = encode_to_store(path, data, out_file, split=split, keep=keep, threshold=threshold,
                                 active_file=active, statistic=stat, dtype=dtype, quantize=quantize,
                                 quant_step=quant_step, codec=codec, batch_size=batch_size,
                                 chunk_rows=chunk_rows, resume=resume, overwrite=overwrite,
                                 granularity=granularity, seed=seed, device=device, workers=workers,
                                 precision=precision, progress=tick)
    print_json(result) if as_json else render.encoded_store(result)


def decode(
    store: Path = typer.Argument(..., help="A store written by `vdvl encode`."),
    out_file: Path = typer.Option(..., "--out", help="PNG file for the decoded images."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint (default: the one recorded in the store)."),
    rows: str = typer.Option("0:16", "--rows", help="Rows to decode, start:stop."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: pruned dims at the prior mean; "
                                      "T > 0: a prior sample at temperature T."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rebuild images from stored active dimensions (pruned dimensions from the prior)."""
    from ..stores.decode import decode_store

    result = decode_store(store, out_file, ckpt=ckpt, rows=rows, temperature=temperature, seed=seed, device=device)
    print_json(result) if as_json else out.print(
        f"decoded rows {result['rows'][0]}:{result['rows'][1]} of {result['store']} to {result['out']}")


def verify(
    store: Path = typer.Argument(..., help="A store written by `vdvl encode`."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every chunk of a store: complete, present, checksums, finite values (exit 2 if not)."""
    from ..stores.verify import PROBLEMS, verify_store

    with progress("verify", quiet or as_json) as tick:
        report = verify_store(store, progress=tick)
    print_json(report) if as_json else render.verify_report(report, PROBLEMS)
    if not report["ok"]:
        raise UserError(report["summary"])
