"""What `vdvl probe` reads: the stores, their labels, and the inputs of every baseline.

Rows are named by their position in the *pool*: the training store's rows, then the test
store's. :class:`ProbeInputs` gives any set of pool rows' stored features, raw pixels or
model encodings, so the in-memory probe asks once for all the rows it uses and the
streaming probe asks block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError

Progress = Callable[[str], None]


@dataclass
class StorePart:
    """One opened store: its (lazy, verified) features, labels and where its images are."""

    path: Path
    enc: Any
    labels: np.ndarray
    sample_index: np.ndarray

    @property
    def attrs(self) -> dict:
        return self.enc.attrs

    @property
    def n_features(self) -> int:
        return int(self.enc.features.shape[1])


def _read_label_file(path: Path) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--labels file {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--labels file {path} is not a readable .npy array ({exc}).") from None
    if values.ndim != 1:
        raise UserError(f"--labels file {path} must hold a 1-D array of labels, not shape {values.shape}.")
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise UserError(f"--labels file {path} must hold integer class labels, not {values.dtype}.")
    return values.astype(np.int64)


def labels_of(enc: Any, path: Path, sample_index: np.ndarray, labels: str | Path | None, *,
              is_test: bool) -> tuple[np.ndarray, str]:
    """The rows' class labels and a short description of where they came from."""
    from ..data import open_images

    spec = None if labels is None else str(labels)
    if spec is not None and spec.lower().endswith(".npy"):
        if is_test:
            # A label file is one array for one store; the test store has to bring its own.
            if enc.labels is None:
                raise UserError(f"test store {path} has no labels; --labels {spec} applies to the training store "
                                f"only, so give a data spec to label both.")
            return np.asarray(enc.labels, dtype=np.int64), "store"
        values = _read_label_file(Path(spec))
        if len(values) != len(sample_index):
            raise UserError(f"--labels file {spec} has {len(values)} labels but {path} has {len(sample_index)} rows.")
        return values, f"file {spec}"
    if spec is not None:
        split = enc.attrs.get("split")
        if not split:
            raise UserError(f"{path} records no data split, so --labels {spec} cannot be matched to its rows; "
                            f"give a .npy file of labels instead.")
        found = open_images(spec, split=split).labels
        if found is None:
            raise UserError(f"--labels data spec '{spec}' has no labels for its '{split}' split.")
        if len(sample_index) and sample_index.max() >= len(found):
            raise UserError(f"--labels data spec '{spec}' has {len(found)} labels in its '{split}' split but "
                            f"{path} has rows for images up to index {sample_index.max()}.")
        return found[sample_index].astype(np.int64), f"data {spec}:{split}"
    if enc.labels is None:
        raise UserError(f"{path} has no labels; pass --labels with a .npy file of labels or a data spec.")
    return np.asarray(enc.labels, dtype=np.int64), "store"


def check_same_encoding(a: StorePart, b: StorePart) -> None:
    """The test store's columns must mean what the training store's do."""
    problem = None
    if a.n_features != b.n_features:
        problem = f"it has {b.n_features} features, not {a.n_features}"
    elif any(not np.array_equal(a.enc.dims[k], b.enc.dims[k]) for k in ("layer", "variate", "y", "x")):
        problem = "its columns are other latent dimensions"
    else:
        for key in ("checkpoint_sha256", "statistic"):
            if a.attrs.get(key) and b.attrs.get(key) and a.attrs[key] != b.attrs[key]:
                problem = f"its {key} differs"
                break
    if problem:
        raise UserError(f"test store {b.path} does not match {a.path}: {problem}; encode both splits with the same "
                        f"checkpoint and active set.")


def full_latent_means(model: Any, x: Any) -> Any:
    """(B, all latent scalars) posterior means of the unpruned pass of model-scale ``x``, each
    layer's (B, V, H, W) flattened in the natural (layer, variate, y, x) order."""
    import torch

    return torch.cat([layer.q_mean.flatten(1) for layer in model(x, posterior="mean").layers], 1)


class ProbeInputs:
    """Features of pool rows: stored, raw pixels (read per request), or encoded by a model."""

    def __init__(self, parts: list[StorePart], pool_part: np.ndarray, pool_row: np.ndarray, used: np.ndarray) -> None:
        self.parts, self.pool_part, self.pool_row, self.used = parts, pool_part, pool_row, used
        self._images: dict[tuple[str, str], Any] = {}

    def by_part(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, StorePart, np.ndarray]]:
        """(mask into ``rows``, part, store rows) for each part that has some of the pool ``rows``."""
        for p, part in enumerate(self.parts):
            mask = self.pool_part[rows] == p
            if mask.any():
                yield mask, part, self.pool_row[rows][mask]

    def images_of(self, part: StorePart) -> Any:
        """The store's split, opened lazily (cached per data spec and split): pixels are read
        only for the rows a probe asks for."""
        from ..data import open_images

        data, split = part.attrs.get("data"), part.attrs.get("split")
        if not data or not split:
            raise UserError(f"{part.path} does not record the data spec and split it encoded, so its images "
                            f"cannot be loaded.")
        key = (str(data), str(split))
        if key not in self._images:
            images = open_images(str(data), split=str(split))
            top = int(part.sample_index.max()) if len(part.sample_index) else -1
            if top >= len(images):
                raise UserError(f"{part.path} has rows for images up to index {top} but data '{data}' split "
                                f"'{split}' has {len(images)} images.")
            self._images[key] = images
        return self._images[key]

    def pixel_shape(self) -> tuple[int, int, int]:
        shapes = {self.images_of(part).shape for _, part, _ in self.by_part(self.used)}
        if len(shapes) != 1:
            raise UserError(f"the training and test stores' images differ in shape ({sorted(shapes)}).")
        return shapes.pop()

    def _images_rows(self, part: StorePart, rows: np.ndarray) -> np.ndarray:
        return self.images_of(part).read(part.sample_index[rows])

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored features (dequantised, verified chunk by chunk) of pool ``rows``, float32."""
        out = np.empty((len(rows), self.parts[0].n_features), dtype=np.float32)
        for mask, part, store_rows in self.by_part(rows):
            out[mask] = part.enc.features[store_rows]
        return out

    def pixel_rows(self, rows: np.ndarray) -> np.ndarray:
        """Raw pixels of pool ``rows``, flattened, scaled to [0, 1], float32."""
        out = None
        for mask, part, store_rows in self.by_part(rows):
            imgs = self._images_rows(part, store_rows)
            flat = imgs.reshape(len(imgs), -1).astype(np.float32) / 255.0
            if out is None:
                out = np.empty((len(rows), flat.shape[1]), dtype=np.float32)
            out[mask] = flat
        assert out is not None
        return out

    def encoded_rows(self, model: Any, features_of: Callable, n_features: int, rows: np.ndarray, what: str,
                     device: Any, progress: Progress, batch_size: int = 256) -> np.ndarray:
        """``features_of(model-scale batch)`` of pool ``rows`` -> (rows, n_features) float32."""
        import torch

        from ..model.inputs import check_images_fit, prepare_batch

        out = np.empty((len(rows), n_features), dtype=np.float32)
        for mask, part, store_rows in self.by_part(rows):
            images = self.images_of(part)
            check_images_fit(model.cfg, images.shape, str(part.attrs.get("data")))
            chunks = []
            with torch.no_grad():
                for start in range(0, len(store_rows), batch_size):  # pixels read batch by batch
                    progress(f"{what}: {start}/{len(store_rows)} images of {part.path.name}")
                    imgs = self._images_rows(part, store_rows[start:start + batch_size])
                    x = prepare_batch(model.cfg, imgs, device=device)
                    chunks.append(features_of(x).float().cpu())
            out[mask] = torch.cat(chunks).numpy()
        return out

    def full_rows(self, model: Any, rows: np.ndarray, device: Any, progress: Progress) -> np.ndarray:
        """Posterior means of every latent scalar (unpruned pass) of pool ``rows``."""
        total = sum(v * h * w for v, h, w in model.cfg.layer_shapes())
        return self.encoded_rows(model, lambda x: full_latent_means(model, x), total, rows, "full latents", device,
                                 progress)

    def pruned_rows(self, encoder: Any, rows: np.ndarray, device: Any, progress: Progress, what: str) -> np.ndarray:
        """Encodings of pool ``rows`` by ``encoder`` (an :class:`~vdvae_latents.latents.encoder.Encoder`)."""
        return self.encoded_rows(encoder.model, lambda x: encoder.encode(x)[0], encoder.n_features, rows, what,
                                 device, progress)

    # The in-memory probe's view: every used row at once.
    def full_latents(self, model: Any, device: Any, progress: Progress) -> np.ndarray:
        return self.full_rows(model, self.used, device, progress)

    def pruned_latents(self, encoder: Any, device: Any, progress: Progress, what: str) -> np.ndarray:
        return self.pruned_rows(encoder, self.used, device, progress, what)
