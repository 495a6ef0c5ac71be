"""`vdvl encode` as a library call: checkpoint + data split + active set -> a store of the active dimensions.

The store (Zarr or HDF5) is written chunk by chunk: resumable, and under torchrun ranks write
disjoint chunks of one Zarr store. ``decode`` reads it back into images.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.interrupts import resumable_writes
from ..core.outputs import prepare_output
from ..core.runtime import auto_device, join_processes, launched_rank
from ..core.writer_lock import lock_store
from ..data.splits import open_images
from ..latents.active_set import ActiveSet, fit_active_set, parse_keep
from ..latents.encoder import STATISTICS, Encoder
from ..model.checkpoints import load_model, resolve_checkpoint
from ..model.inputs import check_images_fit, prepare_batch
from ..model.precision import autocast, resolve_precision
from .backends import parse_codec, store_format
from .chunk_job import ChunkJob
from .choices import DEFAULT_SCHEME, DEFAULT_STEP, DTYPES, check_scheme, check_step
from .codes import CALIBRATION_ROWS, INT_DTYPES, calibration_rows, fit_quantizer
from .schema import disk_bytes
from .writer import StoreWriter


def encode_to_store(path: str | Path, data: str, out: str | Path, *, split: str = "test",
                    keep: str | float | None = None, threshold: float | None = None,
                    active_file: str | Path | None = None, statistic: str = "mean", dtype: str = "float16",
                    quantize: str = DEFAULT_SCHEME, quant_step: float = DEFAULT_STEP, codec: str | None = None,
                    batch_size: int = 256, chunk_rows: int = 1024, resume: bool = False, overwrite: bool = False,
                    granularity: str = "variate", kl_split: str = "train", kl_limit: int | None = None,
                    seed: int = 0, device: str = "auto", workers: int | None = None, precision: str = "fp32",
                    progress=None) -> dict:
    """Encode ``data:split`` into a store at ``out`` (streamed: under torchrun each rank reads only
    the rows of its chunks). Returns the numbers `vdvl encode` prints.

    Integer ``dtype`` (int8/uint8) stores codes with one affine map per column, chosen on a
    seeded calibration sample of the split (:mod:`~vdvae_latents.stores.codes`: ``quantize`` is the scheme,
    ``quant_step`` its step in standard deviations). The summary's ``error`` says what
    storing lost over all rows (float16 rounding too). ``codec`` names the compression
    (:func:`~vdvae_latents.stores.backends.parse_codec`; default: the measured best for the format and dtype).
    ``precision`` (auto, fp32, bf16) is the model passes': ``auto`` is bf16 autocast where the
    device computes bf16 natively.
    """
    if sum(x is not None for x in (keep, threshold, active_file)) != 1:
        raise UserError("give exactly one of --keep, --threshold or --active.")
    if statistic not in STATISTICS:
        raise UserError(f"--stat must be one of {', '.join(STATISTICS)}, not '{statistic}'.")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    check_scheme(quantize)
    check_step(quant_step)
    if resume and overwrite:
        raise UserError("give at most one of --resume and --overwrite.")
    out = Path(out)
    # Everything that can be refused is refused before the model loads and the ranking runs.
    parse_codec(store_format(out), codec, dtype)
    # Rank 0 only: it creates the store, which a later rank could find here (core.runtime.launched_rank).
    if out.exists() and not (resume or overwrite) and launched_rank() == 0:
        raise UserError(f"store '{out}' exists; use --resume to finish it or --overwrite to replace it.")
    prepare_output(out, what="store", kind="folder" if store_format(out) == "zarr" else "file")
    active = None if active_file is None else ActiveSet.load(active_file)
    resolve_checkpoint(path)  # a missing run or checkpoint is named now; load_model takes the latest then
    images = open_images(data, split=split)
    kl_images = open_images(data, split=kl_split, limit=kl_limit) if active is None else None
    dev, env = join_processes(auto_device(device))
    resolve_precision(precision, dev)
    # One writer per store; under torchrun rank 0 holds the lock for the job's ranks.
    with lock_store(out) if env.rank == 0 else contextlib.nullcontext(), autocast(precision, dev):
        rank, world = env.rank, env.world_size
        model, info = load_model(path, ema=True, device=dev)
        # Kept in the checkpoint's layout (not channels_last, which is faster): a store holds the
        # very numbers Encoder.encode gives for the loaded model, and channels_last convolutions
        # round differently (about 1e-7), which flips float16 roundings.
        # Absolute: `vdvl decode STORE` finds the checkpoint from the store's attrs in any directory.
        ckpt_path = Path(info["path"]).absolute()
        check_images_fit(model.cfg, images.shape, data)
        job = ChunkJob(model=model, images=images, data=data, split=split, out=out, device=dev, rank=rank,
                         world=world,
                         batch_size=batch_size, workers=workers, seed=seed)
        if active is not None:
            if active.checkpoint_sha256 and active.checkpoint_sha256 != info["sha256"]:
                raise UserError(f"active set '{active_file}' was computed for another checkpoint "
                                f"(sha256 {active.checkpoint_sha256[:12]}..., this one is {info['sha256'][:12]}...).")
        else:  # rank the dimensions on the KL split now
            check_images_fit(model.cfg, kl_images.shape, data)
            active = fit_active_set(model, job.stream(kl_images), granularity=granularity,
                                    keep=parse_keep(keep) if keep is not None else None, threshold=threshold,
                                    batch_size=batch_size, seed=seed + rank, device=dev, data=data, split=kl_split,
                                    checkpoint=str(ckpt_path), checkpoint_sha256=info["sha256"])
        encoder = Encoder(model, active, statistic=statistic)
        attrs = _store_attrs(encoder, info, str(ckpt_path), data, split, dtype, seed)
        calib = calibration_rows(len(images), CALIBRATION_ROWS, seed) if dtype in INT_DTYPES else None
        quantization = None if calib is None else {"scheme": quantize,
                                                   "step": None if quantize == "range" else quant_step,
                                                   "calibration_rows": len(calib), "calibration_seed": seed}
        identity = {k: attrs[k] for k in IDENTITY_ATTRS}
        if quantization is not None:
            identity["quantization"] = {"dtype": dtype, **quantization}

        def create() -> StoreWriter:
            quantizers = None
            if calib is not None:
                calib_batches = (images.read(calib[b:b + batch_size]) for b in range(0, len(calib), batch_size))
                quantizers = _calibrate(encoder, calib_batches, dtype, quantize, quant_step, dev, seed)
            writer = StoreWriter.create(out, n_rows=len(images), dims=encoder.columns.arrays(), attrs=attrs,
                                        dtype=dtype,
                                        with_std=statistic == "mean+std", has_labels=images.labels is not None,
                                        has_source_names=images.source_names is not None, quantizers=quantizers,
                                        quantization=quantization, codec=codec, chunk_rows=chunk_rows,
                                        overwrite=overwrite)
            if active_file is None:
                active.save(_active_path(out))
            return writer

        writer = job.open_writer(create, resume=resume, identity=identity)
        start = time.perf_counter()
        with resumable_writes(out, what="store"):
            written_rows = job.write_chunks(writer, lambda x, rows, g: encoder.encode(x, generator=g),
                                            check_data=resume, progress=progress)
        seconds = time.perf_counter() - start
        errors, store_codec = job.finish(writer, codec)
        return _summary(job, encoder, attrs, errors, store_codec, quantization, quantize, written_rows, seconds)


# What identifies a store's contents: a resumed store must have been started with the same.
IDENTITY_ATTRS = ("checkpoint_sha256", "data", "split", "granularity", "selection_rule", "selection_value",
                  "statistic", "dtype", "n_features", "columns_sha256")


def _store_attrs(encoder: Encoder, info: dict, checkpoint: str, data: str, split: str, dtype: str,
                 seed: int) -> dict:
    """The store's provenance attributes: checkpoint, data, selection, statistic and sizes."""
    active = encoder.active
    return {
        "checkpoint_sha256": info["sha256"], "checkpoint": checkpoint, "checkpoint_step": info["step"],
        "model_config": encoder.model.cfg.to_dict(), "data": data, "split": split, "granularity": active.granularity,
        "selection_rule": active.rule, "selection_value": active.value, "kl_split": active.split,
        "kl_images": active.n_images, "statistic": encoder.statistic, "dtype": dtype,
        "n_dims_total": active.n_dims, "n_dims_kept": active.n_active,
        "n_latent_scalars_total": active.total_scalars_per_image(), "n_features": encoder.n_features,
        "kl_share_kept": active.summary()["kl_share_active"], "seed": seed,
        # Which latent scalars the columns are: a resumed store must continue the same ones.
        "columns_sha256": _columns_digest(encoder.columns.arrays()),
    }


def _summary(job: ChunkJob, encoder: Encoder, attrs: dict, errors: dict, codec: str | None,
             quantization: dict | None, scheme: str, written_rows: int, seconds: float) -> dict:
    """What `vdvl encode` reports: sizes beside the pixels and the full latents, and what storing lost."""
    active, n, dtype, out = encoder.active, len(job.images), attrs["dtype"], job.out
    # Integer stores compare with the float16 full latents (the smallest float store).
    full_dtype = dtype if dtype in ("float16", "float32") else "float16"
    c, s = encoder.model.cfg.channels, encoder.model.cfg.loss_size
    on_disk = disk_bytes(out)
    notes = []
    lost = (errors.get("features") or {}).get("relative_rmse", 0.0)
    if quantization is not None and lost > 0.2:
        notes.append(f"quantisation error is {lost:.2f} of the columns' spread: these features vary little on the "
                     f"scale of a {scheme} step; encode with --quantize range, a smaller --quant-step, or float16.")
    return {
        "store": str(out), "format": store_format(out), "rows": n, "features": encoder.n_features,
        "dims_kept": active.n_active, "dims_total": active.n_dims, "kl_share_kept": attrs["kl_share_kept"],
        "statistic": encoder.statistic, "dtype": dtype, "quantization": quantization, "codec": codec,
        "bytes_on_disk": on_disk, "bytes_per_image": on_disk / n, "error": errors.get("features"),
        "error_std": errors.get("features_std"), "full_latents_dtype": full_dtype,
        "full_latents_bytes": n * active.total_scalars_per_image() * DTYPES[full_dtype],
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


def _columns_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in ("layer", "variate", "y", "x"):
        h.update(np.ascontiguousarray(arrays[key], dtype=np.int32).tobytes())
    return h.hexdigest()


def _active_path(store: Path) -> Path:
    return store.with_name(store.name.rsplit(".", 1)[0] + ".active.json")


__all__ = ["encode_to_store"]
