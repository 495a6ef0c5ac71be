"""`vdvl ood`: every score's AUROC, AUPRC and FPR80 for each out-of-distribution set, in one report.

The in-distribution split (by default its test split) gives the negatives; each ``--ood`` set
the positives. Scores (:mod:`~vdvae_latents.model.scores`): the negative ELBO, each L^{>k}
and each LLR^{>k}, all computed in one pass per batch. Which k to trust without looking at
out-of-distribution labels is :func:`~vdvae_latents.downstream.ood.choose_k` on the in-distribution
KL profile; the report gives every k's numbers beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.atomic import save_figure
from ..core.errors import UserError
from ..core.outputs import prepare_output, require_matplotlib
from .ood import choose_k, ood_metrics

DEFAULT_IN_SPLIT = DEFAULT_OOD_SPLIT = "test"


def split_spec(text: str, default_split: str) -> tuple[str, str]:
    """'SPEC[:split]' -> (SPEC, split): the part after the last ':' is a split only when it names one."""
    from ..data.splits import SPLITS

    spec, sep, tail = text.rpartition(":")
    if sep and tail in SPLITS and spec:
        return spec, tail
    return text, default_split


def run_ood(path: str | Path, inliers: str, outliers: Sequence[str], *, ks: str | Sequence[int] | None = "all",
            iw: int = 0, resize: bool = False, limit: int | None = None, batch_size: int = 128, seed: int = 0,
            device: str = "auto", plot: str | Path | None = None, progress=None) -> dict:
    """Score ``inliers`` ('SPEC[:split]', default split test) and each of ``outliers`` with the model
    at ``path``; return the report `vdvl ood` prints. ``resize`` brings sets of another size
    or channel count to the model's input (Pillow bicubic; ITU-R 601 luma or repeated gray);
    without it such a set is refused. ``limit`` keeps the first N images of every set."""
    if not outliers:
        raise UserError("give at least one --ood data set.")
    if iw < 0:
        raise UserError(f"--iw must be 0 or more importance samples, not {iw}.")
    if plot is not None:
        require_matplotlib("--plot")
        prepare_output(plot, what="figure")
    from ..core.runtime import auto_device
    from ..model.checkpoints import load_model
    from ..model.scores import parse_ks, score_columns, score_images

    dev = auto_device(device)
    sets = [_open(text, DEFAULT_IN_SPLIT if i == 0 else DEFAULT_OOD_SPLIT, limit)
            for i, text in enumerate([inliers, *outliers])]  # every set opened (and checked) before the model loads
    model, info = load_model(path, ema=True, device=dev)
    model.eval()
    k_list = parse_ks(ks, model.cfg.n_layers)
    images = [_fit_to_model(model.cfg, s, resize) for s in sets]
    columns = score_columns(model.cfg.n_layers, k_list, iw)
    scores = [score_images(model, imgs, k_list, iw=iw, seed=seed, batch_size=batch_size, device=dev,
                           convert_channels=resize, progress=progress) for imgs in images]
    kl = scores[0][:, [columns.index(f"kl_layer{i}_nats") for i in range(1, model.cfg.n_layers + 1)]]
    report = {
        "checkpoint": str(info["path"]), "checkpoint_step": info["step"], "n_layers": model.cfg.n_layers,
        "ks": k_list, "iw": iw, "seed": seed, "resize": resize,
        "in": _describe(sets[0], scores[0], columns),
        "k_chosen": choose_k(kl), "kl_per_layer_nats": kl.mean(0).tolist(),
        "sets": [dict(_describe(s, sc, columns), metrics=_metrics(columns, scores[0], sc))
                 for s, sc in zip(sets[1:], scores[1:])],
    }
    if plot is not None:
        report["plot"] = str(save_figure(roc_figure(report, columns, scores), plot))
    return report


def ood_scores(columns: list[str]) -> list[str]:
    """The columns that are out-of-distribution scores (higher = more unusual), in report order."""
    return [c for c in columns if c in ("neg_elbo_bpd", "neg_iw_bpd") or c.startswith(("neg_elbo_gt", "llr_gt"))]


def roc_figure(report: dict, columns: list[str], scores: list[np.ndarray]):
    """ROC curves of the negative ELBO and LLR^{>k} (k chosen from the in-distribution data)
    for each out-of-distribution set, one panel per set."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    k = report["k_chosen"]
    names = ["neg_elbo_bpd"] + ([f"llr_gt{k}_bpd"] if f"llr_gt{k}_bpd" in columns else [])
    labels = {"neg_elbo_bpd": "ELBO (likelihood)", f"llr_gt{k}_bpd": f"LLR$^{{>{k}}}$ (k from the in-distribution KL)"}
    n = len(report["sets"])
    fig = Figure(figsize=(4.2 * n, 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    for ax, entry, sc in zip(axes, report["sets"], scores[1:]):
        for name in names:
            i = columns.index(name)
            y = np.r_[np.zeros(len(scores[0])), np.ones(len(sc))]
            fpr, tpr, _ = roc_curve(y, np.r_[scores[0][:, i], sc[:, i]])
            ax.plot(fpr, tpr, label=f"{labels[name]}: AUROC {entry['metrics'][name]['auroc']:.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle="--")
        ax.set(xlabel="false-positive rate (in-distribution flagged)", ylabel="true-positive rate",
               title=f"{_short(report['in'])} vs {_short(entry)}")
        ax.legend(loc="lower right", fontsize=7)
    return fig


def _short(entry: dict) -> str:
    """A set's name for a panel title: a file's name without its folders."""
    return f"{Path(entry['data']).name}:{entry['split']}"


def _open(text: str, default_split: str, limit: int | None):
    from ..data.splits import open_images

    spec, split = split_spec(text, default_split)
    images = open_images(spec, split=split, limit=limit)
    if len(images) == 0:
        raise UserError(f"data set {spec}:{split} holds no images.")
    return images


def _fit_to_model(cfg, images, resize: bool):
    """The set itself when it fits the model, a resized view with ``resize``, else a UserError."""
    size, (h, w, c) = cfg.loss_size, images.shape
    if (h, w, c) == (size, size, cfg.channels):
        return images
    if not resize:
        raise UserError(f"images of {images.spec}:{images.split} are {h}x{w}x{c} but the model expects "
                        f"{size}x{size}x{cfg.channels}; pass --resize to resize and convert them.")
    from ..data.splits import open_images

    return open_images(images.spec, split=images.split, limit=len(images), resize=(size, size))


def _describe(images, scores: np.ndarray, columns: list[str]) -> dict:
    means = scores.mean(0)
    return {"data": images.spec, "split": images.split, "n": len(images), "shape": list(images.shape),
            "mean": {c: float(means[i]) for i, c in enumerate(columns)}}


def _metrics(columns: list[str], inliers: np.ndarray, outliers: np.ndarray) -> dict:
    return {c: ood_metrics(inliers[:, columns.index(c)], outliers[:, columns.index(c)]) for c in ood_scores(columns)}


__all__ = ["run_ood", "split_spec", "ood_scores", "roc_figure"]
