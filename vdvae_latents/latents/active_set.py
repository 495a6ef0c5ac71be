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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import atomic_file, write_text
from ..core.errors import UserError
from ..core.outputs import prepare_output
from .stats import AU_THRESHOLD, GRANULARITIES, DimTable, LatentKL, dimension_table

SIDECAR_THRESHOLD = 20_000  # more dimensions than this go to a .npz beside the JSON


# --------------------------------------------------------------------------- selection rules
def parse_keep(value: str | float) -> float:
    """``--keep`` as a fraction in (0, 1]: '3%' -> 0.03; 0.03 -> 0.03; '7' -> 0.07 (a bare number > 1 is a percentage)."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"--keep must be a percentage like 3% or a fraction like 0.03, not '{value}'.") from None
    fraction = number / 100 if (text.endswith("%") or number > 1) else number
    if not 0 < fraction <= 1 or not math.isfinite(fraction):
        raise UserError(f"--keep must be in (0, 100]%, not '{value}'.")
    return fraction


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
        return save_active_set(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "ActiveSet":
        """An ACTIVE.json written by :meth:`save` (any problem with the file is one UserError)."""
        return load_active_set(path)

# ----------------------------------------------------------------------------- ACTIVE.json
def prepare_active_set_path(path: str | Path) -> Path:
    """Check, before the pass that computes an active set, that ``path`` can take its ACTIVE.json
    (creating missing folders): a command never computes a ranking it then cannot save."""
    path = Path(path)
    if path.suffix == ".npz":
        raise UserError(f"--out '{path}' must be a .json file (large arrays go to a .npz beside it).")
    return prepare_output(path, what="active set")


def save_active_set(active: ActiveSet, path: str | Path) -> Path:
    """Write ``active`` as ACTIVE.json (+ ACTIVE.npz beside it when there are many dimensions), atomically."""
    path = prepare_active_set_path(path)
    arrays = {**active.table.arrays(), "selected": active.selected.astype(np.int64),
              "ranking": active.ranking.astype(np.int64)}
    meta = {
        "schema": "vdvl-active-set", "schema_version": 1,
        "checkpoint": active.checkpoint, "checkpoint_sha256": active.checkpoint_sha256,
        "data": active.data, "split": active.split, "n_images": active.n_images, "granularity": active.granularity,
        "rule": active.rule, "value": active.value, "layer_shapes": [list(s) for s in active.layer_shapes],
        "summary": {k: v for k, v in active.summary().items() if k not in ("layers",)}, **active.extra,
    }
    if active.n_dims > SIDECAR_THRESHOLD:
        sidecar = path.with_suffix(".npz")
        with atomic_file(sidecar, what="active-set arrays") as f:
            np.savez_compressed(f, **arrays)  # a file object: numpy adds no .npz suffix
        meta["arrays"] = {"sidecar": sidecar.name}
    else:
        meta["arrays"] = {k: v.tolist() for k, v in arrays.items()}
    write_text(path, json.dumps(meta, indent=1) + "\n", what="active set")
    return path


def load_active_set(path: str | Path) -> ActiveSet:
    """Read an ACTIVE.json (and its .npz sidecar), checking it is one and is whole: a UserError otherwise."""
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
        selected = np.asarray(arrays["selected"])
        if selected.size and selected.dtype.kind not in "iu":
            raise ValueError(f"its selected dimensions are {selected.dtype} values, not dimension numbers")
        selected = selected.astype(np.int64)
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
    if selected.size and (selected.min() < 0 or selected.max() >= len(table) or np.any(np.diff(selected) <= 0)):
        raise UserError(f"active-set file '{path}' selects dimensions that do not exist (or one twice).")
    problem = _table_problem(table, shapes, fields["granularity"])
    if problem:
        raise UserError(f"active-set file '{path}' is incomplete or corrupt ({problem}).")
    extra_keys = set(meta) - {"schema", "schema_version", "checkpoint", "checkpoint_sha256", "data", "split",
                              "n_images", "granularity", "rule", "value", "layer_shapes", "summary", "arrays"}
    return ActiveSet(table=table, selected=selected, layer_shapes=shapes, **fields,
                     data=meta.get("data", ""), split=meta.get("split", ""), checkpoint=meta.get("checkpoint", ""),
                     checkpoint_sha256=meta.get("checkpoint_sha256", ""), extra={k: meta[k] for k in extra_keys})


def _table_problem(table: DimTable, shapes: list[tuple[int, ...]], granularity: str) -> str | None:
    """What keeps ``table`` from being every dimension of layers of ``shapes`` in natural order, or None."""
    if not shapes or any(len(s) != 3 or not 1 <= min(s) <= max(s) < 2**31 for s in shapes):
        return f"its layer shapes {shapes} are not (variates, height, width) of at least 1"
    n_dims = sum(v if granularity == "variate" else v * h * w for v, h, w in shapes)
    if n_dims != len(table):  # compared before the natural table is built: the shapes may claim anything
        return f"its layer shapes have {n_dims} dimensions but its table {len(table)}"
    natural = dimension_table(shapes, granularity)
    if any(not np.array_equal(getattr(table, k), getattr(natural, k)) for k in ("layer", "variate", "y", "x",
                                                                                  "resolution")):
        return "its table does not list the dimensions of its layer shapes in order"
    return None


def build_active_set(stats: LatentKL, *, granularity: str = "variate", keep: float | None = None,
                     threshold: float | None = None, **meta) -> ActiveSet:
    """Rank the fitted statistics and choose the active set under one rule."""
    table = stats.table(granularity)
    selected = select_dimensions(table, keep=keep, threshold=threshold)
    rule, value = ("keep", float(keep)) if keep is not None else ("threshold", float(threshold))
    return ActiveSet(granularity=granularity, table=table, selected=selected, rule=rule, value=value,
                     layer_shapes=stats.layer_shapes_, n_images=stats.n_images_, **meta)


def fit_active_set(model, images, *, granularity: str = "variate", keep: float | None = None,
                   threshold: float | None = None, batch_size: int = 256, seed: int = 0,
                   device: torch.device | str | None = None, progress: Callable[[int], None] | None = None,
                   **meta) -> ActiveSet:
    """Measure every dimension's average KL over ``images`` and choose the active set: the one
    way `vdvl analyze-kl`, `vdvl encode --keep` and :class:`~vdvae_latents.downstream.ActiveLatents`
    rank a model's latents. ``meta``: provenance kept in the set (data, split, checkpoint, ...).

    Under torchrun each process passes its shard (and its own ``seed``); the statistics are
    reduced across processes, so every process returns the same set.
    """
    stats = LatentKL(batch_size=batch_size, seed=seed, device=device).fit(model, images, progress=progress)
    return build_active_set(stats, granularity=granularity, keep=keep, threshold=threshold, **meta)
