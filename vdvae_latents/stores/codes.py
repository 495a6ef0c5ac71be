"""Integer features: one affine map per column between stored codes and latent values.

A quantised store (``vdvl encode --dtype int8|uint8``) holds integer codes ``c`` and, per
column ``j``, a ``scale`` and an ``offset`` with ``x = offset[j] + scale[j] * c``. Every
reader applies the map, so code that reads a store sees latent values either way.

Three ways to choose the map, all from calibration rows (a seeded sample of the encoded
split, :func:`calibration_rows`), centred on each column's calibration mean:

``std-step`` (the default)
    A step of ``step`` times each column's standard deviation over the calibration rows:
    every column gets the same noise-to-signal ratio (``step / sqrt(12)``), and the codes
    use only the few levels the data need, so they compress to a few bits each.
``prior-step``
    A step of ``step`` times each dimension's prior standard deviation (the root mean
    square of the prior std over the calibration images). Noise far below the posterior's
    own uncertainty costs little information about the image, but a linear probe reads the
    posterior *means*, which in a kept dimension may vary over a fraction of the prior std:
    at the same size this loses more probe accuracy than ``std-step``.
``range``
    Each column's calibration minimum to maximum over all 256 levels: the finest grid 8 bits
    allow, but every level is used, so the codes barely compress.

Values beyond the end codes are clipped (counted in the error report).
``benchmarks/results/store_codecs-*.md`` records what each keeps (error, probe accuracy,
bytes per image) on Fashion-MNIST.

The rounding error of an unclipped value is at most ``scale[j] / 2``. :func:`error_stats`
sums what a chunk lost (squared error, largest error, clipped values and the squared error
relative to the column's spread), so the encode summary reports the error over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import UserError
from .choices import DEFAULT_SCHEME, DEFAULT_STEP, check_scheme, check_step

#: Integer dtypes and their (lowest, highest) codes.
INT_DTYPES: dict[str, tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255)}
#: Columns of the per-chunk error record (:func:`error_stats`).
ERROR_FIELDS = ("sum_sq_error", "max_abs_error", "n_clipped", "sum_sq_relative_error")
CALIBRATION_ROWS = 4096


@dataclass
class Quantizer:
    """Per-column affine map between integer codes and values (float64 parameters)."""

    dtype: str
    scale: np.ndarray     # (K,) > 0
    offset: np.ndarray    # (K,)
    spread: np.ndarray    # (K,) the calibration rows' std of each column (> 0), for relative errors

    def __post_init__(self) -> None:
        if self.dtype not in INT_DTYPES:
            raise ValueError(f"quantised dtype must be one of {', '.join(INT_DTYPES)}, not {self.dtype!r}")
        self.scale = np.asarray(self.scale, dtype=np.float64)
        self.offset = np.asarray(self.offset, dtype=np.float64)
        self.spread = np.asarray(self.spread, dtype=np.float64)
        if not (self.scale.shape == self.offset.shape == self.spread.shape and self.scale.ndim == 1):
            raise ValueError("scale, offset and spread must be 1-D arrays of one length")
        if not (np.isfinite(self.scale).all() and np.isfinite(self.offset).all() and (self.scale > 0).all()
                and np.isfinite(self.spread).all() and (self.spread > 0).all()):
            raise ValueError("quantiser parameters must be finite with positive scales and spreads")

    @property
    def levels(self) -> tuple[int, int]:
        return INT_DTYPES[self.dtype]

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Float values (rows, K) -> integer codes; out-of-range values clip to the end codes."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("cannot quantise NaN or infinite values")
        lo, hi = self.levels
        return np.clip(np.rint((values - self.offset) / self.scale), lo, hi).astype(self.dtype)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Integer codes (rows, K) -> float32 values."""
        return (self.offset + self.scale * np.asarray(codes, dtype=np.float64)).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"scale": self.scale, "offset": self.offset, "spread": self.spread}


def error_stats(values: np.ndarray, stored: np.ndarray, spread: np.ndarray, clipped: int = 0) -> np.ndarray:
    """What storing ``values`` as ``stored`` (both as values, (rows, K)) lost: one row of
    :data:`ERROR_FIELDS`, float64, to be summed (max-ed) over chunks by :func:`summarise_errors`."""
    err = np.asarray(stored, dtype=np.float64) - np.asarray(values, dtype=np.float64)
    return np.array([float(np.square(err).sum()), float(np.abs(err).max(initial=0.0)), float(clipped),
                     float(np.square(err / spread).sum())])


def count_clipped(quantizer: Quantizer, values: np.ndarray, codes: np.ndarray) -> int:
    """Values that sit on an end code and lie beyond it by more than half a step."""
    lo, hi = quantizer.levels
    raw = (np.asarray(values, dtype=np.float64) - quantizer.offset) / quantizer.scale
    return int(np.count_nonzero(((codes == lo) & (raw < lo - 0.5)) | ((codes == hi) & (raw > hi + 0.5))))


def summarise_errors(per_chunk: np.ndarray, n_values: int) -> dict[str, float]:
    """Totals over chunks (rows of :func:`error_stats`) for ``n_values`` stored values."""
    per_chunk = np.asarray(per_chunk, dtype=np.float64).reshape(-1, len(ERROR_FIELDS))
    n = max(int(n_values), 1)
    return {"rmse": float(np.sqrt(per_chunk[:, 0].sum() / n)),
            "max_abs_error": float(per_chunk[:, 1].max(initial=0.0)),
            "clipped_fraction": float(per_chunk[:, 2].sum() / n),
            # noise-to-signal: RMS error in units of each column's spread (its std)
            "relative_rmse": float(np.sqrt(per_chunk[:, 3].sum() / n))}


def _spread(values: np.ndarray) -> np.ndarray:
    std = values.std(axis=0)
    return np.where(std > 0, std, 1.0)


def fit_quantizer(values: np.ndarray, dtype: str, *, scheme: str = DEFAULT_SCHEME, step: float = DEFAULT_STEP,
                  prior_std: np.ndarray | None = None) -> Quantizer:
    """A quantiser for the columns of ``values`` (calibration rows x K).

    ``prior-step`` needs ``prior_std``: the prior std of each calibration value (same shape
    as ``values``) or one per column (K,).
    """
    if dtype not in INT_DTYPES:
        raise UserError(f"--dtype {dtype} is not an integer dtype ({', '.join(INT_DTYPES)}).")
    check_scheme(scheme)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"calibration values must be (rows, K) with rows >= 1, not {values.shape}")
    if not np.isfinite(values).all():
        raise UserError("the calibration rows have NaN or infinite features: the checkpoint produces invalid "
                        "latents, so they cannot be quantised.")
    lo, hi = INT_DTYPES[dtype]
    spread = _spread(values)
    if scheme == "range":
        vmin, vmax = values.min(axis=0), values.max(axis=0)
        width = vmax - vmin
        scale = np.where(width > 0, width / (hi - lo), 1.0)
        offset = vmin - lo * scale
    else:
        check_step(step)
        scale = step * (spread if scheme == "std-step" else _prior_rms(prior_std, spread))
        middle = (lo + hi + 1) // 2  # int8: 0, uint8: 128
        offset = values.mean(axis=0) - middle * scale
    return Quantizer(dtype=dtype, scale=scale, offset=offset, spread=spread)


def _prior_rms(prior_std: np.ndarray | None, spread: np.ndarray) -> np.ndarray:
    """Each column's root mean square prior std (its ``spread`` where that is 0): the prior-step unit."""
    if prior_std is None:
        raise ValueError("the prior-step scheme needs the prior std of the calibration values")
    prior_std = np.asarray(prior_std, dtype=np.float64)
    rms = np.sqrt(np.mean(np.square(prior_std), axis=0)) if prior_std.ndim == 2 else prior_std
    return np.where(rms > 0, rms, spread)


def calibration_rows(n_rows: int, limit: int = CALIBRATION_ROWS, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded sample of at most ``limit`` of ``n_rows`` rows."""
    if n_rows <= limit:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng([seed, 7]).choice(n_rows, limit, replace=False))
