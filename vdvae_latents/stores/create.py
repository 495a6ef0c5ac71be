"""Creating an empty store: checking what the caller asks for, planning the store's arrays and
attributes (the layout :mod:`~vdvae_latents.stores.writer` documents), and making it on disk.

:meth:`~vdvae_latents.stores.writer.StoreWriter.create` is the way in; :func:`create_store`
does the work and hands back the open backend and the layout the writer then fills.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.outputs import prepare_output
from .backends import (
    JSON_KEYS_ATTR,
    ArraySpec,
    Backend,
    StoreError,
    create_backend,
    normalise_attrs,
    os_error_text,
    parse_codec,
    store_format,
)
from .codes import ERROR_FIELDS, INT_DTYPES, Quantizer
from .schema import (
    DIM_FIELDS,
    FEATURE_DTYPES,
    FILL_FEATURES,
    FILL_INDEX,
    OWN_ATTRS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    VALUE_ARRAYS,
    StoreLayout,
    as_numpy,
    is_count,
)


def create_store(path: Path, *, n_rows: int, dims: dict[str, np.ndarray], attrs: dict[str, Any], dtype: str,
                 with_std: bool, has_labels: bool, has_source_names: bool, quantizers: dict[str, Quantizer] | None,
                 quantization: dict[str, Any] | None, codec: str | None, chunk_rows: int,
                 overwrite: bool) -> tuple[Backend, StoreLayout, dict[str, Quantizer]]:
    """Make the empty store of :meth:`~vdvae_latents.stores.writer.StoreWriter.create` (same arguments):
    (its open backend, its layout, its quantisers). Arguments are checked before anything on disk changes."""
    fmt = store_format(path)
    _check_sizes(path, dtype, n_rows, chunk_rows)
    n_rows, chunk_rows = int(n_rows), int(chunk_rows)
    codec_name, codec_settings = parse_codec(fmt, codec, dtype)
    dims_arrays = check_dims(path, dims)
    n_features = len(dims_arrays["layer"])
    value_arrays = ["features"] + (["features_std"] if with_std else [])
    quantizers = _check_quantizers(dtype, value_arrays, n_features, dict(quantizers or {}))
    row_arrays = value_arrays + (["labels"] if has_labels else []) + ["sample_index", "source_index"] \
        + (["source_names"] if has_source_names else [])
    layout = StoreLayout(attrs={}, version=SCHEMA_VERSION, n_rows=n_rows, n_features=n_features,
                         chunk_rows=chunk_rows, dtype=dtype, row_arrays=tuple(row_arrays), complete=False)
    # The attributes describe the layout, so they are filled in once the rest of it is known.
    layout = replace(layout, attrs=store_attrs(attrs, layout, codec_name, quantization))
    _prepare_destination(path, overwrite)
    backend = _make_backend(path, array_specs(layout, dims_arrays, quantizers), layout.attrs, codec_settings)
    return backend, layout, quantizers


# ----------------------------------------------------------------------------- checking the request


def _check_sizes(path: Path, dtype: str, n_rows: Any, chunk_rows: Any) -> None:
    if dtype not in FEATURE_DTYPES:
        raise StoreError(f"cannot create {path} with dtype {dtype!r}: use {', '.join(FEATURE_DTYPES)}.")
    if not is_count(n_rows, 1):
        raise StoreError(f"cannot create {path} with {n_rows!r} rows: the data split has no images.")
    if not is_count(chunk_rows, 1):
        raise StoreError(f"cannot create {path} with chunk_rows={chunk_rows!r}: use a positive integer.")


def check_dims(path: Path, dims: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The five dims/ arrays as 1-D arrays of one length K >= 1, in their store dtypes."""
    missing = [name for name in DIM_FIELDS if name not in dims]
    extra = [name for name in dims if name not in DIM_FIELDS]
    if missing or extra:
        raise ValueError(f"dims must have exactly the keys {list(DIM_FIELDS)}; "
                         f"missing {missing}, unexpected {extra}")
    out = {name: as_numpy(dims[name]) for name in DIM_FIELDS}
    n_features = out["layer"].shape[0] if out["layer"].ndim == 1 else -1
    for name, values in out.items():
        if values.ndim != 1 or values.shape[0] != n_features:
            raise ValueError(f"dims[{name!r}] has shape {values.shape}; every dims array must be 1-D "
                             f"with the length of dims['layer']")
        out[name] = values.astype(DIM_FIELDS[name], casting="same_kind" if name == "avg_kl" else "unsafe")
    if n_features == 0:
        raise StoreError(f"cannot create {path} with no feature dimensions: the selection kept none.")
    return out


def _check_quantizers(dtype: str, value_arrays: list[str], n_features: int,
                      quantizers: dict[str, Quantizer]) -> dict[str, Quantizer]:
    """Integer stores need one quantiser of the store's dtype and width per value array; float stores none."""
    if dtype in INT_DTYPES:
        for name in value_arrays:
            q = quantizers.get(name)
            if q is None or q.dtype != dtype or q.scale.shape != (n_features,):
                raise ValueError(f"an {dtype} store needs a {dtype} Quantizer of {n_features} columns for {name}")
    elif quantizers:
        raise ValueError(f"quantizers are for integer dtypes, not {dtype}")
    return quantizers


# ----------------------------------------------------------------------------- the layout


def store_attrs(attrs: dict[str, Any], layout: StoreLayout, codec_name: str,
                quantization: dict[str, Any] | None) -> dict[str, Any]:
    """The root attributes of a new store: the caller's (which may not contradict the store's own
    :data:`~vdvae_latents.stores.schema.OWN_ATTRS`) followed by the store's own."""
    user_attrs = normalise_attrs(dict(attrs))
    own = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "n_rows": layout.n_rows,
           "n_features": layout.n_features, "chunk_rows": layout.chunk_rows, "codec": codec_name,
           "checksum": "crc32", "checksum_arrays": list(layout.row_arrays),
           "quantization": normalise_attrs({"dtype": layout.dtype, **(quantization or {})}) if layout.quantized
           else None,
           "complete": False}
    assert tuple(own) == OWN_ATTRS
    for key, value in own.items():
        if key in user_attrs and user_attrs[key] != value:
            raise ValueError(f"attrs[{key!r}] = {user_attrs[key]!r} contradicts the store's own value {value!r}")
    if JSON_KEYS_ATTR in user_attrs:
        raise ValueError(f"attrs may not use the reserved name {JSON_KEYS_ATTR!r}")
    return {**user_attrs, **own}


def array_specs(layout: StoreLayout, dims: dict[str, np.ndarray],
                quantizers: dict[str, Quantizer]) -> list[ArraySpec]:
    """Every array of a new store: row arrays, dims, quantisers, then the per-chunk records."""
    n_rows, n_features, chunk_rows = layout.n_rows, layout.n_features, layout.chunk_rows
    specs = []
    for name in layout.row_arrays:
        if name in VALUE_ARRAYS:
            fill = 0 if layout.quantized else FILL_FEATURES
            specs.append(ArraySpec(name, (n_rows, n_features), layout.dtype, chunk_rows, fill, ("row", "feature"),
                                   True))
        elif name == "source_names":
            specs.append(ArraySpec(name, (n_rows,), "str", chunk_rows, "", ("row",)))
        else:
            specs.append(ArraySpec(name, (n_rows,), "int64", chunk_rows, FILL_INDEX, ("row",), True))
    specs += [ArraySpec(f"dims/{name}", values.shape, str(values.dtype), dims=("feature",), data=values)
              for name, values in dims.items()]
    for name, q in quantizers.items():
        specs += [ArraySpec(f"quantization/{name}/{part}", (n_features,), "float64", dims=("feature",),
                            data=values) for part, values in q.arrays().items()]
    # One object per chunk (chunk_rows=1): concurrent writers owning different chunks never
    # rewrite each other's records. Fill 0 means "not written"; uncompressed, they are tiny.
    n_chunks = layout.n_chunks
    specs += [ArraySpec("chunks_written", (n_chunks,), "uint8", 1, 0, ("chunk",)),
              ArraySpec("chunk_checksums", (n_chunks, len(layout.row_arrays)), "uint32", 1, 0,
                        ("chunk", "checksummed_array")),
              ArraySpec("chunk_errors", (n_chunks, len(layout.value_arrays), len(ERROR_FIELDS)), "float64", 1, 0,
                        ("chunk", "value_array", "error_field"))]
    return specs


# ----------------------------------------------------------------------------- on disk


def remove_existing(path: Path) -> None:
    """Delete an old store for --overwrite, refusing to delete a directory that is not one."""
    if path.is_dir() and not path.is_symlink():
        # A mistyped path must not wipe an unrelated directory: a Zarr store has zarr.json.
        if any(path.iterdir()) and not (path / "zarr.json").exists():
            raise StoreError(f"{path} is a directory that is not a Zarr store; refusing to delete it "
                             f"for --overwrite.")
        shutil.rmtree(path)
    else:
        path.unlink()


def _prepare_destination(path: Path, overwrite: bool) -> None:
    """Remove an old store (only with ``overwrite``) and check that the directory takes a new one."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise StoreError(f"{path} exists; use --overwrite or --resume.")
        try:
            remove_existing(path)
        except OSError as exc:
            raise StoreError(f"cannot remove the existing {path} ({os_error_text(exc)}).") from exc
    prepare_output(path, what="store", kind="folder" if store_format(path) == "zarr" else "file", error=StoreError)


def _make_backend(path: Path, specs: list[ArraySpec], attrs: dict[str, Any], codec_settings: Any) -> Backend:
    try:
        return create_backend(path, specs, attrs, codec_settings)
    except Exception as exc:
        # A half-created store would only confuse a later --resume; remove what we made.
        try:
            if path.exists():
                remove_existing(path)
        except (OSError, StoreError):
            pass
        if isinstance(exc, OSError):
            raise StoreError(f"cannot create {path} ({os_error_text(exc)}).") from exc
        raise
