"""Out-of-distribution detection with the latent hierarchy: metrics, the choice of k, a detector.

The scores are :mod:`~vdvae_latents.model.scores`' (negative bounds in bits/dim and LLR^{>k},
higher meaning more likely out of distribution). Following Havtorn et al.'s protocol the
in-distribution test set gives the negatives and an out-of-distribution set the positives:
AUROC and AUPRC from scikit-learn, and FPR80, the false-positive rate at 80% true positives.

:class:`LatentOODDetector` is a scikit-learn novelty detector on uint8 images: ``fit`` on
in-distribution images sets the threshold at a chosen false-positive rate, and
``score_samples`` / ``decision_function`` / ``predict`` follow scikit-learn's conventions
(higher is more normal; ``predict`` gives +1 for inliers and -1 for outliers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.utils.validation import check_is_fitted

from ..core.errors import UserError

#: How much of the in-distribution KL the k layers nearest the data must hold for the default k.
KL_SHARE_FOR_K = 0.5


def ood_metrics(inlier_scores: np.ndarray, outlier_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC and FPR80 of a score (higher = more likely out of distribution), the
    out-of-distribution images being the positives."""
    inlier_scores, outlier_scores = np.asarray(inlier_scores, float), np.asarray(outlier_scores, float)
    if len(inlier_scores) == 0 or len(outlier_scores) == 0:
        raise UserError("each set must hold at least one image to measure out-of-distribution detection.")
    y = np.r_[np.zeros(len(inlier_scores)), np.ones(len(outlier_scores))]
    s = np.r_[inlier_scores, outlier_scores]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)  # every threshold: the first with TPR >= 0.8
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "fpr80": float(fpr[np.searchsorted(tpr, 0.8, side="left")])}


def choose_k(kl_per_layer: np.ndarray, share: float = KL_SHARE_FOR_K) -> int:
    """The default k from in-distribution data alone: the fewest layers nearest the data that
    hold at least ``share`` of the average KL (nats per image, one column per layer, top-down).

    Havtorn et al. find that the layers nearest the data, which encode low-level detail,
    dominate the likelihood of any image; LLR^{>k} removes exactly those. Taking as many as
    hold half of what the model spends on in-distribution images needs no out-of-distribution
    labels.
    """
    kl = np.asarray(kl_per_layer, float).mean(0)
    total = kl.sum()
    if not total > 0:
        return 1
    held = np.cumsum(kl[::-1]) / total  # the last k layers, k = 1..N
    return int(np.searchsorted(held, share - 1e-12) + 1)


class LatentOODDetector(OutlierMixin, BaseEstimator):
    """Novelty detection with LLR^{>k} (or another score) of a trained VAE.

    Parameters:
        model: a run directory or checkpoint path, or a loaded ``VAE``.
        score: ``"llr"`` (LLR^{>k}), ``"elbo"`` (the negative ELBO) or ``"l_gt_k"`` (the
            negative L^{>k}).
        k: layers nearest the data taken from the prior; None: :func:`choose_k` on the
            training images.
        iw: importance samples for the likelihood term of LLR (0: the one-sample ELBO).
        fpr: the false-positive rate on the training images at which ``predict`` flags.
        batch_size, seed, device: how the scores are computed.

    Fitted attributes: ``model_`` (the VAE), ``k_``, ``kl_per_layer_`` (average over the
    training images, nats), ``threshold_`` (on the out-of-distribution score) and ``offset_``
    (``-threshold_``, scikit-learn's name).
    """

    def __init__(self, model=None, *, score: str = "llr", k: int | None = None, iw: int = 0, fpr: float = 0.05,
                 batch_size: int = 128, seed: int = 0, device: str = "auto") -> None:
        self.model = model
        self.score = score
        self.k = k
        self.iw = iw
        self.fpr = fpr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def fit(self, X, y=None) -> LatentOODDetector:
        if self.score not in ("llr", "elbo", "l_gt_k"):
            raise UserError(f"score must be llr, elbo or l_gt_k, not '{self.score}'.")
        if not 0 < self.fpr < 1:
            raise UserError(f"fpr must lie strictly between 0 and 1, not {self.fpr}.")
        self.model_ = _load(self.model, self.device)
        n_layers = self.model_.cfg.n_layers
        ks = list(range(1, n_layers + 1)) if self.k is None else [self.k]
        columns, scores = self._scores(X, ks)
        self.kl_per_layer_ = scores[:, [columns.index(f"kl_layer{i}_nats") for i in range(1, n_layers + 1)]].mean(0)
        self.k_ = choose_k(self.kl_per_layer_[None]) if self.k is None else int(self.k)
        self.threshold_ = float(np.quantile(self._pick(columns, scores), 1 - self.fpr))
        self.offset_ = -self.threshold_
        return self

    def score_samples(self, X) -> np.ndarray:
        """Higher for more normal images: minus the out-of-distribution score."""
        check_is_fitted(self, "threshold_")
        columns, scores = self._scores(X, [self.k_])
        return -self._pick(columns, scores)

    def decision_function(self, X) -> np.ndarray:
        """Negative for outliers: ``score_samples(X) - offset_``."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for inliers, -1 for outliers."""
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def _scores(self, X, ks: Sequence[int]) -> tuple[list[str], np.ndarray]:
        from ..model.scores import score_columns, score_images

        images = np.asarray(X)
        if images.ndim == 3:
            images = images[..., None]
        scores = score_images(self.model_, images, ks, iw=self.iw, seed=self.seed, batch_size=self.batch_size)
        return score_columns(self.model_.cfg.n_layers, ks, self.iw), scores

    def _pick(self, columns: list[str], scores: np.ndarray) -> np.ndarray:
        name = {"llr": f"llr_gt{self.k_}_bpd", "elbo": "neg_elbo_bpd", "l_gt_k": f"neg_elbo_gt{self.k_}_bpd"}
        return scores[:, columns.index(name[self.score])]


def _load(model, device: str):
    if hasattr(model, "bottom_up"):
        return model
    if model is None:
        raise UserError("LatentOODDetector needs a model: a run directory, a checkpoint or a VAE.")
    from ..core.runtime import auto_device
    from ..model.checkpoints import load_model

    loaded, _ = load_model(model, ema=True, device=auto_device(device))
    return loaded.eval()


__all__ = ["ood_metrics", "choose_k", "LatentOODDetector", "KL_SHARE_FOR_K"]
