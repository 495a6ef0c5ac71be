"""A folder of image files read one file per row: only the file list is held in memory.

Images lie directly in the folder (no labels) or in one subfolder per class (sorted
names give labels 0, 1, ...). Opening the folder reads every file's header (size and
mode, not its pixels): that names an unreadable file or the first file of another size
(unless ``resize`` is given) before any work starts, and decides the channels exactly as
reading everything would (one colour file makes the whole folder RGB). Pixels are
decoded when a row is read. A file whose pixels turn out corrupt or truncated raises a
:class:`~vdvae_latents.core.errors.DataError` naming it; ``skip_bad`` (``vdvl pack --skip-bad``)
drops files whose header cannot be read and lets the packer count the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import DataError
from .readers import Reader

__all__ = ["ImageFolderReader", "IMAGE_SUFFIXES", "resize_images"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_DEEP_MODES = {"I", "I;16", "I;16B", "I;16L", "F"}  # 16/32-bit pixels would be clipped, not scaled
_GRAY_MODES = ("L", "1", "LA")                      # gray (incl. 1-bit and gray+alpha) stays one channel
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFolderReader(Reader):
    """Rows are the folder's image files in sorted order (class folders first by name)."""

    def __init__(self, folder: Path, resize: tuple[int, int] | None = None, *, skip_bad: bool = False) -> None:
        self.folder, self.resize, self.where = folder, resize, f"image folder {folder}"
        files, labels, self.class_names = _list_images(folder)
        self.skipped: list[str] = []   # files dropped by skip_bad, relative to the folder
        keep, sizes, colour = [], [], False
        for i, path in enumerate(files):
            try:
                size, mode = _header(path)
            except DataError:
                if not skip_bad:
                    raise
                self.skipped.append(path.relative_to(folder).as_posix())
                continue
            keep.append(i)
            sizes.append(size)
            colour = colour or mode not in _GRAY_MODES
        if not keep:
            raise DataError(f"{self.where} has no readable images ({len(self.skipped)} skipped)")
        files = [files[i] for i in keep]
        self.labels = None if labels is None else labels[keep]
        if resize is None:
            first = sizes[0]
            for path, size in zip(files, sizes):
                if size != first:
                    raise DataError(
                        f"image file {path} is {size[0]}x{size[1]} (HxW) but {files[0]} is {first[0]}x{first[1]}; "
                        f"images in {folder} must be one size unless resize is given (vdvl pack --resize S)"
                    )
        height, width = resize if resize is not None else sizes[0]
        self.shape = (height, width, 3 if colour else 1)
        self.n_rows = len(files)
        # One bytes array, not a list of Paths: a million names stay tens of MB, and forked
        # workers do not copy them by touching reference counts.
        self._names = np.array([p.relative_to(folder).as_posix().encode() for p in files])

    @property
    def has_names(self) -> bool:
        return True

    def names(self, rows: np.ndarray) -> list[str]:
        return [n.decode() for n in self._names[rows]]

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        for k, name in enumerate(self.names(rows)):
            out[k] = self._decode(self.folder / name)
        return out

    def _decode(self, path: Path) -> np.ndarray:
        """One file as uint8 (H, W, C) with this folder's channels and size."""
        try:
            with Image.open(path) as img:
                img.load()  # decode now, so a truncated file fails here, inside the try
                if img.mode in _DEEP_MODES:
                    raise DataError(f"image file {path} has {img.mode} pixels; only 8-bit gray or colour "
                                    "images are supported")
                img = img.convert("RGB" if self.shape[2] == 3 else "L")
                if self.resize is not None:
                    img = img.resize((self.shape[1], self.shape[0]), Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.uint8)
        except _IMAGE_ERRORS as exc:
            raise DataError(f"image file {path} cannot be read ({exc})") from exc
        if array.shape[:2] != self.shape[:2]:  # the file changed since the folder was opened
            raise DataError(f"image file {path} is {array.shape[0]}x{array.shape[1]} (HxW), not "
                            f"{self.shape[0]}x{self.shape[1]} like the rest of {self.folder}")
        return array.reshape(self.shape)


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(H, W) and mode from the file's header, without decoding its pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except _IMAGE_ERRORS as exc:
        raise DataError(f"image file {path} cannot be read ({exc})") from exc
    if mode in _DEEP_MODES:
        raise DataError(f"image file {path} has {mode} pixels; only 8-bit gray or colour images are supported")
    return (height, width), mode


def _list_images(folder: Path) -> tuple[list[Path], np.ndarray | None, tuple[str, ...] | None]:
    """Images directly in ``folder`` (no labels), or in one subfolder per class."""
    subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    # Subfolders without images (e.g. a thumbnails cache left empty) are not classes.
    classes = [(d, files) for d in subdirs if (files := _image_files(d, recursive=True))]
    loose = _image_files(folder, recursive=False)
    if not classes:
        if not loose:
            raise DataError(f"folder {folder} is empty: it holds no png/jpg/jpeg/bmp images or known data files")
        return loose, None, None
    if loose:
        raise DataError(f"image folder {folder} mixes loose images (e.g. {loose[0].name}) with class subfolders")
    files = [f for _, class_files in classes for f in class_files]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(fs) for _, fs in classes])
    return files, labels, tuple(d.name for d, _ in classes)


def _image_files(folder: Path, *, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize every image of a uint8 NHWC array with Pillow (bicubic, antialiased)."""
    height, width = size
    out = np.empty((len(images), height, width, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out[i] = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC)).reshape(height, width, -1)
    return out
