"""`vdvl encode` and `vdvl decode` as library calls.

encode: checkpoint + data split + active set -> a Zarr/HDF5 store of the active
dimensions, written chunk by chunk (resumable; under torchrun, ranks write disjoint
chunks of one Zarr store). decode: store rows -> images through the same checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import UserError
from ..core.runtime import auto_device, join_processes
from ..data import open_images, resolve_workers
from ..data.loading import stream
from ..latents.active_set import ActiveSet, fit_active_set, parse_keep
from ..latents.encoder import STATISTICS, Encoder
from ..model.checkpoints import load_model, resolve_checkpoint
from ..model.inputs import check_images_fit, prepare_batch
from .backends import parse_codec, store_format
from .codes import (
    CALIBRATION_ROWS,
    DEFAULT_SCHEME,
    DEFAULT_STEP,
    INT_DTYPES,
    SCHEMES,
    calibration_rows,
    fit_quantizer,
)
from .schema import disk_bytes
from .writer import StoreWriter

DTYPES = {"float16": 2, "float32": 4, "int8": 1, "uint8": 1}


def encode_to_store(path: str | Path, data: str, out: str | Path, *, split: str = "test",
                    keep: str | float | None = None, threshold: float | None = None,
                    active_file: str | Path | None = None, statistic: str = "mean", dtype: str = "float16",
                    quantize: str = DEFAULT_SCHEME, quant_step: float = DEFAULT_STEP, codec: str | None = None,
                    batch_size: int = 256, chunk_rows: int = 1024, resume: bool = False, overwrite: bool = False,
                    granularity: str = "variate", kl_split: str = "train", kl_limit: int | None = None,
                    seed: int = 0, device: str = "auto", workers: int | None = None, progress=None) -> dict:
    """Encode ``data:split`` into a store at ``out`` (streamed: under torchrun each rank reads only
    the rows of its chunks). Returns the numbers `vdvl encode` prints.

    Integer ``dtype`` (int8/uint8) stores codes with one affine map per column, chosen on a
    seeded calibration sample of the split (:mod:`~vdvae_latents.stores.codes`: ``quantize`` is the scheme,
    ``quant_step`` its step in standard deviations). The summary's ``error`` says what
    storing lost over all rows (float16 rounding too). ``codec`` names the compression
    (:func:`~vdvae_latents.stores.backends.parse_codec`; default: the measured best for the format and dtype).
    """
    rules = sum(x is not None for x in (keep, threshold, active_file))
    if rules != 1:
        raise UserError("give exactly one of --keep, --threshold or --active.")
    if statistic not in STATISTICS:
        raise UserError(f"--stat must be one of {', '.join(STATISTICS)}, not '{statistic}'.")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    if quantize not in SCHEMES:
        raise UserError(f"--quantize must be one of {', '.join(SCHEMES)}, not '{quantize}'.")
    if not quant_step > 0:
        raise UserError(f"--quant-step must be a positive number of standard deviations, not {quant_step}.")
    if resume and overwrite:
        raise UserError("give at most one of --resume and --overwrite.")
    out = Path(out)
    fmt = store_format(out)
    parse_codec(fmt, codec, dtype if dtype in DTYPES else "float16")  # a bad --codec fails before the model loads
    dev = auto_device(device)
    dev, rank, world = join_processes(dev)
    distributed = world > 1
    # Absolute: `vdvl decode STORE` finds the checkpoint from the store's attrs in any directory.
    ckpt_path = resolve_checkpoint(path).absolute()
    model, info = load_model(ckpt_path, ema=True, device=dev)
    sha = info["sha256"]
    images = open_images(data, split=split)
    check_images_fit(model.cfg, images.shape, data)
    if out.exists() and not (resume or overwrite):
        raise UserError(f"store '{out}' exists; use --resume to finish it or --overwrite to replace it.")

    # ---- the active set: reuse a saved one, or rank the dimensions on the KL split now
    if active_file is not None:
        active = ActiveSet.load(active_file)
        if active.checkpoint_sha256 and active.checkpoint_sha256 != sha:
            raise UserError(f"active set '{active_file}' was computed for another checkpoint "
                            f"(sha256 {active.checkpoint_sha256[:12]}..., this one is {sha[:12]}...).")
    else:
        kl_images = open_images(data, split=kl_split, limit=kl_limit)
        check_images_fit(model.cfg, kl_images.shape, data)
        active = fit_active_set(model, stream(kl_images.shard(rank, world), batch_size, workers, dev, world),
                                granularity=granularity, keep=parse_keep(keep) if keep is not None else None,
                                threshold=threshold, batch_size=batch_size, seed=seed + rank, device=dev, data=data,
                                split=kl_split, checkpoint=str(ckpt_path), checkpoint_sha256=sha)
    encoder = Encoder(model, active, statistic=statistic)
    summary = active.summary()
    attrs = {
        "checkpoint_sha256": sha, "checkpoint": str(ckpt_path), "checkpoint_step": info["step"],
        "model_config": model.cfg.to_dict(), "data": data, "split": split, "granularity": active.granularity,
        "selection_rule": active.rule, "selection_value": active.value, "kl_split": active.split,
        "kl_images": active.n_images, "statistic": statistic, "dtype": dtype,
        "n_dims_total": active.n_dims, "n_dims_kept": active.n_active,
        "n_latent_scalars_total": active.total_scalars_per_image(), "n_features": encoder.n_features,
        "kl_share_kept": summary["kl_share_active"], "seed": seed,
        # Which latent scalars the columns are: a resumed store must continue the same ones.
        "columns_sha256": _columns_digest(encoder.columns.arrays()),
    }
    n = len(images)
    calib = calibration_rows(n, CALIBRATION_ROWS, seed) if dtype in INT_DTYPES else None
    quantization = None if calib is None else {"scheme": quantize, "step": None if quantize == "range" else quant_step,
                                               "calibration_rows": len(calib), "calibration_seed": seed}
    identity = {k: attrs[k] for k in ("checkpoint_sha256", "data", "split", "granularity", "selection_rule",
                                      "selection_value", "statistic", "dtype", "n_features", "columns_sha256")}
    if quantization is not None:
        identity["quantization"] = {"dtype": dtype, **quantization}
    # ---- create (rank 0) or re-open the store
    writer = None
    failure: str | None = None
    if rank == 0:
        try:
            if resume and out.exists():
                writer = StoreWriter.open(out, expect_attrs=identity)
            else:
                quantizers = None
                if calib is not None:
                    calib_batches = (images.read(calib[b:b + batch_size]) for b in range(0, len(calib), batch_size))
                    quantizers = _calibrate(encoder, calib_batches, dtype, quantize, quant_step, dev, seed)
                writer = StoreWriter.create(out, n_rows=n, dims=encoder.columns.arrays(), attrs=attrs, dtype=dtype,
                                            with_std=statistic == "mean+std", has_labels=images.labels is not None,
                                            has_source_names=images.source_names is not None, quantizers=quantizers,
                                            quantization=quantization, codec=codec, chunk_rows=chunk_rows,
                                            overwrite=overwrite)
                if active_file is None:
                    active.save(_active_path(out))
        except UserError as err:
            if not distributed:
                raise
            failure = str(err)
    if distributed:
        # Every rank learns whether rank 0 could set the store up, so none waits forever.
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise UserError(box[0])
    parallel = distributed and fmt == "zarr"  # HDF5 has one writer: rank 0
    if rank != 0:
        writer = StoreWriter.open(out, expect_attrs=identity) if parallel else None
    start = time.perf_counter()
    written_rows = 0
    if writer is not None:
        # A resumed store is read once: damaged chunks (deleted, corrupt) are rewritten too.
        todo = writer.missing_chunks(check_data=resume)
        mine = [i for i in todo if not parallel or i % world == rank]
        labels, names = images.labels, images.source_names
        # One loader over every batch of this rank's chunks, in the order they are encoded.
        order = [np.arange(b, min(hi, b + batch_size)) for lo, hi in map(writer.chunk_range, mine)
                 for b in range(lo, hi, batch_size)]
        loader = images.loader(order, workers=resolve_workers(workers, images, dev.type, world),
                               pin_memory=dev.type == "cuda")
        batches = iter(loader)  # a generator: close() (or garbage collection) stops its workers
        for i in mine:
            lo, hi = writer.chunk_range(i)
            feats, stds = [], []
            # Seeded per chunk so a resumed run draws exactly what an uninterrupted one would.
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
            for b in range(lo, hi, batch_size):
                x = prepare_batch(model.cfg, next(batches).images, device=dev)
                f, s = encoder.encode(x, generator=g)
                feats.append(f.cpu().numpy())
                if s is not None:
                    stds.append(s.cpu().numpy())
                if progress is not None:
                    progress(len(x))
            feats = _finite(np.concatenate(feats), lo, data, split)
            writer.write_chunk(i, feats, features_std=_finite(np.concatenate(stds), lo, data, split) if stds else None,
                               labels=None if labels is None else labels[lo:hi], sample_index=np.arange(lo, hi),
                               source_index=images.source_index[lo:hi],
                               source_names=None if names is None else names[lo:hi])
            written_rows += hi - lo
        batches.close()
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    errors: dict = {}
    store_codec = codec
    if rank == 0:
        errors = writer.error_summary()  # every rank's chunks are written by now
        store_codec = writer.layout.attrs.get("codec")
        writer.finalize()
    elif writer is not None:
        writer.close()
    if distributed:
        dist.barrier()
    # Integer stores compare with the float16 full latents (the smallest float store).
    full_dtype = dtype if dtype in ("float16", "float32") else "float16"
    item = DTYPES[full_dtype]
    c, s = model.cfg.channels, model.cfg.loss_size
    on_disk = disk_bytes(out)
    notes = []
    lost = (errors.get("features") or {}).get("relative_rmse", 0.0)
    if quantization is not None and lost > 0.2:
        notes.append(f"quantisation error is {lost:.2f} of the columns' spread: these features vary little on the "
                     f"scale of a {quantize} step; encode with --quantize range, a smaller --quant-step, or float16.")
    return {
        "store": str(out), "format": fmt, "rows": n, "features": encoder.n_features, "dims_kept": active.n_active,
        "dims_total": active.n_dims, "kl_share_kept": summary["kl_share_active"], "statistic": statistic,
        "dtype": dtype, "quantization": quantization, "codec": store_codec,
        "bytes_on_disk": on_disk, "bytes_per_image": on_disk / n, "error": errors.get("features"),
        "error_std": errors.get("features_std"), "full_latents_dtype": full_dtype,
        "full_latents_bytes": n * active.total_scalars_per_image() * item,
        "raw_pixel_bytes": n * c * s * s, "rows_written": written_rows, "seconds": seconds,
        "images_per_s": written_rows / seconds if seconds > 0 else 0.0, "notes": notes,
    }


def _calibrate(encoder: Encoder, batches, dtype: str, scheme: str, step: float, device, seed: int) -> dict:
    """Quantisers for the store's value arrays, from the encodings of calibration images."""
    feats, stds, priors = [], [], []
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 - 1)
    for batch in batches:
        f, s, p = encoder.encode_with_prior(prepare_batch(encoder.model.cfg, batch, device=device), generator=g)
        feats.append(f.cpu().numpy())
        priors.append(p.cpu().numpy())
        if s is not None:
            stds.append(s.cpu().numpy())
    prior = np.concatenate(priors)
    out = {"features": fit_quantizer(np.concatenate(feats), dtype, scheme=scheme, step=step, prior_std=prior)}
    if stds:
        out["features_std"] = fit_quantizer(np.concatenate(stds), dtype, scheme=scheme, step=step, prior_std=prior)
    return out


def _finite(values: np.ndarray, first_row: int, data: str, split: str) -> np.ndarray:
    """The chunk's encodings, or a UserError naming the rows the checkpoint turned into NaN/inf."""
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        rows = first_row + bad
        raise UserError(f"the checkpoint produced NaN or infinite latents for {len(rows)} image(s) of {data}:{split} "
                        f"(rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); nothing was "
                        f"written for them.")
    return values


def _columns_digest(arrays: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in ("layer", "variate", "y", "x"):
        h.update(np.ascontiguousarray(arrays[key], dtype=np.int32).tobytes())
    return h.hexdigest()


def _active_path(store: Path) -> Path:
    return store.with_name(store.name.rsplit(".", 1)[0] + ".active.json")


__all__ = ["encode_to_store"]
