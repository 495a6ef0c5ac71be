"""`vdvl score`: per-image scores written to a store, streamed and resumable like `vdvl encode`.

The store is an encodings store (the same layout, provenance, per-chunk checksums, resume and
torchrun sharding, :mod:`~vdvae_latents.stores.writer`) whose columns are scores instead of
latent scalars, in float32, named by the ``columns`` attribute (``content = "scores"``):
``neg_elbo_bpd``, ``recon_bpd``, ``kl_layer<i>_nats`` for each latent layer, ``neg_iw_bpd`` with
``--iw``, then ``neg_elbo_gt<k>_bpd`` and ``llr_gt<k>_bpd`` for each k
(:mod:`~vdvae_latents.model.scores`). In its ``dims`` table ``layer`` is the latent layer
(0-based) of a per-layer KL column and ``y`` the k of an L^{>k} or LLR^{>k} column; -1 elsewhere.

Row i's noise is seeded by (``seed``, i), so a store is the same whatever the batch size, the
number of torchrun ranks, or how often it was interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.interrupts import resumable_writes
from ..core.outputs import prepare_output
from ..core.runtime import auto_device, join_processes, launched_rank
from ..core.writer_lock import lock_store
from ..data.splits import open_images
from ..model.checkpoints import load_model, resolve_checkpoint
from ..model.inputs import check_images_fit
from ..model.scores import parse_ks, score_batch, score_columns
from .backends import parse_codec, store_format
from .chunk_job import ChunkJob
from .schema import DIM_FIELDS, disk_bytes
from .writer import StoreWriter

CONTENT = "scores"
IDENTITY_ATTRS = ("content", "checkpoint_sha256", "data", "split", "columns", "seed")


def score_to_store(path: str | Path, data: str, out: str | Path, *, split: str = "test", ks=None, iw: int = 0,
                   seed: int = 0, batch_size: int = 128, chunk_rows: int = 1024, resume: bool = False,
                   overwrite: bool = False, device: str = "auto", workers: int | None = None, progress=None) -> dict:
    """Score every image of ``data:split`` with the model at ``path`` into the store ``out``;
    return the numbers `vdvl score` prints. ``ks``: 'all', a comma list or None (1 and 2)."""
    if resume and overwrite:
        raise UserError("give at most one of --resume and --overwrite.")
    if iw < 0:
        raise UserError(f"--iw must be 0 or more importance samples, not {iw}.")
    out = Path(out)
    parse_codec(store_format(out), None, "float32")
    # Rank 0 only: it creates the store, which a later rank could find here (core.runtime.launched_rank).
    if out.exists() and not (resume or overwrite) and launched_rank() == 0:
        raise UserError(f"store '{out}' exists; use --resume to finish it or --overwrite to replace it.")
    prepare_output(out, what="store", kind="folder" if store_format(out) == "zarr" else "file")
    resolve_checkpoint(path)
    images = open_images(data, split=split)
    dev, env = join_processes(auto_device(device))
    with lock_store(out) if env.rank == 0 else contextlib.nullcontext():
        model, info = load_model(path, ema=True, device=dev)
        model.eval()
        check_images_fit(model.cfg, images.shape, data)
        k_list = parse_ks(ks, model.cfg.n_layers)
        columns = score_columns(model.cfg.n_layers, k_list, iw)
        attrs = {"content": CONTENT, "columns": columns, "ks": k_list, "iw": iw, "seed": seed,
                 "checkpoint_sha256": info["sha256"], "checkpoint": str(Path(info["path"]).absolute()),
                 "checkpoint_step": info["step"], "model_config": model.cfg.to_dict(), "data": data, "split": split,
                 "dtype": "float32", "n_features": len(columns), "statistic": "scores"}
        job = ChunkJob(model=model, images=images, data=data, split=split, out=out, device=dev, rank=env.rank,
                       world=env.world_size, batch_size=batch_size, workers=workers, seed=seed,
                       values_name="scores")

        def create() -> StoreWriter:
            return StoreWriter.create(out, n_rows=len(images), dims=score_dims(columns), attrs=attrs,
                                      dtype="float32", has_labels=images.labels is not None,
                                      has_source_names=images.source_names is not None, chunk_rows=chunk_rows,
                                      overwrite=overwrite)

        def compute(x, rows, generator):
            return score_batch(model, x, k_list, rows=rows, seed=seed, iw=iw).astype(np.float32), None

        writer = job.open_writer(create, resume=resume, identity={k: attrs[k] for k in IDENTITY_ATTRS})
        start = time.perf_counter()
        with resumable_writes(out, what="store"):
            written = job.write_chunks(writer, compute, check_data=resume, progress=progress)
        seconds = time.perf_counter() - start
        job.finish(writer, None)
    return {"store": str(out), "format": store_format(out), "rows": len(images), "columns": columns,
            "ks": k_list, "iw": iw, "rows_written": written, "seconds": seconds,
            "images_per_s": written / seconds if seconds > 0 else 0.0, "bytes_on_disk": disk_bytes(out)}


def score_dims(columns: list[str]) -> dict[str, np.ndarray]:
    """The dims table of a score store: a per-layer KL column's layer (0-based) and an L^{>k} or
    LLR^{>k} column's k; -1 elsewhere, and no average KL."""
    n = len(columns)
    dims = {name: np.full(n, -1, dtype=dtype) for name, dtype in DIM_FIELDS.items() if name != "avg_kl"}
    dims["avg_kl"] = np.full(n, np.nan)
    for i, name in enumerate(columns):
        if m := re.fullmatch(r"kl_layer(\d+)_nats", name):
            dims["layer"][i] = int(m.group(1)) - 1
        elif m := re.fullmatch(r"(?:neg_elbo|llr)_gt(\d+)_bpd", name):
            dims["y"][i] = int(m.group(1))
    return dims


__all__ = ["score_to_store", "score_dims", "CONTENT"]
