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
   coordinates of the training rows' span; see :mod:`~vdvae_latents.downstream.protocol`); its
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

from ..core.errors import UserError
from .feature_sets import (
    FLOAT32_BYTES,
    IN_MEMORY_FACTOR,
    FeatureSet,
    UsedValues,
    fixed_set,
    pca_set,
    random_active_set,
    random_pruned_set,
    random_unpruned_set,
)
from .inputs import (
    ProbeInputs,
    StorePart,
    check_same_encoding,
    full_latent_means,
    labels_of,
)
from .figures import plot_probe  # noqa: F401 - the probe's figure, importable beside run_probe
from .protocol import MODELS, check_model, check_training_labels, probe_features
from .streaming import STREAM_MODELS, block_rows_for, blocks, stream_probe

BASELINES = ("pixels", "full", "random", "random-unpruned", "pca")
#: Baselines that run the model, so need the store's checkpoint.
MODEL_BASELINES = ("full", "random", "random-unpruned")
#: What `vdvl probe` runs without --baselines; these are skipped (with a note) when their
#: checkpoint or images are not available, instead of failing.
DEFAULT_BASELINES = ("pixels", "random")
HOLDOUT_FRACTION = 0.2
STREAM_CHOICES = ("auto", "always", "never")
#: Bytes a feature set may take in memory before `vdvl probe` streams it (--memory-budget).
DEFAULT_MEMORY_BUDGET = 4e9

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


@dataclass
class _Pool:
    """Every row a run may use: the store's, then the test store's. Splits index into it."""

    inputs: ProbeInputs
    y: np.ndarray  # the label of each pool row
    unit: np.ndarray  # the store chunk of each pool row (streaming reads whole chunks)
    position: np.ndarray  # each pool row's index among the used rows (-1: no split uses it)

    @property
    def used(self) -> np.ndarray:
        """The pool rows some seed trains or tests on, sorted."""
        return self.inputs.used


def _make_pool(parts: list[StorePart], splits: list[_Split]) -> _Pool:
    """The pool of the opened stores, and the rows ``splits`` use."""
    pool_part = np.concatenate([np.full(len(p.labels), i) for i, p in enumerate(parts)])
    pool_row = np.concatenate([np.arange(len(p.labels)) for p in parts])
    unit = np.concatenate([i * (1 << 40) + np.arange(len(p.labels)) // p.enc.chunk_rows
                           for i, p in enumerate(parts)])
    y = np.concatenate([p.labels for p in parts])
    used = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for s in splits]))
    position = np.full(len(y), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    return _Pool(ProbeInputs(parts, pool_part, pool_row, used), y, unit, position)


# ============================================================================ options and inputs


def _check_options(model: str, *, seeds: Any, cv: Any, max_train: Any, epochs: Any, stream: Any,
                   memory_budget: Any) -> str:
    """The model's name as :data:`MODELS` spells it; UserError naming the first option out of range."""
    model = check_model(model)
    for name, value, low in (("--seeds", seeds, 1), ("--cv", cv, 2), ("--max-train", max_train, 2),
                             ("--epochs", epochs, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low):
            raise UserError(f"{name} must be an integer of at least {low}, not {value!r}.")
    if stream not in STREAM_CHOICES:
        raise UserError(f"--stream must be one of {', '.join(STREAM_CHOICES)}, not '{stream}'.")
    if not memory_budget > 0:
        raise UserError(f"--memory-budget must be a positive number of bytes, not {memory_budget}.")
    return model


def _store_paths(store: str | Path, test_store: str | Path | None) -> tuple[Path, Path | None]:
    store = Path(store)
    test_path = Path(test_store) if test_store is not None else None
    if test_path is not None and test_path.resolve() == store.resolve():
        raise UserError(f"--test-store {test_path} is the store being probed; give the test split's store.")
    return store, test_path


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


def _open_parts(stack: ExitStack, store: Path, test_path: Path | None, labels: str | Path | None
                ) -> tuple[list[StorePart], str]:
    """The opened store and test store (checked to have the same columns) with their labels,
    and where the labels came from; ``stack`` closes the stores."""
    from ..stores.reader import open_encodings

    parts: list[StorePart] = []
    sources = []
    for path, is_test in ((store, False),) + (((test_path, True),) if test_path is not None else ()):
        enc = stack.enter_context(open_encodings(path))
        sample_index = np.asarray(enc.sample_index, dtype=np.int64)
        y, source = labels_of(enc, path, sample_index, labels, is_test=is_test)
        parts.append(StorePart(path, enc, y, sample_index))
        sources.append(source)
    if len(parts) == 2:
        check_same_encoding(parts[0], parts[1])
    return parts, sources[0] if len(set(sources)) == 1 else " / ".join(sources)


def _store_dims(part: StorePart) -> tuple[str, int, int]:
    """(granularity, dimensions kept, dimensions in all) as the store records them."""
    attrs = part.attrs
    try:
        return str(attrs["granularity"]), int(attrs["n_dims_kept"]), int(attrs["n_dims_total"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{part.path} does not record its granularity and dimension counts, so the random "
                        f"baseline cannot draw the same number of dimensions; was it written by vdvl encode?"
                        ) from None


def _checkpoint_for(part: StorePart, ckpt: str | Path | None, names: list[str], explicit: bool
                    ) -> tuple[Path | None, str | None]:
    """The checkpoint for full/random (sha256-checked), or (None, reason) to skip them."""
    from ..model.checkpoints import file_sha256, resolve_checkpoint

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


# ============================================================================ feature sets


@dataclass
class _Log:
    """The report's notes and skipped baselines."""

    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, names: list[str], reason: str) -> None:
        for name in names:
            self.skipped.append({"name": name, "reason": reason})
        self.notes.append(f"{' and '.join(names)} skipped: {reason}.")


def _with_checkpoint(main: StorePart, ckpt: str | Path | None, wanted: list[str], explicit: bool, log: _Log
                     ) -> tuple[list[str], Path | None]:
    """The baselines that remain once those that run the model have their checkpoint, and it
    (None when none of them is wanted or they are skipped)."""
    model_names = [n for n in wanted if n in MODEL_BASELINES]
    if not model_names:
        return wanted, None
    if main.attrs.get("content") == "scores":  # `vdvl score`: its columns are not latent dimensions
        reason = f"{main.path} holds per-image scores, not latent encodings"
        if explicit:
            raise UserError(f"the {', '.join(model_names)} baseline(s) compare latent dimensions, but {reason}.")
        log.skip(model_names, reason)
        return [n for n in wanted if n not in model_names], None
    checkpoint, reason = _checkpoint_for(main, ckpt, model_names, explicit)
    if checkpoint is None:
        log.skip(model_names, reason or "no checkpoint")
        return [n for n in wanted if n not in model_names], None
    return wanted, checkpoint


def _with_images(inputs: ProbeInputs, wanted: list[str], explicit: bool, log: _Log, say: Progress
                 ) -> tuple[list[str], int]:
    """The baselines that remain once the images are loaded (pixels and pca use them, full and
    random encode them), and the pixel values per image."""
    if not wanted:
        return wanted, 0
    try:
        say("loading images")
        h, w, c = inputs.pixel_shape()  # loads and checks every used store's images
    except UserError as exc:
        if explicit:
            raise
        log.skip(wanted, str(exc).rstrip("."))
        return [], 0
    return wanted, h * w * c


def _stream_rule(stream: str, n_used: int, memory_budget: float) -> Callable[[int], bool]:
    """Whether a feature set of a given width is streamed (``--stream``, ``--memory-budget``)."""
    def streamed(width: int) -> bool:
        return stream == "always" or (stream == "auto" and n_used * width * IN_MEMORY_FACTOR > memory_budget)

    return streamed


class _FeatureSets:
    """Makes a run's feature sets on its pool: the store's columns (:meth:`active`) and each
    baseline (:meth:`make`). Values of the used rows that several sets or seeds share (the
    pixels, the full latents) are computed once, on first use (``memo``)."""

    def __init__(self, main: StorePart, pool: _Pool, splits: list[_Split], n_pixels: int,
                 streamed: Callable[[int], bool], notes: list[str], say: Progress) -> None:
        self.main, self.pool, self.splits, self.n_pixels = main, pool, splits, n_pixels
        self.streamed, self.notes, self.say = streamed, notes, say
        self.k = main.n_features
        self.memo = UsedValues()
        # The model of full, random and random-unpruned (load_model); it lives as long as the
        # feature sets that encode with it.
        self.net: Any = None
        self.dev: Any = None

    def load_model(self, checkpoint: Path, device: str) -> None:
        from ..core.runtime import auto_device
        from ..model.checkpoints import load_model

        self.dev = auto_device(device)
        self.say("loading the checkpoint")
        # _checkpoint_for has checked the file against the store's recorded sha256: not hashed again.
        self.net, _ = load_model(checkpoint, ema=True, device=self.dev,
                                 sha256=self.main.attrs.get("checkpoint_sha256") or None)

    def make(self, name: str) -> FeatureSet:
        """The feature set of the baseline ``name`` (one of :data:`BASELINES`)."""
        return {"pixels": self.pixels, "pca": self.pca, "full": self.full, "random-unpruned": self.random_unpruned,
                "random": self.random}[name]()

    def active(self) -> FeatureSet:
        from ..stores.schema import disk_bytes

        inputs, used, dtype = self.pool.inputs, self.pool.used, np.dtype(self.main.enc.dtype)
        fs = fixed_set("active", "the store's active latent dimensions", dtype.name, dtype.itemsize, self.k,
                       lambda: self.memo.get("active", lambda: inputs.store_rows(used)), inputs.store_rows,
                       self.streamed(self.k))
        fs.disk_bytes_per_image = disk_bytes(self.main.path) / max(len(self.main.labels), 1)
        return fs

    def _used_pixels(self) -> np.ndarray:
        return self.memo.get("pixels", lambda: self.pool.inputs.pixel_rows(self.pool.used))

    def pixels(self) -> FeatureSet:
        # One uint8 per pixel value: H*W*C bytes per image.
        return fixed_set("pixels", "raw pixels / 255", "uint8", 1, self.n_pixels, self._used_pixels,
                         self.pool.inputs.pixel_rows, self.streamed(self.n_pixels))

    def pca(self) -> FeatureSet:
        unit, block = self.pool.unit, block_rows_for(self.n_pixels)
        return pca_set(self.k, self.n_pixels, self._used_pixels, self.pool.inputs.pixel_rows,
                       lambda split: blocks(split.train, unit, block), self.notes,
                       self.streamed(max(self.n_pixels, self.k)))

    def _full_latents(self) -> tuple[int, Callable[[], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
        """(latent scalars in all, their values on the used rows, the function of pool rows)."""
        net, dev, say, inputs = self.net, self.dev, self.say, self.pool.inputs
        total = sum(v * h * w for v, h, w in net.cfg.layer_shapes())
        return (total, lambda: self.memo.get("full", lambda: inputs.full_latents(net, dev, say)),
                lambda rows: inputs.full_rows(net, rows, dev, say))

    def full(self) -> FeatureSet:
        total, used_full, full_rows = self._full_latents()
        return fixed_set("full", "every latent scalar (posterior means, unpruned)", "float32", FLOAT32_BYTES, total,
                         used_full, full_rows, self.streamed(total))

    def random_unpruned(self) -> FeatureSet:
        total, used_full, full_rows = self._full_latents()
        if self.k >= total:
            self.notes.append(f"random-unpruned: the store keeps all {total} latent scalars, so it equals full.")
        return random_unpruned_set(min(self.k, total), total, used_full, full_rows, self.streamed(total))

    def random(self) -> FeatureSet:
        """Each seed's random active set of the store's size, encoded as the store was."""
        from ..latents.encoder import Encoder

        net, dev, say, inputs, splits = self.net, self.dev, self.say, self.pool.inputs, self.splits
        granularity, n_dims, n_total = _store_dims(self.main)
        if n_dims >= n_total:
            self.notes.append(f"random: the store keeps all {n_total} dimensions, so it equals active.")
        encoders = {s.seed: Encoder(net, random_active_set(net.cfg.layer_shapes(), granularity, min(n_dims, n_total),
                                                           s.seed)) for s in splits}
        counts = [encoders[s.seed].n_features for s in splits]

        def rows_of_seed(seed: int) -> Callable[[np.ndarray], np.ndarray]:
            return lambda rows: inputs.pruned_rows(encoders[seed], rows, dev, say, f"random set {seed + 1}")

        def used_of_seed(seed: int) -> np.ndarray:
            what = f"random set {seed + 1}/{len(splits)}"
            return self.memo.get(("random", seed), lambda: inputs.pruned_latents(encoders[seed], dev, say, what),
                                 keep_one_of="random")

        return random_pruned_set(n_dims, granularity, counts, used_of_seed, rows_of_seed, self.streamed(max(counts)))


def _feature_sets(main: StorePart, pool: _Pool, splits: list[_Split], wanted: list[str], explicit: bool,
                  ckpt: str | Path | None, device: str, streamed: Callable[[int], bool], log: _Log, say: Progress
                  ) -> tuple[list[FeatureSet], Path | None]:
    """The store's feature set and those of the baselines that can run, and the checkpoint
    their model was loaded from (None when none ran the model)."""
    # The checkpoint first (full, random): a wrong --ckpt fails before any slow work.
    wanted, checkpoint = _with_checkpoint(main, ckpt, wanted, explicit, log)
    wanted, n_pixels = _with_images(pool.inputs, wanted, explicit, log, say)
    if not any(n in MODEL_BASELINES for n in wanted):
        checkpoint = None  # the images are missing, so no baseline runs the model
    sets = _FeatureSets(main, pool, splits, n_pixels, streamed, log.notes, say)
    if checkpoint is not None:
        sets.load_model(checkpoint, device)
    return [sets.active()] + [sets.make(name) for name in wanted], checkpoint


# ============================================================================ fitting and the report


def _fit(fs: FeatureSet, pool: _Pool, splits: list[_Split], *, model: str, cv: int, epochs: int | None,
         memory_budget: float, say: Progress) -> list[dict]:
    """The probe result of every seed on one feature set, in memory or streamed."""
    if fs.streaming and model not in STREAM_MODELS:
        raise UserError(f"{fs.name}: {len(pool.used):,} rows x {fs.n_features:,} features do not fit the memory "
                        f"budget ({memory_budget / 1e9:g} GB) and --model {model} cannot stream; use --model "
                        f"logreg or linear-svm, a larger --memory-budget, or --max-train.")
    results = []
    for split in splits:
        say(f"{fs.name}: seed {split.seed + 1}/{len(splits)}" + (" (streaming)" if fs.streaming else ""))
        if fs.streaming:
            results.append(stream_probe(fs.rows_for(split), pool.y, split.train, split.test, pool.unit, model=model,
                                        seed=split.seed, cv=cv, epochs=epochs,
                                        block_rows=block_rows_for(fs.n_features), say=say))
        else:
            X_train, X_test = fs.arrays(split, pool.position[split.train], pool.position[split.test])
            results.append(probe_features(X_train, pool.y[split.train], X_test, pool.y[split.test],
                                          model=model, seed=split.seed, cv=cv))
    return results


def _summarise(fs: FeatureSet, results: list[dict]) -> dict:
    acc = np.array([r["test_accuracy"] for r in results])
    cv_acc = np.array([r["cv_accuracy"] for r in results])
    ddof = 1 if len(results) > 1 else 0
    per_seed = fs.features_per_seed or [fs.n_features] * len(results)
    features = int(round(float(np.mean(per_seed))))
    bytes_per_image = fs.bytes_per_image if not fs.features_per_seed else features * FLOAT32_BYTES
    row = {
        "name": fs.name, "description": fs.description, "features": features, "dtype": fs.dtype,
        "bytes_per_image": int(bytes_per_image), "fit": "streaming" if fs.streaming else "in-memory",
        "features_per_seed": [int(f) for f in per_seed],
        "test_accuracy": float(acc.mean()), "test_accuracy_std": float(acc.std(ddof=ddof)),
        "cv_accuracy": float(cv_acc.mean()), "cv_accuracy_std": float(cv_acc.std(ddof=ddof)),
        "params": [r["params"] for r in results],
        "fit_seconds": float(np.mean([r["fit_seconds"] for r in results])),
        "test_accuracies": [float(a) for a in acc],
        "convergence_warnings": int(sum(r["convergence_warnings"] for r in results)),
    }
    if fs.disk_bytes_per_image is not None:
        row["disk_bytes_per_image"] = float(fs.disk_bytes_per_image)
    if fs.streaming:
        row["epochs"] = int(results[0]["epochs"])
    return row
def _chance_accuracy(y: np.ndarray, splits: list[_Split]) -> float:
    """The share of the test rows in the most frequent training class, averaged over the seeds."""
    chance = []
    for split in splits:
        values, counts = np.unique(y[split.train], return_counts=True)
        chance.append(float(np.mean(y[split.test] == values[np.argmax(counts)])))
    return float(np.mean(chance))


def run_probe(store: str | Path, *, labels: str | Path | None = None, model: str = "logreg",
              baselines: str | Sequence[str] | None = None, test_store: str | Path | None = None,
              ckpt: str | Path | None = None, max_train: int | None = None, seeds: int = 3, cv: int = 3,
              device: str = "cpu", stream: str = "auto", memory_budget: float = DEFAULT_MEMORY_BUDGET,
              epochs: int | None = None, progress: Progress | None = None) -> dict:
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
            feature set of a seed). None: all of them.
        seeds: number of seeds (0 .. seeds-1); cv: cross-validation folds.
        device: where the full latents are computed (``cpu``, ``cuda`` or ``auto``).
        stream: ``auto`` streams a feature set (:mod:`~vdvae_latents.downstream.streaming`) when its used rows
            would need more than ``memory_budget`` bytes in memory; ``always``/``never``.
        memory_budget: bytes an in-memory feature set may take (see ``stream``).
        epochs: passes of a streamed fit (None: :func:`~vdvae_latents.downstream.streaming.default_epochs`).
        progress: called with a short message before each step.

    Returns:
        A dict: ``store``, ``test_store``, ``model``, ``labels`` (their source), ``n_rows``,
        ``n_train``, ``n_test``, ``n_classes``, ``chance_accuracy`` (share of the test rows
        in the most frequent training class), ``seeds``, ``cv``, ``max_train``,
        ``holdout_fraction`` (None with a test store), ``checkpoint`` (used for
        full/random, else None), ``rows`` (one dict per feature set: ``name``,
        ``description``, ``features``, ``dtype``, ``bytes_per_image``, ``fit`` (``in-memory``
        or ``streaming``), ``test_accuracy`` and ``test_accuracy_std``, ``cv_accuracy`` and
        ``cv_accuracy_std``, ``params`` (per seed), ``fit_seconds`` (mean per seed),
        ``test_accuracies``, ``convergence_warnings``; the store's row adds
        ``disk_bytes_per_image``), ``skipped`` (name and reason) and ``notes``.
    """
    model = _check_options(model, seeds=seeds, cv=cv, max_train=max_train, epochs=epochs, stream=stream,
                           memory_budget=memory_budget)
    wanted, explicit = _parse_baselines(baselines)
    store, test_path = _store_paths(store, test_store)
    say = progress or (lambda message: None)
    log = _Log()

    with ExitStack() as stack:
        parts, labels_source = _open_parts(stack, store, test_path, labels)
        main = parts[0]
        splits = _make_splits(main.labels, len(parts[1].labels) if len(parts) == 2 else 0, seeds=seeds,
                              max_train=max_train, cv=cv, store=store)
        pool = _make_pool(parts, splits)
        feature_sets, checkpoint = _feature_sets(main, pool, splits, wanted, explicit, ckpt, device,
                                                 _stream_rule(stream, len(pool.used), memory_budget), log, say)
        rows = [_summarise(fs, _fit(fs, pool, splits, model=model, cv=cv, epochs=epochs, memory_budget=memory_budget,
                                    say=say))
                for fs in feature_sets]

    unseen = np.setdiff1d(pool.y[splits[0].test], pool.y[splits[0].train])
    if len(unseen):
        log.notes.append(f"the test rows have classes never seen in training ({', '.join(map(str, unseen))}).")
    if ckpt is not None and checkpoint is None and not log.skipped:
        log.notes.append("--ckpt was not used: no full or random baseline was asked for.")
    return {
        "store": str(store), "test_store": str(test_path) if test_path is not None else None,
        "model": model, "labels": labels_source,
        "n_rows": int(len(main.labels)), "n_train": int(len(splits[0].train)), "n_test": int(len(splits[0].test)),
        "n_classes": int(len(np.unique(main.labels))), "chance_accuracy": _chance_accuracy(pool.y, splits),
        "seeds": int(seeds), "cv": int(cv), "max_train": max_train,
        "holdout_fraction": None if test_path is not None else HOLDOUT_FRACTION,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "rows": rows, "skipped": log.skipped, "notes": log.notes,
    }


__all__ = ["run_probe", "probe_features", "plot_probe", "check_training_labels", "random_active_set",
           "full_latent_means", "MODELS", "BASELINES", "DEFAULT_BASELINES"]
