"""Average KL of every latent dimension over a dataset, and the active set chosen from it.

The paper's pruning criterion: a latent dimension is "turned off" when its average KL
divergence between posterior and prior over the data is ~0 nats (the polarized
regime). :class:`LatentKL` measures it exactly: it streams the data, accumulates the
per-element KL maps of every layer in float64, and divides by the number of images at
the end. Two granularities:

- ``variate`` (the paper's unit): one channel of one layer, its per-element KL averaged
  over the layer's H x W positions ("independent from the latent resolution");
- ``element``: one scalar (layer, channel, y, x).

Beside the KL it records the active-units statistic of Burda et al. (2016): the
variance over the data of the posterior mean, a unit being active when it exceeds 0.01.
For a variate it is the mean over positions of the per-element variances.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .atomic import atomic_file, write_text
from .batches import prepare_batch
from .evaluate import iter_batches
from .errors import UserError

GRANULARITIES = ("variate", "element")
AU_THRESHOLD = 0.01  # Burda et al.'s activity threshold on Var_x[E_q[z]]
SIDECAR_THRESHOLD = 20_000  # more dimensions than this go to a .npz beside the JSON


# --------------------------------------------------------------------------- dimension table
@dataclass
class DimTable:
    """One row per latent dimension, in natural order (layer, variate, y, x)."""

    layer: np.ndarray          # int32
    variate: np.ndarray        # int32
    y: np.ndarray              # int32, -1 for variate granularity
    x: np.ndarray              # int32, -1 for variate granularity
    resolution: np.ndarray     # int32, H (= W) of the dimension's layer
    avg_kl: np.ndarray         # float64, nats
    active_units: np.ndarray   # float64, Var over data of the posterior mean

    def __len__(self) -> int:
        return len(self.layer)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("layer", "variate", "y", "x", "resolution", "avg_kl", "active_units")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "DimTable":
        ints = ("layer", "variate", "y", "x", "resolution")
        return cls(**{k: np.asarray(arrays[k], dtype=np.int32 if k in ints else np.float64)
                      for k in ("layer", "variate", "y", "x", "resolution", "avg_kl", "active_units")})


# --------------------------------------------------------------------------- statistics
class LatentKL:
    """Exact per-dimension average KL and active-units statistic over a dataset.

    scikit-learn style: parameters in ``__init__``, ``fit`` returns ``self``, fitted
    attributes end in ``_``.

    Parameters:
        batch_size: images per forward pass (the result depends on it only through float32
            rounding inside the network, ~1e-7 relative).
        seed: seeds the posterior samples z_<i on which each layer's KL is conditioned.
        posterior: ``"sample"`` (the ELBO's E_q, default) or ``"mean"``.
        device: where to run (default: the model's device).

    Fitted attributes:
        n_images_: images seen (summed over processes under torchrun).
        layer_shapes_: (V, H, W) per latent layer.
        element_kl_: per layer, float64 (V, H, W) average KL of each element, nats.
        element_au_: per layer, float64 (V, H, W) variance over the data of the posterior mean.
    """

    def __init__(self, *, batch_size: int = 256, seed: int = 0, posterior: str = "sample",
                 device: torch.device | str | None = None) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.posterior = posterior
        self.device = device

    @torch.no_grad()
    def fit(self, model, images, *, progress: Callable[[int], None] | None = None) -> "LatentKL":
        """Accumulate over ``images`` (uint8 NHWC array, NCHW tensor, LazyImages, or an iterable of batches).

        Under ``torch.distributed`` each process passes its own shard; the float64 sums
        are all-reduced so every process ends with the result over all shards.
        """
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', not {self.posterior!r}")
        device = torch.device(self.device) if self.device is not None else next(model.parameters()).device
        shapes = model.cfg.layer_shapes()
        kl_sum = [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes]
        mu_sum = [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes]
        mu_sq_sum = [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes]
        n = torch.zeros((), dtype=torch.float64, device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            for batch in iter_batches(images, self.batch_size):
                x = prepare_batch(model.cfg, batch, device=device)
                out = model(x, posterior=self.posterior, generator=generator)
                for k, layer in enumerate(out.layers):
                    kl_sum[k] += layer.kl.double().sum(0)
                    mu = layer.q_mean.double()
                    mu_sum[k] += mu.sum(0)
                    mu_sq_sum[k] += (mu * mu).sum(0)
                n += x.shape[0]
                if progress is not None:
                    progress(int(x.shape[0]))
        finally:
            model.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([t.flatten() for t in (*kl_sum, *mu_sum, *mu_sq_sum)] + [n.reshape(1)])
            dist.all_reduce(flat)
            pieces = iter(torch.split(flat[:-1], [math.prod(s) for s in shapes] * 3))
            kl_sum = [next(pieces).view(s) for s in shapes]
            mu_sum = [next(pieces).view(s) for s in shapes]
            mu_sq_sum = [next(pieces).view(s) for s in shapes]
            n = flat[-1]
        n_images = int(n.item())
        if n_images == 0:
            raise UserError("no images to analyse (the data split is empty).")
        self.n_images_ = n_images
        self.layer_shapes_ = list(shapes)
        self.element_kl_ = [(s / n_images).cpu().numpy() for s in kl_sum]
        # Var = E[mu^2] - E[mu]^2 in float64; clipped at 0 against rounding.
        self.element_au_ = [np.maximum((q / n_images - (m / n_images) ** 2).cpu().numpy(), 0.0)
                            for m, q in zip(mu_sum, mu_sq_sum)]
        return self

    def table(self, granularity: str = "variate") -> DimTable:
        """Every dimension of every layer, in natural order, with its average KL and AU."""
        _check_fitted(self)
        return dimension_table(self.layer_shapes_, granularity, self.element_kl_, self.element_au_)


def dimension_table(layer_shapes: Sequence[tuple[int, int, int]], granularity: str,
                    element_kl: Sequence[np.ndarray] | None = None,
                    element_au: Sequence[np.ndarray] | None = None) -> DimTable:
    """Every dimension of layers of these (V, H, W) shapes, in natural order; avg_kl and
    active_units from per-layer (V, H, W) element statistics (zeros when not given).
    A variate's statistic is its elements' average over the H x W positions."""
    if granularity not in GRANULARITIES:
        raise UserError(f"--granularity must be variate or element, not '{granularity}'.")
    cols: dict[str, list] = {k: [] for k in ("layer", "variate", "y", "x", "resolution", "avg_kl", "active_units")}
    for k, (v, h, w) in enumerate(layer_shapes):
        kl = element_kl[k] if element_kl is not None else np.zeros((v, h, w))
        au = element_au[k] if element_au is not None else np.zeros((v, h, w))
        if granularity == "variate":
            cols["layer"].append(np.full(v, k))
            cols["variate"].append(np.arange(v))
            cols["y"].append(np.full(v, -1))
            cols["x"].append(np.full(v, -1))
            cols["resolution"].append(np.full(v, h))
            cols["avg_kl"].append(kl.reshape(v, -1).mean(1))
            cols["active_units"].append(au.reshape(v, -1).mean(1))
        else:
            vv, yy, xx = np.meshgrid(np.arange(v), np.arange(h), np.arange(w), indexing="ij")
            cols["layer"].append(np.full(v * h * w, k))
            cols["variate"].append(vv.ravel())
            cols["y"].append(yy.ravel())
            cols["x"].append(xx.ravel())
            cols["resolution"].append(np.full(v * h * w, h))
            cols["avg_kl"].append(kl.ravel())
            cols["active_units"].append(au.ravel())
    return DimTable.from_arrays({k: np.concatenate(c) for k, c in cols.items()})


def _check_fitted(est: LatentKL) -> None:
    if not hasattr(est, "element_kl_"):
        raise RuntimeError("LatentKL is not fitted yet: call fit(model, images) first.")


# --------------------------------------------------------------------------- selection rules
def parse_keep(value: str | float) -> float:
    """``--keep`` as a fraction in (0, 1]: '3%' -> 0.03; 0.03 -> 0.03; '7' -> 0.07 (a bare number > 1 is a percentage)."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"--keep must be a percentage like 3% or a fraction like 0.03, not '{value}'.") from None
    percent = number if (text.endswith("%") or number > 1) else number * 100
    if not 0 < percent <= 100 or not math.isfinite(percent):
        raise UserError(f"--keep must be in (0, 100]%, not '{value}'.")
    return percent / 100


def rank_dimensions(table: DimTable) -> np.ndarray:
    """Indices of all dimensions, highest average KL first; ties by (layer, variate, y, x)."""
    return np.lexsort((table.x, table.y, table.variate, table.layer, -table.avg_kl))


def select_dimensions(table: DimTable, *, keep: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Indices (natural order) of the active dimensions under exactly one rule.

    keep: fraction in (0, 1]: the top ceil(keep * n) dimensions by average KL.
    threshold: nats: every dimension whose average KL is > threshold.
    """
    if (keep is None) == (threshold is None):
        raise UserError("give exactly one of --keep or --threshold.")
    order = rank_dimensions(table)
    if keep is not None:
        if not 0 < keep <= 1:
            raise UserError(f"--keep must be in (0, 100]%, not {keep * 100:g}%.")
        k = max(1, math.ceil(keep * len(table) - 1e-9))
        chosen = order[:k]
    else:
        if not math.isfinite(threshold):
            raise UserError(f"--threshold must be a finite number of nats, not {threshold}.")
        chosen = np.flatnonzero(table.avg_kl > threshold)
        if len(chosen) == 0:
            raise UserError(f"--threshold {threshold:g} keeps no dimensions: the largest average KL is "
                            f"{table.avg_kl.max():.4g} nats.")
    return np.sort(chosen)


# --------------------------------------------------------------------------- the active set
@dataclass
class ActiveSet:
    """The chosen dimensions of one checkpoint, with the full ranking they came from."""

    granularity: str
    table: DimTable
    selected: np.ndarray                      # indices into table, natural order
    rule: str                                 # "keep" | "threshold"
    value: float                              # fraction for keep, nats for threshold
    layer_shapes: list[tuple[int, int, int]]
    n_images: int
    data: str = ""
    split: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ranking(self) -> np.ndarray:
        return rank_dimensions(self.table)

    @property
    def n_dims(self) -> int:
        return len(self.table)

    @property
    def n_active(self) -> int:
        return len(self.selected)

    def selected_mask(self) -> np.ndarray:
        mask = np.zeros(self.n_dims, dtype=bool)
        mask[self.selected] = True
        return mask

    def layer_masks(self, device: torch.device | str | None = None) -> list[torch.Tensor | None]:
        """Per layer a bool (V, H, W) mask of active positions; None where a layer is fully active."""
        chosen = self.selected_mask()
        masks: list[torch.Tensor | None] = []
        for k, (v, h, w) in enumerate(self.layer_shapes):
            rows = self.table.layer == k
            mask = np.zeros((v, h, w), dtype=bool)
            if self.granularity == "variate":
                mask[self.table.variate[rows & chosen]] = True
            else:
                sel = rows & chosen
                mask[self.table.variate[sel], self.table.y[sel], self.table.x[sel]] = True
            masks.append(None if mask.all() else torch.from_numpy(mask).to(device))
        return masks

    def kept_scalars_per_image(self) -> int:
        """Latent scalars an encoding keeps per image (a kept variate keeps all its H x W positions)."""
        if self.granularity == "element":
            return self.n_active
        res = self.table.resolution[self.selected].astype(np.int64)
        return int((res * res).sum())

    def total_scalars_per_image(self) -> int:
        return int(sum(v * h * w for v, h, w in self.layer_shapes))

    def summary(self) -> dict:
        """Counts, KL share of the active set and the per-layer / per-resolution breakdown."""
        kl = self.table.avg_kl
        chosen = self.selected_mask()
        total = float(kl.sum())
        share = float(kl[chosen].sum() / total) if total > 0 else 0.0
        au_active = self.table.active_units > AU_THRESHOLD
        layers = []
        for k, (v, h, w) in enumerate(self.layer_shapes):
            rows = self.table.layer == k
            layers.append({"layer": k, "resolution": h, "dims": int(rows.sum()), "active": int((rows & chosen).sum()),
                           "kl_nats": float(kl[rows].sum()), "au_active": int((rows & au_active).sum())})
        by_res: dict[int, dict] = {}
        for row in layers:
            r = by_res.setdefault(row["resolution"], {"resolution": row["resolution"], "layers": 0, "dims": 0,
                                                      "active": 0, "kl_nats": 0.0, "au_active": 0})
            r["layers"] += 1
            for key in ("dims", "active", "kl_nats", "au_active"):
                r[key] += row[key]
        return {
            "granularity": self.granularity, "rule": self.rule, "value": self.value, "n_images": self.n_images,
            "n_dims": self.n_dims, "n_active": self.n_active, "pct_active": 100.0 * self.n_active / self.n_dims,
            "kl_share_active": share, "total_avg_kl_nats": total,
            "n_au_active": int(au_active.sum()),
            "n_au_active_in_set": int((au_active & chosen).sum()),
            "kept_scalars_per_image": self.kept_scalars_per_image(),
            "total_scalars_per_image": self.total_scalars_per_image(),
            "layers": layers, "resolutions": [by_res[r] for r in sorted(by_res)],
        }

    def div_stats_bits(self) -> np.ndarray:
        """Average KL per (layer, variate) in bits: the official code's ``div_stats.npy``.

        The official Efficient-VDVAE code averages each variate's KL over its H x W
        positions and the data, divides by ln 2 and stacks the layers into an
        (n_layers, n_variates) array, which its synthesis modes read to mask variates.
        Needs variate granularity and the same number of variates in every layer.
        """
        if self.granularity != "variate":
            raise UserError("the official div_stats layout needs --granularity variate.")
        counts = {v for v, _, _ in self.layer_shapes}
        if len(counts) != 1:
            raise UserError("the official div_stats layout needs the same number of variates in every layer; "
                            f"this model has {sorted(counts)}.")
        out = np.zeros((len(self.layer_shapes), counts.pop()), dtype=np.float64)
        out[self.table.layer, self.table.variate] = self.table.avg_kl / math.log(2.0)
        return out

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """ACTIVE.json (+ ACTIVE.npz beside it when there are many dimensions); atomic writes."""
        path = Path(path)
        if path.suffix == ".npz":
            raise UserError(f"--out '{path}' must be a .json file (large arrays go to a .npz beside it).")
        arrays = {**self.table.arrays(), "selected": self.selected.astype(np.int64),
                  "ranking": self.ranking.astype(np.int64)}
        meta = {
            "schema": "vdvl-active-set", "schema_version": 1,
            "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
            "data": self.data, "split": self.split, "n_images": self.n_images, "granularity": self.granularity,
            "rule": self.rule, "value": self.value, "layer_shapes": [list(s) for s in self.layer_shapes],
            "summary": {k: v for k, v in self.summary().items() if k not in ("layers",)}, **self.extra,
        }
        if self.n_dims > SIDECAR_THRESHOLD:
            sidecar = path.with_suffix(".npz")
            with atomic_file(sidecar, what="active-set arrays") as f:
                np.savez_compressed(f, **arrays)  # a file object: numpy adds no .npz suffix
            meta["arrays"] = {"sidecar": sidecar.name}
        else:
            meta["arrays"] = {k: v.tolist() for k, v in arrays.items()}
        write_text(path, json.dumps(meta, indent=1) + "\n", what="active set")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ActiveSet":
        path = Path(path)
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"active-set file '{path}' does not exist.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"active-set file '{path}' is not readable JSON ({err}).") from None
        if not isinstance(meta, dict) or meta.get("schema") != "vdvl-active-set":
            raise UserError(f"'{path}' is not an active-set file written by `vdvl analyze-kl`.")
        try:
            spec = meta["arrays"]
            if "sidecar" in spec:
                with np.load(path.parent / spec["sidecar"], allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            else:
                arrays = {k: np.asarray(v) for k, v in spec.items()}
            table = DimTable.from_arrays(arrays)
            selected = np.asarray(arrays["selected"], dtype=np.int64)
            shapes = [tuple(int(x) for x in s) for s in meta["layer_shapes"]]
            fields = dict(granularity=str(meta["granularity"]), rule=str(meta["rule"]), value=float(meta["value"]),
                          n_images=int(meta["n_images"]))
            lengths = {len(a) for a in table.arrays().values()}
        except (KeyError, OSError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
                zlib.error) as err:
            raise UserError(f"active-set file '{path}' is incomplete or corrupt ({err}).") from None
        if len(lengths) != 1 or selected.ndim != 1:
            raise UserError(f"active-set file '{path}' is incomplete or corrupt (its arrays differ in length).")
        if fields["granularity"] not in GRANULARITIES or fields["rule"] not in ("keep", "threshold"):
            raise UserError(f"active-set file '{path}' has an unknown granularity '{fields['granularity']}' "
                            f"or rule '{fields['rule']}'.")
        if selected.size and (selected.min() < 0 or selected.max() >= len(table)):
            raise UserError(f"active-set file '{path}' selects dimensions that do not exist.")
        extra_keys = set(meta) - {"schema", "schema_version", "checkpoint", "checkpoint_sha256", "data", "split",
                                  "n_images", "granularity", "rule", "value", "layer_shapes", "summary", "arrays"}
        return cls(table=table, selected=selected, layer_shapes=shapes, **fields,
                   data=meta.get("data", ""), split=meta.get("split", ""), checkpoint=meta.get("checkpoint", ""),
                   checkpoint_sha256=meta.get("checkpoint_sha256", ""), extra={k: meta[k] for k in extra_keys})


def build_active_set(stats: LatentKL, *, granularity: str = "variate", keep: float | None = None,
                     threshold: float | None = None, **meta) -> ActiveSet:
    """Rank the fitted statistics and choose the active set under one rule."""
    table = stats.table(granularity)
    selected = select_dimensions(table, keep=keep, threshold=threshold)
    rule, value = ("keep", float(keep)) if keep is not None else ("threshold", float(threshold))
    return ActiveSet(granularity=granularity, table=table, selected=selected, rule=rule, value=value,
                     layer_shapes=stats.layer_shapes_, n_images=stats.n_images_, **meta)
