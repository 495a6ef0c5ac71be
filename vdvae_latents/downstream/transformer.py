"""A scikit-learn transformer whose features are the active latents of a trained checkpoint.

:class:`ActiveLatents` packages the library's pipeline (load a checkpoint, measure the
average KL of every latent dimension over the training images, keep the active few,
encode) behind the ``fit`` / ``transform`` interface, so a trained VDVAE can be used as
a feature extractor in a :class:`~sklearn.pipeline.Pipeline` or tuned with
:class:`~sklearn.model_selection.GridSearchCV`::

    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    digits = load_digits()
    clf = make_pipeline(ActiveLatents("runs/tiny", keep="10%", input_max=16),
                        LogisticRegression(max_iter=500))
    clf.fit(digits.data, digits.target)

``ActiveLatents(store="train.zarr")`` instead takes everything from an existing store
(checkpoint, columns, statistic, quantisation), so ``transform`` gives new images exactly
the features a downstream model trained on that store has seen. The store is verified
first (:func:`~vdvae_latents.stores.verify.verify_store`): a damaged one is refused.

Inputs are images, so the usual "any (n_samples, n_features) array" contract of
scikit-learn is narrowed: ``X`` is either flattened images ``(N, H*W*C)`` in H, W, C
order (the layout of ``load_digits().data``) or an ``(N, H, W, C)`` array, where
H x W x C is the checkpoint's image shape.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..core.errors import UserError
from ..latents.active_set import fit_active_set, parse_keep
from ..latents.encoder import STATISTICS, Encoder
from ..latents.stats import GRANULARITIES
from ..model.checkpoints import load_model
from ..model.inputs import check_images_fit, prepare_batch

__all__ = ["ActiveLatents"]


class ActiveLatents(TransformerMixin, BaseEstimator):
    """Features = the active latent dimensions of a trained checkpoint (posterior means by default).

    ``fit`` loads the checkpoint (its EMA weights), measures the average KL divergence
    of every latent dimension over ``X`` (:class:`~vdvae_latents.latents.stats.LatentKL`)
    and keeps the most informative ones (:func:`~vdvae_latents.latents.active_set.build_active_set`).
    ``transform`` runs the pruned forward pass
    (:class:`~vdvae_latents.latents.encoder.Encoder`) and returns the kept latent scalars, one
    column per (layer, variate, y, x) in natural order.

    Parameters
    ----------
    checkpoint : str or path-like, default=None
        A checkpoint file or a run directory (its latest checkpoint is used). Required;
        the default exists only because scikit-learn wants every parameter to have one.
    keep : float or str, default=0.03
        Keep the top fraction of dimensions by average KL: ``0.03`` or ``"3%"`` (read by
        :func:`~vdvae_latents.latents.active_set.parse_keep`, so a bare number above 1 such as
        ``7`` is a percentage). Must be None when ``threshold`` is given.
    threshold : float, default=None
        Keep every dimension whose average KL exceeds this many nats instead. Needs
        ``keep=None``.
    granularity : {"variate", "element"}, default="variate"
        What one ranked dimension is: a latent channel of a layer (the paper's unit; a
        kept channel contributes all its H x W positions as columns) or one scalar.
    statistic : {"mean", "sample", "mean+std"}, default="mean"
        ``"mean"``: posterior means (deterministic). ``"sample"``: posterior samples,
        drawn from a generator seeded with ``seed`` at every ``transform`` call (so a
        row's draw depends on its position in ``X``). ``"mean+std"``: the means followed
        by the posterior standard deviations (2K columns).
    input_max : float, default=255.0
        The intensity of a white pixel in ``X``: pixels must lie in ``[0, input_max]``
        and become ``round(X * 255 / input_max)`` (``load_digits().data`` needs 16).
    batch_size : int, default=256
        Images per forward pass (memory only; the output does not depend on it beyond
        floating-point rounding, except for the draws of ``statistic="sample"``).
    device : str or torch.device, default="cpu"
        Where the model runs.
    seed : int, default=0
        Seeds the posterior samples of the KL measurement (and of ``statistic="sample"``).
    store : str or path-like, default=None
        A store written by ``vdvl encode``: ``fit`` then uses its checkpoint (unless
        ``checkpoint`` names the same weights elsewhere), its columns, its statistic and,
        for an int8/uint8 store, its quantisation (``transform`` rounds to the stored
        grid); ``keep``, ``threshold``, ``granularity`` and ``statistic`` are not used. A
        store with a missing, corrupt or non-finite chunk is refused.

    Attributes
    ----------
    model_ : VAE
        The loaded model (EMA weights when the checkpoint has them), in eval mode; kept
        so that ``transform`` does not reload the file.
    active_set_ : ActiveSet
        The ranking of all dimensions and the chosen ones.
    encoder_ : Encoder
        The pruned encoder behind ``transform``.
    checkpoint_path_ : str
        The checkpoint file actually loaded.
    checkpoint_sha256_ : str
        Its SHA-256, to tie the features to exact weights.
    n_features_in_ : int
        H * W * C of the model's images.
    n_features_out_ : int
        Columns of ``transform``: K kept latent scalars (2K for ``statistic="mean+std"``).
    n_images_ : int
        Images the KL statistics were measured on.
    feature_names_in_ : ndarray of str
        Column names of ``X`` when it was a DataFrame with string column names.
    """

    def __init__(self, checkpoint=None, *, keep=0.03, threshold=None, granularity="variate", statistic="mean",
                 input_max=255.0, batch_size=256, device="cpu", seed=0, store=None):
        # scikit-learn's rule: store the parameters untouched; all validation is in fit,
        # so that clone / set_params / GridSearchCV see exactly what the user passed.
        self.checkpoint = checkpoint
        self.keep = keep
        self.threshold = threshold
        self.granularity = granularity
        self.statistic = statistic
        self.input_max = input_max
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.store = store

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None):
        """Load the checkpoint, measure the latent KL over ``X`` and choose the active set.

        Parameters
        ----------
        X : array-like of shape (N, H*W*C) or (N, H, W, C)
            Images with pixel values in ``[0, input_max]``.
        y : ignored
            Accepted for pipeline compatibility.

        Returns
        -------
        self : ActiveLatents
        """
        if self.store is not None:
            # Everything from the (verified) store, nothing measured.
            encoder, ckpt_path, sha256, n_images, quantizers = _store_encoder(self.store, self.checkpoint,
                                                                              self.device)
            _validated_pixels(self, X, encoder.model.cfg, reset=True)
            return self._set_fitted(encoder, ckpt_path, sha256, n_images, quantizers)
        # Cheap parameter checks first: a typo should not cost a model load.
        _check_params(self)
        keep, threshold = _selection_rule(self.keep, self.threshold)

        model, info = load_model(self.checkpoint, ema=True, device=self.device)
        X = _validated_pixels(self, X, model.cfg, reset=True)
        images = _uint8_batches(X, model.cfg, self.input_max, self.batch_size)

        device = next(model.parameters()).device
        active = fit_active_set(model, images, granularity=self.granularity, keep=keep, threshold=threshold,
                                batch_size=self.batch_size, seed=self.seed, device=device, checkpoint=info["path"],
                                checkpoint_sha256=info["sha256"])
        encoder = Encoder(model, active, statistic=self.statistic)
        return self._set_fitted(encoder, info["path"], info["sha256"], active.n_images, {})

    def _set_fitted(self, encoder: Encoder, ckpt_path, sha256: str, n_images: int, quantizers: dict):
        """Set the fitted attributes (fit's end, whichever way it went); returns self."""
        self.model_ = encoder.model
        self.active_set_ = encoder.active
        self.encoder_ = encoder
        self.checkpoint_path_ = str(ckpt_path)
        self.checkpoint_sha256_ = sha256
        self.n_images_ = n_images
        self.n_features_out_ = encoder.n_features * (2 if encoder.statistic == "mean+std" else 1)
        self.quantizers_ = quantizers
        return self

    # ------------------------------------------------------------------ transforming
    def transform(self, X):
        """Encode images to their active latent features.

        Parameters
        ----------
        X : array-like of shape (N, H*W*C) or (N, H, W, C)
            Images with pixel values in ``[0, input_max]``.

        Returns
        -------
        features : ndarray of shape (N, n_features_out_), float32
        """
        check_is_fitted(self)
        cfg = self.model_.cfg
        X = _validated_pixels(self, X, cfg, reset=False)
        device = next(self.model_.parameters()).device
        generator = None
        if self.encoder_.statistic == "sample":
            generator = torch.Generator(device=device).manual_seed(self.seed)
        chunks = []
        for batch in _uint8_batches(X, cfg, self.input_max, self.batch_size):
            feats, stds = self.encoder_.encode(prepare_batch(cfg, batch, device=device), generator=generator)
            values = [self._as_stored("features", feats.cpu().numpy())]
            if stds is not None:
                values.append(self._as_stored("features_std", stds.cpu().numpy()))
            chunks.append(np.concatenate(values, axis=1))
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _as_stored(self, name: str, values: np.ndarray) -> np.ndarray:
        """Values as the store holds them: on its quantisation grid for an integer store."""
        q = getattr(self, "quantizers_", {}).get(name)
        return values if q is None else q.dequantize(q.quantize(values))

    def get_feature_names_out(self, input_features=None):
        """Column names ``l{layer}_v{variate}_y{y}_x{x}`` (``..._std`` for the std columns of mean+std).

        Parameters
        ----------
        input_features : array-like of str, default=None
            Only checked for consistency with the input seen in ``fit``: the output
            columns are latents, not functions of single input columns.

        Returns
        -------
        names : ndarray of str objects, shape (n_features_out_,)
        """
        check_is_fitted(self)
        if input_features is not None:
            _check_input_features(self, input_features)
        cols = self.encoder_.columns
        names = [f"l{l}_v{v}_y{y}_x{x}" for l, v, y, x in zip(cols.layer, cols.variate, cols.y, cols.x)]
        if self.encoder_.statistic == "mean+std":
            names += [f"{name}_std" for name in names]
        return np.asarray(names, dtype=object)  # object dtype: scikit-learn's convention for names

    # ------------------------------------------------------------------ scikit-learn protocol
    def __sklearn_is_fitted__(self) -> bool:
        # validate_data sets n_features_in_ before the slow part of fit; if that part
        # fails, the estimator must still count as unfitted, so do not rely on the
        # default "any attribute ending in _" rule.
        return hasattr(self, "encoder_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True      # flattened images (4-D arrays are accepted too)
        tags.input_tags.allow_nan = False       # pixels must be finite
        tags.input_tags.positive_only = True    # intensities lie in [0, input_max]
        tags.input_tags.sparse = False
        tags.requires_fit = True
        tags.non_deterministic = self.statistic == "sample"
        tags.transformer_tags.preserves_dtype = ["float32"]  # the output is float32 whatever the input
        return tags


# ---------------------------------------------------------------------- parameter checks (in fit)
def _check_params(est: ActiveLatents) -> None:
    """ValueError naming the first of ``est``'s parameters (other than keep/threshold) that is invalid."""
    if est.checkpoint is None:
        raise ValueError("ActiveLatents needs a checkpoint: pass a checkpoint file or run directory, "
                         "e.g. ActiveLatents('runs/tiny').")
    if est.granularity not in GRANULARITIES:
        raise ValueError(f"ActiveLatents granularity must be one of {', '.join(GRANULARITIES)}, "
                         f"not {est.granularity!r}.")
    if est.statistic not in STATISTICS:
        raise ValueError(f"ActiveLatents statistic must be one of {', '.join(STATISTICS)}, "
                         f"not {est.statistic!r}.")
    if isinstance(est.input_max, bool) or not isinstance(est.input_max, Real) \
            or not (math.isfinite(est.input_max) and est.input_max > 0):
        raise ValueError(f"ActiveLatents input_max must be a positive number, not {est.input_max!r}.")
    if isinstance(est.batch_size, bool) or not isinstance(est.batch_size, Integral) or est.batch_size < 1:
        raise ValueError(f"ActiveLatents batch_size must be a positive integer, not {est.batch_size!r}.")
    if isinstance(est.seed, bool) or not isinstance(est.seed, Integral):
        raise ValueError(f"ActiveLatents seed must be an integer, not {est.seed!r}.")


def _selection_rule(keep, threshold) -> tuple[float | None, float | None]:
    """(keep fraction, threshold nats) with exactly one of them set."""
    if threshold is not None and keep is not None:
        raise ValueError("ActiveLatents takes exactly one of keep and threshold: pass keep=None to select "
                         f"by threshold (got keep={keep!r}, threshold={threshold!r}).")
    if threshold is None and keep is None:
        raise ValueError("ActiveLatents needs keep (a fraction like 0.03 or '3%') or threshold (nats); "
                         "both are None.")
    if keep is not None:
        if isinstance(keep, bool):  # True would parse as '1' = 100%, surely not meant
            raise ValueError(f"ActiveLatents keep must be a fraction like 0.03 or '3%', not {keep!r}.")
        try:
            return parse_keep(keep), None
        except UserError as err:
            raise ValueError(f"ActiveLatents keep={keep!r} is invalid: {err}") from None
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold):
        raise ValueError(f"ActiveLatents threshold must be a finite number of nats, not {threshold!r}.")
    return None, float(threshold)


def _check_input_features(est: ActiveLatents, input_features) -> None:
    """get_feature_names_out's check: ``input_features`` must match what ``fit`` saw."""
    input_features = np.asarray(input_features, dtype=object)
    if len(input_features) != est.n_features_in_:
        raise ValueError(f"input_features should have length equal to the number of features seen in fit "
                         f"({est.n_features_in_}), got {len(input_features)}.")
    seen = getattr(est, "feature_names_in_", None)
    if seen is not None and not np.array_equal(input_features, seen):
        raise ValueError("input_features is not equal to feature_names_in_.")


# ---------------------------------------------------------------------- fitting from a store
def _store_encoder(store, checkpoint, device) -> tuple[Encoder, str, str, int, dict]:
    """(encoder, checkpoint path, its sha256, images the KL was measured on, quantizers) of a
    verified store; StoreError if any chunk is missing, corrupt or not finite."""
    from ..stores.backends import StoreError
    from ..stores.decode import store_encoder
    from ..stores.reader import open_encodings
    from ..stores.verify import verify_store

    report = verify_store(store)
    if not report["ok"]:
        raise StoreError(report["summary"])
    with open_encodings(store) as enc:
        encoder, ckpt_path = store_encoder(enc, checkpoint, device=device,
                                           statistic=enc.attrs.get("statistic", "mean"))
        # store_encoder refuses a checkpoint whose sha256 is not the recorded one, so the
        # recorded hash is the file's: no second pass over the file.
        sha256 = str(enc.attrs["checkpoint_sha256"])
        return encoder, str(ckpt_path), sha256, int(enc.attrs.get("kl_images", 0)), dict(enc.quantizers)


# ---------------------------------------------------------------------- input handling
def _validated_pixels(est: ActiveLatents, X, cfg, *, reset: bool) -> np.ndarray:
    """Check ``X`` and return it as a 2-D numeric (N, H*W*C) array of in-range pixels.

    ``validate_data`` records (``reset=True``, in fit) or checks (in transform) ``est``'s
    ``n_features_in_`` and ``feature_names_in_``.
    """
    h = w = cfg.loss_size
    c = cfg.channels
    expected = h * w * c
    if not hasattr(X, "shape"):  # a list of lists: give it a shape to inspect
        X = np.asarray(X)
    if len(X.shape) == 4:
        # Images: check their shape against the model, then flatten in H, W, C order,
        # the layout of load_digits().data, so 2-D and 4-D inputs meet in one path.
        check_images_fit(cfg, tuple(X.shape[1:]), "X")
        X = np.asarray(X).reshape(X.shape[0], expected)
    elif len(X.shape) != 2:
        raise ValueError(f"ActiveLatents expects X of shape (n_images, {expected}) (flattened {h}x{w}x{c} "
                         f"images) or (n_images, {h}, {w}, {c}); got an array of shape {tuple(X.shape)}.")
    # dtype="numeric" keeps uint8 / float32 input as is (no float64 copy of a big set).
    X = validate_data(est, X, reset=reset, dtype="numeric", ensure_all_finite=True)
    # Values before shape: an out-of-range X is wrong whatever its shape, and the
    # "Negative values in data" wording is scikit-learn's convention for
    # estimators tagged positive_only.
    lo, hi = X.min(), X.max()
    if lo < 0 or hi > est.input_max:
        what = "Negative values in data" if lo < 0 else "Values above input_max in data"
        raise ValueError(f"{what} passed to ActiveLatents: pixel values must lie in [0, input_max="
                         f"{est.input_max:g}] but X ranges over [{lo:g}, {hi:g}]; set input_max to the "
                         "value of a white pixel.")
    if reset and X.shape[1] != expected:
        # In transform, validate_data itself has already refused a count that differs from fit.
        raise ValueError(f"X has {X.shape[1]} feature(s) per sample, but ActiveLatents with this checkpoint "
                         f"expects {expected} (flattened {h}x{w}x{c} images in H, W, C order).")
    return X


def _uint8_batches(X: np.ndarray, cfg, input_max: float, batch_size: int):
    """Yield uint8 NCHW tensors of ``batch_size`` images, converted lazily (memory)."""
    h = w = cfg.loss_size
    c = cfg.channels
    scale = 255.0 / input_max
    for start in range(0, X.shape[0], batch_size):
        batch = X[start:start + batch_size]
        # Same rounding as the library's digits loader (np.rint of x * 255 / max).
        pixels = np.rint(batch * scale).astype(np.uint8).reshape(-1, h, w, c)
        # Copy into a freshly allocated NCHW array rather than passing a transposed
        # view: with C = 1 a view's channel stride is arbitrary yet still counts as
        # "contiguous", and torch then picks the channels-last convolution kernels,
        # which round differently. A fixed layout makes the features independent of
        # how X happened to be laid out in memory (2-D vs 4-D input, slicing, ...).
        nchw = np.empty((len(pixels), c, h, w), dtype=np.uint8)
        nchw[...] = pixels.transpose(0, 3, 1, 2)
        yield torch.from_numpy(nchw)
