"""Compact encodings: the active dimensions' posterior statistics, and their decoding.

An image is encoded by the pruned forward pass: at every layer the active dimensions
take the posterior (its mean by default, so the same image always gives the same
features) and the pruned ones the prior mean; later layers are conditioned on these
values. The encoding keeps only the active dimensions. Decoding runs the generative
path with the stored values forced in and the pruned dimensions from the prior (its
mean, or a sample at temperature T), which reproduces the pruned reconstruction.

Columns are the kept latent scalars in natural order (layer, variate, y, x); with the
``variate`` granularity a kept channel contributes all its H x W positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .active_set import ActiveSet

STATISTICS = ("mean", "sample", "mean+std")


@dataclass
class ColumnMap:
    """Where each feature column lives in the latent hierarchy."""

    layer: np.ndarray     # int32 (K,)
    variate: np.ndarray   # int32 (K,)
    y: np.ndarray         # int32 (K,)
    x: np.ndarray         # int32 (K,)
    avg_kl: np.ndarray    # float64 (K,): the average KL of the dimension the column belongs to
    masks: list           # per layer bool (V, H, W) numpy mask of kept positions
    offsets: list         # per layer (start, stop) of its columns

    @property
    def n_features(self) -> int:
        return len(self.layer)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"layer": self.layer, "variate": self.variate, "y": self.y, "x": self.x, "avg_kl": self.avg_kl}


def column_map(active: ActiveSet) -> ColumnMap:
    """Feature columns of an active set, in natural order."""
    torch_masks = active.layer_masks()
    cols: dict[str, list] = {k: [] for k in ("layer", "variate", "y", "x", "avg_kl")}
    masks, offsets, start = [], [], 0
    chosen = active.selected_mask()
    for k, (v, h, w) in enumerate(active.layer_shapes):
        mask = np.ones((v, h, w), dtype=bool) if torch_masks[k] is None else torch_masks[k].numpy()
        vv, yy, xx = np.nonzero(mask)  # row-major (v, y, x): the order of tensor[:, mask]
        rows = (active.table.layer == k) & chosen
        kl_of = np.zeros((v, h, w))
        if active.granularity == "variate":
            kl_of[active.table.variate[rows]] = active.table.avg_kl[rows][:, None, None]
        else:
            kl_of[active.table.variate[rows], active.table.y[rows], active.table.x[rows]] = active.table.avg_kl[rows]
        cols["layer"].append(np.full(len(vv), k))
        cols["variate"].append(vv)
        cols["y"].append(yy)
        cols["x"].append(xx)
        cols["avg_kl"].append(kl_of[vv, yy, xx])
        masks.append(mask)
        offsets.append((start, start + len(vv)))
        start += len(vv)
    ints = {k: np.concatenate(cols[k]).astype(np.int32) for k in ("layer", "variate", "y", "x")}
    return ColumnMap(**ints, avg_kl=np.concatenate(cols["avg_kl"]).astype(np.float64), masks=masks, offsets=offsets)


class Encoder:
    """Encode images to active-dimension features and decode features back to images."""

    def __init__(self, model, active: ActiveSet, *, statistic: str = "mean") -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, not {statistic!r}")
        if [tuple(s) for s in active.layer_shapes] != [tuple(s) for s in model.cfg.layer_shapes()]:
            raise ValueError("the active set was made for a model with other latent layers")
        self.model = model
        self.active = active
        self.statistic = statistic
        self.columns = column_map(active)
        device = next(model.parameters()).device
        self._masks = [torch.from_numpy(m).to(device) for m in self.columns.masks]
        self._active_masks = active.layer_masks(device=device)
        # The deepest layer with a kept column: the pass stops there (nothing below it, and no
        # output head, changes what the kept layers' posteriors are). -1 when nothing is kept.
        #: Per latent layer whether it has a kept column: only those run their posterior net.
        self.kept_layers = [bool(mask.any()) for mask in self.columns.masks]
        kept = [k for k, has in enumerate(self.kept_layers) if has]
        self.deepest_layer = kept[-1] if kept else -1

    @property
    def n_features(self) -> int:
        return self.columns.n_features

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model-scale images (B, C, H, W) -> features (B, K) and, for mean+std, stds (B, K)."""
        features, stds, _ = self.encode_with_prior(x, generator=generator)
        return features, stds

    @torch.no_grad()
    def encode_with_prior(self, x: torch.Tensor, *, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`encode` plus the prior std of every kept scalar (B, K), the scale that
        quantising in units of the prior (:mod:`~vdvae_latents.stores.codes`) needs."""
        posterior = "sample" if self.statistic == "sample" else "mean"
        # Only the layers with a kept column run their posterior net, and the pass ends at the
        # deepest of them: the other layers' z is the prior mean either way.
        out = self.model(x, active=self._active_masks, posterior=posterior, masked="mean", generator=generator,
                         stop_after=max(self.deepest_layer, 0), likelihood=False, posterior_layers=self.kept_layers)
        feats, stds, priors = [], [], []
        for layer, mask, kept in zip(out.layers, self._masks, self.kept_layers):  # ends at the deepest kept layer
            if not kept:
                continue
            source = layer.z if self.statistic == "sample" else layer.q_mean
            feats.append(source[:, mask].float())
            priors.append(layer.p_std[:, mask].float())
            if self.statistic == "mean+std":
                stds.append(layer.q_std[:, mask].float())
        if not feats:  # nothing kept: (B, 0) features
            empty = x.new_zeros((x.shape[0], 0), dtype=torch.float32)
            return empty, (empty if self.statistic == "mean+std" else None), empty
        features = torch.cat(feats, dim=1)
        return features, (torch.cat(stds, dim=1) if stds else None), torch.cat(priors, dim=1)

    def given(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Scatter (B, K) features into per-layer (values, mask) for the generative path."""
        b = features.shape[0]
        out = []
        for (start, stop), mask, shape in zip(self.columns.offsets, self._masks, self.active.layer_shapes):
            values = torch.zeros((b, *shape), dtype=torch.float32, device=mask.device)
            values[:, mask] = features[:, start:stop].to(values.device, torch.float32)
            out.append((values, mask))
        return out

    @torch.no_grad()
    def decode(self, features: torch.Tensor, *, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Features (B, K) -> images in [-1, 1]: pruned dims from the prior mean (T = 0) or a
        prior sample at temperature T; the output is the likelihood's most probable image."""
        masked = "mean" if temperature == 0 else "sample"
        return self.model.sample(features.shape[0], given=self.given(features), masked=masked,
                                 temperature=temperature if temperature else 1.0,
                                 deterministic_output=True, generator=generator)

    @torch.no_grad()
    def pruned_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """What decoding a posterior-mean encoding of ``x`` must reproduce."""
        return self.model.reconstruct(x, active=self._active_masks, posterior="mean", masked="mean",
                                      deterministic=True)


