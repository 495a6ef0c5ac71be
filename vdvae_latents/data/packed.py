"""Reading what ``vdvl pack`` wrote: a packed store's attributes and which of its rows are valid.

The reader side of :mod:`~vdvae_latents.data.pack`'s format, kept apart from the packing so
that the array readers (``array_files``) can open a packed store without importing the packer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DataError

PACK_SCHEMA = "vdvl-packed-images"


def packed_layout(root, path: Path) -> dict | None:
    """What a reader needs from a packed store (None when ``root`` is not one); refuses an incomplete one."""
    attrs = dict(root.attrs)
    if attrs.get("schema") != PACK_SCHEMA:
        return None
    if attrs.get("complete") is not True:
        raise DataError(f"packed store {path} is incomplete (packing was interrupted); finish it with "
                        f"`vdvl pack {attrs.get('source', 'SOURCE')} --out {path} --resume`")
    _check_packed(root, attrs, path)
    ok = np.asarray(root["ok"][...], dtype=bool)
    valid_rows = None if ok.all() else np.flatnonzero(ok).astype(np.int64)
    n_train = attrs.get("n_train")
    if n_train is not None and valid_rows is not None:
        n_train = int(np.count_nonzero(valid_rows < n_train))
    names = np.asarray(root["names"][...]) if "names" in root else None
    class_names = attrs.get("class_names")
    return {"valid_rows": valid_rows, "names": names, "n_train": n_train,
            "class_names": None if class_names is None else tuple(class_names)}


def _check_packed(root, attrs: dict, path: Path) -> None:
    """Refuse a packed store whose per-row arrays or split attributes do not fit its images (checked
    before they are read: an array's metadata may claim any length)."""
    n_rows, problem = root["images"].shape[0], None
    for name in ("ok", "names"):
        if name in root and tuple(root[name].shape) != (n_rows,):
            problem = f"its {name} array has shape {tuple(root[name].shape)}, not one entry per image ({n_rows})"
    n_train, class_names = attrs.get("n_train"), attrs.get("class_names")
    if n_train is not None and (type(n_train) is not int or not 0 <= n_train <= n_rows):
        problem = f"its n_train attribute is {n_train!r}, not a number of rows from 0 to {n_rows}"
    if class_names is not None and (not isinstance(class_names, list)
                                    or not all(isinstance(c, str) for c in class_names)):
        problem = f"its class_names attribute is {str(class_names)[:60]}, not a list of names"
    if problem:
        raise DataError(f"packed store {path} is corrupt: {problem}; pack it again with --overwrite")


__all__ = ["PACK_SCHEMA", "packed_layout"]
