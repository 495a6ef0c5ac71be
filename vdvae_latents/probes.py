"""Downstream probes: how much label information the stored active dimensions carry.

`vdvl probe` fits a scikit-learn classifier on a store's features and compares it, on
exactly the same rows and protocol, with baselines of other sizes:

===============  ==============================================================  ===========
name             features                                                        bytes/image
===============  ==============================================================  ===========
active           the store's columns (the active latent dimensions)              K x itemsize
pixels           the raw pixels of the same images (flattened, / 255)            H*W*C uint8
full             every latent scalar: posterior means, unpruned forward pass     float32
random           as many dimensions as the store keeps (same granularity), drawn float32
                 at random and encoded exactly as the store was: pruned forward
                 pass, the rest from the prior, posterior means
random-unpruned  K columns drawn at random from ``full``                         float32
pca              PCA of the pixels to K components, fitted on training rows only float32
===============  ==============================================================  ===========

``random`` is the control for the pruning claim: it keeps other dimensions and prunes the
rest, so it differs from ``active`` only in *which* dimensions the KL ranking kept.
``random-unpruned`` is a different question: in the unpruned pass even a dimension with
~0 KL has a posterior mean close to its prior mean, a function of the layers above it,
so a random subset of ``full`` can carry much of the image's information. Random draws
are new for every seed.

Protocol (one run per seed 0 .. seeds-1, identical for every feature set):

1. Test rows: the rows of ``test_store`` when one is given, else a seeded stratified 20%
   hold-out of the store's rows (the seed changes it).
2. Training rows: the remaining rows; with ``max_train`` a seeded stratified subsample of
   at most that many. Every feature set of one seed sees the same training and test rows.
3. A ``Pipeline(StandardScaler, model)`` (logreg and linear-svm fit in the exact
   coordinates of the training rows' span; see :mod:`.probe_protocol`); its
   hyper-parameters are chosen by a seeded, shuffled, stratified K-fold cross-validation
   on the training rows only (:class:`~sklearn.model_selection.GridSearchCV`), refitted on
   all training rows, and scored once on the test rows.

Each report row gives the mean and standard deviation over the seeds (sample std,
``ddof=1``; 0 for one seed) of the test accuracy and of the chosen hyper-parameters'
CV accuracy, the hyper-parameters chosen per seed, and the mean fit time.

``full``, ``random`` and ``random-unpruned`` need the store's checkpoint (or ``ckpt``);
all baselines need the images (the store's ``data``/``split`` attributes). A
baseline asked for explicitly that cannot run is a :class:`UserError`; one of the
default set (``pixels``, ``random``) is skipped with a note instead, so `vdvl probe`
works on any store without its checkpoint or data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import save_figure
from .errors import UserError
from .probe_protocol import MODELS, check_model, check_training_labels, probe_features

BASELINES = ("pixels", "full", "random", "random-unpruned", "pca")
#: Baselines that run the model, so need the store's checkpoint.
MODEL_BASELINES = ("full", "random", "random-unpruned")
#: What `vdvl probe` runs without --baselines; these are skipped (with a note) when their
#: checkpoint or images are not available, instead of failing.
DEFAULT_BASELINES = ("pixels", "random")
HOLDOUT_FRACTION = 0.2
FLOAT32_BYTES = 4

Progress = Callable[[str], None]


# ============================================================================ row selection


def _stratified_pick(y: np.ndarray, n_pick: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n_pick`` rows of ``y`` with each class in proportion.

    Quotas are the floors of the exact shares, the leftover rows going to the classes with
    the largest remainders, so the counts (and ``n_pick``) do not depend on the seed; only
    which members are picked does.
    """
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = n_pick * counts / len(y)
    quota = np.floor(exact).astype(np.int64)
    leftover = int(n_pick - quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    picked = [rng.choice(np.flatnonzero(inverse == k), int(quota[k]), replace=False) for k in range(len(classes))]
    return np.sort(np.concatenate(picked)).astype(np.int64)


@dataclass
class _Split:
    """One seed's rows, as indices into the pool (store rows, then test-store rows)."""

    seed: int
    train: np.ndarray
    test: np.ndarray


def _make_splits(y_store: np.ndarray, n_test_store: int, *, seeds: int, max_train: int | None,
                 cv: int, store: Path) -> list[_Split]:
    """The training and test rows of every seed; UserError if the labels cannot support them."""
    n = len(y_store)
    classes = np.unique(y_store)
    if len(classes) < 2:
        raise UserError(f"the labels of {store} have only one class ({classes[0]}); a probe needs at least 2.")
    splits = []
    for seed in range(seeds):
        if n_test_store:
            train, test = np.arange(n), n + np.arange(n_test_store)
            where = f"the training rows of {store}"
        else:
            # Independent streams per purpose, so --max-train does not change the hold-out.
            held = _stratified_pick(y_store, math.ceil(HOLDOUT_FRACTION * n), np.random.default_rng([seed, 1]))
            test = held
            train = np.setdiff1d(np.arange(n), held)
            where = f"the training rows of {store} after the 20% hold-out"
        if max_train is not None and max_train < len(train):
            train = train[_stratified_pick(y_store[train], max_train, np.random.default_rng([seed, 2]))]
            where += f" with --max-train {max_train}"
        check_training_labels(y_store[train], cv, where)
        splits.append(_Split(seed, train, test))
    return splits


# ============================================================================ stores and inputs


@dataclass
class _Part:
    """One opened store: its features, labels and where its images are."""

    path: Path
    enc: Any
    labels: np.ndarray
    sample_index: np.ndarray
    _features: np.ndarray | None = field(default=None, repr=False)

    @property
    def attrs(self) -> dict:
        return self.enc.attrs

    @property
    def features(self) -> np.ndarray:
        if self._features is None:
            # Stores are small by design (that is the point of them): read all rows once.
            values = np.asarray(self.enc.features, dtype=np.float32)
            if not np.isfinite(values).all():
                raise UserError(f"{self.path} has NaN or infinite features (was it written completely?).")
            self._features = values
        return self._features


def _parse_baselines(baselines: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """(names in order, explicit?). None means the default set, which may skip quietly."""
    if baselines is None:
        return list(DEFAULT_BASELINES), False
    items = baselines.split(",") if isinstance(baselines, str) else list(baselines)
    names: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if item in ("", "none"):
            continue
        if item not in BASELINES:
            raise UserError(f"--baselines has an unknown baseline '{item}'; choose from {', '.join(BASELINES)}.")
        if item not in names:
            names.append(item)
    return names, True


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


def _labels_of(enc: Any, path: Path, sample_index: np.ndarray, labels: str | Path | None, *,
               is_test: bool) -> tuple[np.ndarray, str]:
    """The rows' class labels and a short description of where they came from."""
    from .data import load_images

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
        found = load_images(spec, split=split).labels
        if found is None:
            raise UserError(f"--labels data spec '{spec}' has no labels for its '{split}' split.")
        if len(sample_index) and sample_index.max() >= len(found):
            raise UserError(f"--labels data spec '{spec}' has {len(found)} labels in its '{split}' split but "
                            f"{path} has rows for images up to index {sample_index.max()}.")
        return found[sample_index].astype(np.int64), f"data {spec}:{split}"
    if enc.labels is None:
        raise UserError(f"{path} has no labels; pass --labels with a .npy file of labels or a data spec.")
    return np.asarray(enc.labels, dtype=np.int64), "store"


def _check_same_encoding(a: _Part, b: _Part) -> None:
    """The test store's columns must mean what the training store's do."""
    problem = None
    if a.features.shape[1] != b.features.shape[1]:
        problem = f"it has {b.features.shape[1]} features, not {a.features.shape[1]}"
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


class _Inputs:
    """Images and full latents of the pool's used rows, loaded once and only when needed."""

    def __init__(self, parts: list[_Part], pool_part: np.ndarray, pool_row: np.ndarray, used: np.ndarray) -> None:
        self.parts, self.pool_part, self.pool_row, self.used = parts, pool_part, pool_row, used
        self._images: dict[tuple[str, str], Any] = {}

    def _rows_by_part(self):
        """(mask into ``used``, part, store rows) for each part that has used rows."""
        for p, part in enumerate(self.parts):
            mask = self.pool_part[self.used] == p
            if mask.any():
                yield mask, part, self.pool_row[self.used][mask]

    def images_of(self, part: _Part) -> Any:
        """The store's split as an ImageSet (cached per data spec and split)."""
        from .data import load_images

        data, split = part.attrs.get("data"), part.attrs.get("split")
        if not data or not split:
            raise UserError(f"{part.path} does not record the data spec and split it encoded, so its images "
                            f"cannot be loaded.")
        key = (str(data), str(split))
        if key not in self._images:
            images = load_images(str(data), split=str(split))
            top = int(part.sample_index.max()) if len(part.sample_index) else -1
            if top >= len(images):
                raise UserError(f"{part.path} has rows for images up to index {top} but data '{data}' split "
                                f"'{split}' has {len(images)} images.")
            self._images[key] = images
        return self._images[key]

    def store_features(self) -> np.ndarray:
        """Used rows' stored features (the training store's and the test store's)."""
        out = np.empty((len(self.used), self.parts[0].features.shape[1]), dtype=np.float32)
        for mask, part, rows in self._rows_by_part():
            out[mask] = part.features[rows]
        return out

    def pixel_shape(self) -> tuple[int, int, int]:
        shapes = {self.images_of(part).shape for _, part, _ in self._rows_by_part()}
        if len(shapes) != 1:
            raise UserError(f"the training and test stores' images differ in shape ({sorted(shapes)}).")
        return shapes.pop()

    def pixels(self) -> np.ndarray:
        """Used rows' raw pixels, flattened, scaled to [0, 1]."""
        out = None
        for mask, part, rows in self._rows_by_part():
            imgs = self.images_of(part).images[part.sample_index[rows]]
            flat = imgs.reshape(len(imgs), -1).astype(np.float32) / 255.0
            if out is None:
                out = np.empty((len(self.used), flat.shape[1]), dtype=np.float32)
            out[mask] = flat
        assert out is not None
        return out

    def _encoded(self, model: Any, features_of: Callable, n_features: int, what: str, device: Any,
                 progress: Progress, batch_size: int = 256) -> np.ndarray:
        """Used rows' ``features_of(model-scale batch)`` -> (rows, n_features) float32."""
        import torch

        from .batches import check_images_fit, prepare_batch

        out = np.empty((len(self.used), n_features), dtype=np.float32)
        for mask, part, rows in self._rows_by_part():
            images = self.images_of(part)
            check_images_fit(model.cfg, images.shape, str(part.attrs.get("data")))
            imgs = images.images[part.sample_index[rows]]
            chunks = []
            with torch.no_grad():
                for start in range(0, len(imgs), batch_size):
                    progress(f"{what}: {start}/{len(imgs)} images of {part.path.name}")
                    x = prepare_batch(model.cfg, imgs[start:start + batch_size], device=device)
                    chunks.append(features_of(x).float().cpu())
            out[mask] = torch.cat(chunks).numpy()
        return out

    def full_latents(self, model: Any, device: Any, progress: Progress) -> np.ndarray:
        """Used rows' posterior means of every latent scalar, unpruned forward pass."""
        total = sum(v * h * w for v, h, w in model.cfg.layer_shapes())
        return self._encoded(model, lambda x: full_latent_means(model, x), total, "full latents", device, progress)

    def pruned_latents(self, encoder: Any, device: Any, progress: Progress, what: str) -> np.ndarray:
        """Used rows' encodings by ``encoder`` (an :class:`~.encoding.Encoder`)."""
        return self._encoded(encoder.model, lambda x: encoder.encode(x)[0], encoder.n_features, what, device,
                             progress)


def full_latent_means(model: Any, x: Any) -> Any:
    """(B, all latent scalars) posterior means of the unpruned pass of model-scale ``x``, each
    layer's (B, V, H, W) flattened in the natural (layer, variate, y, x) order."""
    import torch

    return torch.cat([layer.q_mean.flatten(1) for layer in model(x, posterior="mean").layers], 1)


# ============================================================================ feature sets


@dataclass
class _FeatureSet:
    """One report row's features. ``arrays(split, train_pos, test_pos)`` gives (X_train, X_test)."""

    name: str
    description: str
    n_features: int
    dtype: str
    bytes_per_image: int
    arrays: Callable[[_Split, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    features_per_seed: list[int] = field(default_factory=list)


def _fixed(name: str, description: str, X: np.ndarray, dtype: str, itemsize: int) -> _FeatureSet:
    return _FeatureSet(name, description, X.shape[1], dtype, X.shape[1] * itemsize,
                       lambda split, tr, te: (X[tr], X[te]))


def _pca_set(pixels: np.ndarray, k: int, notes: list[str]) -> _FeatureSet:
    from sklearn.decomposition import PCA

    fs = _FeatureSet("pca", "PCA of the pixels (fitted on the training rows)", k, "float32", k * FLOAT32_BYTES,
                     lambda *a: (np.empty(0), np.empty(0)))

    def arrays(split: _Split, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Components are capped by what the training rows can span.
        n = min(k, len(tr), pixels.shape[1])
        if n < k:
            limit = f"the images have {pixels.shape[1]} pixel values" if n == pixels.shape[1] \
                else f"there are {len(tr)} training rows"
            note = f"pca: {n} components instead of {k}, as {limit}."
            if note not in notes:
                notes.append(note)
        pca = PCA(n_components=n, random_state=split.seed).fit(pixels[tr])
        fs.features_per_seed.append(n)
        return pca.transform(pixels[tr]).astype(np.float32), pca.transform(pixels[te]).astype(np.float32)

    fs.arrays = arrays
    return fs


def _random_unpruned_set(full: np.ndarray, k: int) -> _FeatureSet:
    def arrays(split: _Split, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = np.sort(np.random.default_rng([split.seed, 3]).choice(full.shape[1], k, replace=False))
        return full[np.ix_(tr, cols)], full[np.ix_(te, cols)]  # no copy of the unused columns

    return _FeatureSet("random-unpruned", f"{k} random latent scalars of the unpruned pass", k, "float32",
                       k * FLOAT32_BYTES, arrays)


def random_active_set(layer_shapes: Sequence[tuple[int, int, int]], granularity: str, n_active: int,
                      seed: int) -> Any:
    """An :class:`~.kl_analysis.ActiveSet` of ``n_active`` dimensions drawn uniformly (seeded)."""
    from .kl_analysis import ActiveSet, dimension_table

    table = dimension_table(layer_shapes, granularity)
    selected = np.sort(np.random.default_rng([seed, 4]).choice(len(table), n_active, replace=False))
    return ActiveSet(granularity=granularity, table=table, selected=selected, rule="keep",
                     value=n_active / len(table), layer_shapes=[tuple(s) for s in layer_shapes], n_images=0)


def _random_pruned_set(per_seed: dict[int, np.ndarray], n_dims: int, granularity: str) -> _FeatureSet:
    """The encodings of each seed's random active set; variates differ in size, so the
    feature count varies by draw."""
    def arrays(split: _Split, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return per_seed[split.seed][tr], per_seed[split.seed][te]

    counts = [per_seed[seed].shape[1] for seed in sorted(per_seed)]
    return _FeatureSet("random", f"{n_dims} random {granularity}s kept in place of the active ones (pruned pass)",
                       counts[0], "float32", counts[0] * FLOAT32_BYTES, arrays, features_per_seed=counts)


def _store_dims(part: _Part) -> tuple[str, int, int]:
    """(granularity, dimensions kept, dimensions in all) as the store records them."""
    attrs = part.attrs
    try:
        return str(attrs["granularity"]), int(attrs["n_dims_kept"]), int(attrs["n_dims_total"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{part.path} does not record its granularity and dimension counts, so the random "
                        f"baseline cannot draw the same number of dimensions; was it written by vdvl encode?"
                        ) from None


# ============================================================================ the run


def _checkpoint_for(part: _Part, ckpt: str | Path | None, names: list[str], explicit: bool
                    ) -> tuple[Path | None, str | None]:
    """The checkpoint for full/random (sha256-checked), or (None, reason) to skip them."""
    from .checkpoints import file_sha256, resolve_checkpoint

    if ckpt is not None:
        path = resolve_checkpoint(ckpt)
    else:
        recorded = part.attrs.get("checkpoint")
        if not recorded or not Path(recorded).exists():
            reason = (f"the checkpoint {recorded} recorded in {part.path} does not exist" if recorded
                      else f"{part.path} records no checkpoint")
            if explicit:
                raise UserError(f"--baselines {','.join(names)} needs the model, but {reason}; pass --ckpt PATH.")
            return None, f"{reason} (pass --ckpt PATH)"
        path = resolve_checkpoint(recorded)
    expected = part.attrs.get("checkpoint_sha256")
    if expected and file_sha256(path) != expected:
        raise UserError(f"checkpoint {path} is not the one {part.path} was encoded with (its sha256 differs).")
    return path, None


def _summarise(fs: _FeatureSet, results: list[dict]) -> dict:
    acc = np.array([r["test_accuracy"] for r in results])
    cv_acc = np.array([r["cv_accuracy"] for r in results])
    ddof = 1 if len(results) > 1 else 0
    per_seed = fs.features_per_seed or [fs.n_features] * len(results)
    features = int(round(float(np.mean(per_seed))))
    bytes_per_image = fs.bytes_per_image if not fs.features_per_seed else features * FLOAT32_BYTES
    return {
        "name": fs.name, "description": fs.description, "features": features, "dtype": fs.dtype,
        "bytes_per_image": int(bytes_per_image), "features_per_seed": [int(f) for f in per_seed],
        "test_accuracy": float(acc.mean()), "test_accuracy_std": float(acc.std(ddof=ddof)),
        "cv_accuracy": float(cv_acc.mean()), "cv_accuracy_std": float(cv_acc.std(ddof=ddof)),
        "params": [r["params"] for r in results],
        "fit_seconds": float(np.mean([r["fit_seconds"] for r in results])),
        "test_accuracies": [float(a) for a in acc],
        "convergence_warnings": int(sum(r["convergence_warnings"] for r in results)),
    }


def run_probe(store: str | Path, *, labels: str | Path | None = None, model: str = "logreg",
              baselines: str | Sequence[str] | None = None, test_store: str | Path | None = None,
              ckpt: str | Path | None = None, max_train: int | None = None, seeds: int = 3, cv: int = 3,
              device: str = "cpu", progress: Progress | None = None) -> dict:
    """Probe a store's features and the baselines on the same rows; returns the report.

    Parameters:
        store: a store written by `vdvl encode` (Zarr or HDF5).
        labels: None (the store's labels), a ``.npy`` file with one integer label per row,
            or a data spec whose split (the store's ``split`` attribute) has labels.
        model: ``logreg`` (default), ``linear-svm``, ``knn`` or ``mlp``.
        baselines: names from :data:`BASELINES` (a list or a comma-separated string). None
            runs :data:`DEFAULT_BASELINES` and skips, with a note, those whose checkpoint or
            images are missing; named baselines that cannot run raise :class:`UserError`.
        test_store: the test split's store (same checkpoint and columns): its rows become
            the test set instead of a 20% hold-out.
        ckpt: the checkpoint for ``full``/``random`` instead of the one the store records.
        max_train: at most this many training rows (seeded, stratified; the same for every
            feature set of a seed).
        seeds: number of seeds (0 .. seeds-1); cv: cross-validation folds.
        device: where the full latents are computed (``cpu``, ``cuda`` or ``auto``).
        progress: called with a short message before each step.

    Returns:
        A dict: ``store``, ``test_store``, ``model``, ``labels`` (their source), ``n_rows``,
        ``n_train``, ``n_test``, ``n_classes``, ``chance_accuracy`` (share of the test rows
        in the most frequent training class), ``seeds``, ``cv``, ``max_train``,
        ``holdout_fraction`` (None with a test store), ``checkpoint`` (used for
        full/random, else None), ``rows`` (one dict per feature set: ``name``,
        ``description``, ``features``, ``dtype``, ``bytes_per_image``, ``test_accuracy``
        and ``test_accuracy_std``, ``cv_accuracy`` and ``cv_accuracy_std``, ``params``
        (per seed), ``fit_seconds`` (mean per seed), ``test_accuracies``,
        ``convergence_warnings``), ``skipped`` (name and reason) and ``notes``.
    """
    from .stores import open_encodings

    model = check_model(model)
    for name, value, low in (("--seeds", seeds, 1), ("--cv", cv, 2), ("--max-train", max_train, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low):
            raise UserError(f"{name} must be an integer of at least {low}, not {value!r}.")
    wanted, explicit = _parse_baselines(baselines)
    store = Path(store)
    test_path = Path(test_store) if test_store is not None else None
    if test_path is not None and test_path.resolve() == store.resolve():
        raise UserError(f"--test-store {test_path} is the store being probed; give the test split's store.")
    say = progress or (lambda message: None)

    with ExitStack() as stack:
        parts: list[_Part] = []
        sources = []
        for path, is_test in ((store, False),) + (((test_path, True),) if test_path is not None else ()):
            enc = stack.enter_context(open_encodings(path))
            sample_index = np.asarray(enc.sample_index, dtype=np.int64)
            y, source = _labels_of(enc, path, sample_index, labels, is_test=is_test)
            parts.append(_Part(path, enc, y, sample_index))
            sources.append(source)
        main = parts[0]
        if len(parts) == 2:
            _check_same_encoding(main, parts[1])

        # The pool: the store's rows, then the test store's. Splits index into it.
        pool_part = np.concatenate([np.full(len(p.labels), i) for i, p in enumerate(parts)])
        pool_row = np.concatenate([np.arange(len(p.labels)) for p in parts])
        y_pool = np.concatenate([p.labels for p in parts])
        splits = _make_splits(main.labels, len(parts[1].labels) if len(parts) == 2 else 0, seeds=seeds,
                              max_train=max_train, cv=cv, store=store)
        used = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for s in splits]))
        position = np.full(len(y_pool), -1, dtype=np.int64)
        position[used] = np.arange(len(used))
        inputs = _Inputs(parts, pool_part, pool_row, used)

        notes: list[str] = []
        skipped: list[dict] = []

        def skip(names: list[str], reason: str) -> None:
            for name in names:
                skipped.append({"name": name, "reason": reason})
            notes.append(f"{' and '.join(names)} skipped: {reason}.")

        k = main.features.shape[1]
        store_dtype = np.dtype(main.enc.features.dtype)
        feature_sets = [_fixed("active", "the store's active latent dimensions", inputs.store_features(),
                               store_dtype.name, store_dtype.itemsize)]

        # ---- the checkpoint first (full, random): a wrong --ckpt fails before any slow work
        checkpoint = None
        model_names = [n for n in wanted if n in MODEL_BASELINES]
        if model_names:
            checkpoint, reason = _checkpoint_for(main, ckpt, model_names, explicit)
            if checkpoint is None:
                skip(model_names, reason or "no checkpoint")
                wanted = [n for n in wanted if n not in model_names]

        # ---- images: pixels and pca use them, full and random encode them
        pixels = None
        if wanted:
            try:
                say("loading images")
                inputs.pixel_shape()  # loads and checks every used store's images
                if any(n in wanted for n in ("pixels", "pca")):
                    pixels = inputs.pixels()
            except UserError as exc:
                if explicit:
                    raise
                skip(wanted, str(exc).rstrip("."))
                wanted = []

        # ---- full latents (full, random)
        full = None
        random_pruned: dict[int, np.ndarray] = {}
        if any(n in wanted for n in MODEL_BASELINES):
            from .checkpoints import load_model
            from .encoding import Encoder
            from .pipeline import auto_device

            granularity, n_dims, n_total = _store_dims(main) if "random" in wanted else ("", 0, 0)
            dev = auto_device(device)
            say("loading the checkpoint")
            net, _ = load_model(checkpoint, ema=True, device=dev)
            if "full" in wanted or "random-unpruned" in wanted:
                full = inputs.full_latents(net, dev, say)
            if "random" in wanted:
                if n_dims >= n_total:
                    notes.append(f"random: the store keeps all {n_total} dimensions, so it equals active.")
                for split in splits:
                    drawn = random_active_set(net.cfg.layer_shapes(), granularity, min(n_dims, n_total), split.seed)
                    random_pruned[split.seed] = inputs.pruned_latents(Encoder(net, drawn), dev, say,
                                                                      f"random set {split.seed + 1}/{len(splits)}")
            del net
        else:
            checkpoint = None

        for name in wanted:
            if name == "pixels":
                # One uint8 per pixel value: H*W*C bytes per image.
                feature_sets.append(_fixed("pixels", "raw pixels / 255", pixels, "uint8", 1))
            elif name == "pca":
                feature_sets.append(_pca_set(pixels, k, notes))
            elif name == "full":
                feature_sets.append(_fixed("full", "every latent scalar (posterior means, unpruned)", full,
                                           "float32", FLOAT32_BYTES))
            elif name == "random":
                feature_sets.append(_random_pruned_set(random_pruned, n_dims, granularity))
            elif name == "random-unpruned":
                if k >= full.shape[1]:
                    notes.append(f"random-unpruned: the store keeps all {full.shape[1]} latent scalars, so it "
                                 f"equals full.")
                feature_sets.append(_random_unpruned_set(full, min(k, full.shape[1])))

        # ---- the probes
        rows = []
        for fs in feature_sets:
            results = []
            for split in splits:
                say(f"{fs.name}: seed {split.seed + 1}/{len(splits)}")
                tr, te = position[split.train], position[split.test]
                X_train, X_test = fs.arrays(split, tr, te)
                results.append(probe_features(X_train, y_pool[split.train], X_test, y_pool[split.test],
                                              model=model, seed=split.seed, cv=cv))
            rows.append(_summarise(fs, results))

        n_train, n_test = len(splits[0].train), len(splits[0].test)
        chance = []
        for split in splits:
            values, counts = np.unique(y_pool[split.train], return_counts=True)
            chance.append(float(np.mean(y_pool[split.test] == values[np.argmax(counts)])))
        unseen = np.setdiff1d(y_pool[splits[0].test], y_pool[splits[0].train])
        if len(unseen):
            notes.append(f"the test rows have classes never seen in training ({', '.join(map(str, unseen))}).")
        if ckpt is not None and checkpoint is None and not skipped:
            notes.append("--ckpt was not used: no full or random baseline was asked for.")

        return {
            "store": str(store), "test_store": str(test_path) if test_path is not None else None,
            "model": model, "labels": sources[0] if len(set(sources)) == 1 else " / ".join(sources),
            "n_rows": int(len(main.labels)), "n_train": int(n_train), "n_test": int(n_test),
            "n_classes": int(len(np.unique(main.labels))), "chance_accuracy": float(np.mean(chance)),
            "seeds": int(seeds), "cv": int(cv), "max_train": max_train,
            "holdout_fraction": None if test_path is not None else HOLDOUT_FRACTION,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "rows": rows, "skipped": skipped, "notes": notes,
        }


# ============================================================================ the plot


def plot_probe(report: dict, path: str | Path) -> Path:
    """Test accuracy against features (left) and bytes per image (right), log x, one point per
    row with its seed spread as error bars; the majority-class rate as a dashed line."""
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write --plot {path}: the directory {path.parent} does not exist.")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    supported = fig.canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in supported:
        raise UserError(f"--plot {path} must end in .png (or another image type: {', '.join(sorted(supported))}).")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in ((axes[0], "features", "features per image"),
                           (axes[1], "bytes_per_image", "bytes per image")):
        for i, row in enumerate(report["rows"]):
            ax.errorbar(row[key], row["test_accuracy"], yerr=row["test_accuracy_std"], fmt="o", capsize=4,
                        color=f"C{i}", label=f"{row['name']} ({row['features']})")
            ax.annotate(row["name"], (row[key], row["test_accuracy"]), textcoords="offset points",
                        xytext=(6, 4 if i % 2 == 0 else -12),  # alternate, so neighbours stay legible
                        fontsize=8)
        ax.axhline(report["chance_accuracy"], color="grey", linestyle="--", linewidth=1, label="majority class")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8, loc="lower right")
    source = f"test store {Path(report['test_store']).name}" if report.get("test_store") else "20% hold-out"
    fig.suptitle(f"{report['model']} probe on {Path(report['store']).name}: {report['n_train']} training rows, "
                 f"{report['n_test']} test rows ({source}); mean ± std over {report['seeds']} seeds", fontsize=10)
    return save_figure(fig, path)


__all__ = ["run_probe", "probe_features", "plot_probe", "check_training_labels", "MODELS", "BASELINES",
           "DEFAULT_BASELINES"]
