"""`vdvl decode`: stored rows back to images through the store's checkpoint.

:func:`store_encoder` rebuilds the :class:`~vdvae_latents.latents.encoder.Encoder` a store was written
with (its checkpoint and columns), which decoding and :class:`~vdvae_latents.downstream.ActiveLatents`
use. The figure pairs each row of decodings with the original images above it when the store's
data can still be read (its ``data``/``split`` attributes and ``sample_index``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.outputs import prepare_output
from ..core.runtime import auto_device
from ..data.grids import save_grid, to_uint8
from ..data.splits import open_images
from ..latents.active_set import ActiveSet
from ..latents.encoder import Encoder
from ..latents.stats import DimTable
from ..model.checkpoints import file_sha256, load_model, resolve_checkpoint
from ..model.generate import interleave_rows, scored_pixels
from ..model.inputs import check_images_fit, prepare_batch
from .reader import open_encodings


def store_encoder(enc, ckpt=None, *, device="cpu", statistic: str = "mean") -> tuple[Encoder, object]:
    """The :class:`Encoder` whose columns are an opened store's (``enc``), on the store's
    checkpoint (or ``ckpt``, which must have the same sha256); returns it and the checkpoint path.

    The active set is rebuilt from the store's dims table at element granularity, which
    gives exactly the stored columns; a table that does not fit the model is a UserError.
    """
    attrs = enc.attrs
    if attrs.get("content") == "scores":
        raise UserError(f"store '{enc.path}' holds per-image scores (vdvl score), not latent encodings.")
    if ckpt is None and not attrs.get("checkpoint"):
        raise UserError(f"store '{enc.path}' records no checkpoint; pass one explicitly.")
    ckpt_path = resolve_checkpoint(ckpt if ckpt is not None else attrs["checkpoint"])
    sha = file_sha256(ckpt_path)  # checked before the (possibly large) weights are read
    if sha != attrs.get("checkpoint_sha256"):
        raise UserError(f"checkpoint '{ckpt_path}' is not the one store '{enc.path}' was encoded with "
                        "(sha256 differs).")
    model, _ = load_model(ckpt_path, ema=True, device=device, sha256=sha)
    shapes = model.cfg.layer_shapes()
    layer, variate, y, x = (np.asarray(enc.dims[k]) for k in ("layer", "variate", "y", "x"))
    # A damaged or foreign dims table must be a one-sentence refusal, not an IndexError below.
    in_range = (layer >= 0) & (layer < len(shapes))
    if in_range.all():
        limits = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)[layer]
        in_range = ((variate >= 0) & (variate < limits[:, 0]) & (y >= 0) & (y < limits[:, 1])
                    & (x >= 0) & (x < limits[:, 2]))
    if not in_range.all():
        raise UserError(f"store '{enc.path}' has dims that do not exist in the latent layers of its checkpoint's "
                        "model.")
    table = DimTable(layer=layer.astype(np.int32), variate=variate.astype(np.int32), y=y.astype(np.int32),
                     x=x.astype(np.int32), resolution=np.array([shapes[k][1] for k in layer], dtype=np.int32),
                     avg_kl=np.asarray(enc.dims["avg_kl"], dtype=np.float64), active_units=np.zeros(len(layer)))
    active = ActiveSet(granularity="element", table=table, selected=np.arange(len(layer)), rule="stored",
                       value=float("nan"), layer_shapes=shapes, n_images=int(attrs.get("kl_images", 0)))
    encoder = Encoder(model, active, statistic=statistic)
    stored = np.stack([layer, variate, y, x], 1)
    mine = np.stack([getattr(encoder.columns, k) for k in ("layer", "variate", "y", "x")], 1)
    if stored.shape != mine.shape or not np.array_equal(stored, mine):
        raise UserError(f"store '{enc.path}' has columns that do not match its own dims table.")
    return encoder, ckpt_path


def decode_store(store: str | Path, out: str | Path, *, ckpt: str | Path | None = None, rows: str = "0:16",
                 temperature: float = 0.0, seed: int = 0, device: str = "auto") -> dict:
    """Rebuild images from stored rows (pruned dims from the prior) and save them as a labelled grid:
    rows of at most 8 originals, each above its decodings (decodings alone when the store's data
    cannot be read here)."""
    if temperature < 0:
        raise UserError(f"--temperature must be non-negative, not {temperature}.")
    prepare_output(out, what="image grid")  # before the store and the model are read
    enc = open_encodings(store)
    try:
        n = enc.features.shape[0]
        lo, hi = _parse_rows(rows, n)
        dev = auto_device(device)
        encoder, ckpt_path = store_encoder(enc, ckpt, device=dev)
        model = encoder.model
        features = torch.from_numpy(np.asarray(enc.features[lo:hi], dtype=np.float32)).to(dev)
        g = torch.Generator(device=dev).manual_seed(seed)
        images = encoder.decode(features, temperature=temperature, generator=g)
        attrs, sample_index = dict(enc.attrs), np.asarray(enc.sample_index[lo:hi])
    finally:
        enc.close()
    bits = model.cfg.image_bits
    decoded = to_uint8(images, bits)
    originals, missing = _original_pixels(model.cfg, attrs, sample_index, bits)
    ncols = min(hi - lo, 8)
    title, decoded_label = _figure_text(attrs, Path(str(store)).name, lo, hi, temperature)
    if originals is None:
        grid, labels = decoded, [decoded_label] * math.ceil((hi - lo) / ncols)
        title = f"{title}; originals not shown: {missing}"
    else:
        grid = interleave_rows(originals, decoded, ncols)
        labels, title = ["original", decoded_label] * (len(grid) // (2 * ncols)), f"{title}, below the originals"
    written = save_grid(out, grid, ncols=ncols, title=title, row_labels=labels)
    return {"store": str(store), "out": str(written), "rows": [lo, hi], "checkpoint": str(ckpt_path),
            "temperature": temperature}


def _figure_text(attrs: dict, name: str, lo: int, hi: int, temperature: float) -> tuple[str, str]:
    """The decode figure's title (what, on which data, by which model) and its decoded rows' label."""
    unit = "scalars" if attrs.get("granularity") == "element" else f"{attrs.get('granularity', 'dim')}s"
    kept = f"{int(attrs.get('n_dims_kept', 0)):,} of {int(attrs.get('n_dims_total', 0)):,}"
    pruned = "the prior mean" if temperature == 0 else f"prior samples at temperature {temperature:g}"
    model = attrs.get("model_config", {}).get("name") or "its checkpoint"
    title = (f"{attrs.get('data')}:{attrs.get('split')}, rows {lo}-{hi - 1} of {name}, decoded by {model} (step "
             f"{attrs.get('checkpoint_step')}) from the {kept} latent {unit} the store keeps (the pruned ones take "
             f"{pruned})")
    return title, f"decoded from {kept} {unit}"


def _original_pixels(cfg, attrs: dict, sample_index: np.ndarray, bits: int) -> tuple[np.ndarray | None, str]:
    """The encoded images of ``sample_index``, as the model saw them, or None and why they cannot be read."""
    data = str(attrs.get("data"))
    try:
        images = open_images(data, split=str(attrs.get("split")))
        check_images_fit(cfg, images.shape, data)
        pixels = images.read(sample_index)
    except UserError as err:  # the data moved or is not on this machine: the decodings are still worth showing
        return None, str(err).rstrip(".")
    return scored_pixels(cfg, prepare_batch(cfg, pixels), bits), ""


def _parse_rows(text: str, n: int) -> tuple[int, int]:
    try:
        a, _, b = str(text).partition(":")
        lo = int(a) if a.strip() else 0
        hi = int(b) if b.strip() else n
    except ValueError:
        raise UserError(f"--rows must look like 0:16, not '{text}'.") from None
    if not 0 <= lo < hi <= n:
        raise UserError(f"--rows {text} is out of range: the store has {n} rows.")
    return lo, hi
