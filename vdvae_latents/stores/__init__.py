"""Stores: compact encodings on disk (Zarr or HDF5), written, read, verified and decoded.

One schema (``schema``) for both formats (``backends``): chunked, compressed, checksummed
feature rows with the dims table and provenance. :class:`StoreWriter` writes chunk by chunk
and can resume; :func:`open_encodings` reads lazily; :func:`verify_store` checks every chunk;
``codes`` maps values to int8/uint8 codes. :func:`encode_to_store` and :func:`decode_store`
are ``vdvl encode`` and ``vdvl decode``; :func:`score_to_store` (``vdvl score``) writes per-image
scores (the ELBO, per-layer KL, L^{>k}, LLR^{>k}) into the same kind of store.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "writer": ["StoreWriter"],
    "reader": ["Encodings", "LazyArray", "open_encodings"],
    "backends": ["StoreError", "store_format", "parse_codec", "default_codec"],
    "schema": ["SCHEMA_NAME", "SCHEMA_VERSION", "DIM_FIELDS", "disk_bytes"],
    "verify": ["verify_store", "PROBLEMS"],
    "codes": ["Quantizer", "fit_quantizer"],
    "choices": ["DTYPES", "SCHEMES", "DEFAULT_SCHEME", "DEFAULT_STEP"],
    "encode": ["encode_to_store"],
    "scores": ["score_to_store"],
    "decode": ["decode_store", "store_encoder"],
})
