"""Turning model outputs into viewable images: uint8 conversion, tiled grids, PNG files.

The model works on [-1, 1] values on a 2**n_bits-level grid (see
:func:`vdvae_latents.data.to_model_input`); :func:`to_uint8` maps them back to
0..255 pixels, :func:`make_grid` tiles a batch into one picture and :func:`save_grid`
writes it as a PNG. Given a title or row labels, :func:`save_grid` writes a labelled
figure instead: the grid's pixels unchanged, with the title above and a label beside each
row, and the grid's place in the figure recorded in the PNG, so :func:`read_grid` gets the
unlabelled grid back exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..core.atomic import atomic_file
from ..core.errors import UserError

__all__ = ["to_uint8", "make_grid", "save_grid", "read_grid", "PAD_VALUE", "MIN_TILE_PIXELS", "GRID_BOX_KEY"]

PAD_VALUE = 128  # mid gray: visible against both black and white backgrounds of the images
MIN_TILE_PIXELS = 32  # save_grid upscales smaller images (8x8 digits are unreadable otherwise)
GRID_BOX_KEY = "vdvl-grid-box"  # PNG text chunk of a labelled figure: "left,top,width,height" of its grid


def to_uint8(x: torch.Tensor | np.ndarray, n_bits: int = 8) -> np.ndarray:
    """Model-scale images in [-1, 1], (N, C, H, W) or (C, H, W), -> uint8 (N, H, W, C).

    Values are first snapped to the model's 2**n_bits-level grid (level
    ``k = round((x + 1) / 2 * (2**n_bits - 1))``, clipped) and level k becomes pixel
    ``round(k * 255 / (2**n_bits - 1))``, so that 0 and 255 are the extreme levels
    whatever the bit depth. For 8 bits this is ``round((x + 1) / 2 * 255)``. Feeding
    the result back through ``to_model_input(..., n_bits)`` gives the same levels.
    """
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be between 1 and 8, got {n_bits}")
    t = torch.as_tensor(x).detach()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(t.shape)}")
    # float64 so that grid values land exactly on their level before rounding.
    v = t.to("cpu", torch.float64).numpy()
    levels = 2**n_bits - 1
    k = np.clip(np.rint((v + 1.0) / 2.0 * levels), 0, levels)
    pixels = np.rint(k * (255.0 / levels)).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def make_grid(images_uint8_nhwc: np.ndarray, ncols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) (or (N, H, W)) into one (H', W', C) uint8 array.

    Tiles are laid out row by row, ``ncols`` per row (default ``ceil(sqrt(N))``, a
    near-square grid), each upscaled ``scale`` times by pixel repetition (nearest
    neighbour: it keeps pixels sharp and adds no values that were not in the image).
    ``pad`` pixels of mid gray separate the tiles and frame the grid, so

        H' = rows * (H * scale + pad) + pad,   W' = ncols * (W * scale + pad) + pad.

    Cells past the last image stay gray.
    """
    images = np.asarray(images_uint8_nhwc)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} of shape {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if ncols < 1 or pad < 0 or scale < 1:
        raise ValueError(f"need ncols >= 1, pad >= 0 and scale >= 1, got ncols={ncols}, pad={pad}, scale={scale}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = h * scale, w * scale
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (th + pad) + pad, ncols * (tw + pad) + pad, c), PAD_VALUE, dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, ncols)
        top, left = pad + row * (th + pad), pad + col * (tw + pad)
        grid[top:top + th, left:left + tw] = images[i]
    return grid


def save_grid(
    path: str | os.PathLike,
    images: np.ndarray | torch.Tensor,
    ncols: int | None = None,
    scale: int | None = None,
    *,
    pad: int = 2,
    title: str | None = None,
    row_labels: list[str] | None = None,
) -> Path:
    """Write ``images`` as one PNG grid at ``path`` and return the path.

    ``images`` is a uint8 array (N, H, W, C), a uint8 tensor (N, C, H, W), or a float
    tensor in model scale [-1, 1] (N, C, H, W), converted by :func:`to_uint8`. With
    ``scale=None`` small images are upscaled so that each tile is at least
    ``MIN_TILE_PIXELS`` pixels on its shorter side. Grayscale grids are written as
    mode ``L``, colour ones as ``RGB``; the file is PNG whatever its suffix.

    With ``title`` (what the images are and which data) or ``row_labels`` (one per grid
    row, e.g. "original" / "decoded"), the PNG is a labelled figure: the grid, pixel for
    pixel, on a white canvas with the title above it and each label left of its row. The
    PNG's text chunk :data:`GRID_BOX_KEY` records where the grid sits; :func:`read_grid`
    returns it.

    The PNG is written to a temporary file in the destination folder and moved into
    place with :func:`os.replace`, so a reader never sees a half-written file and an
    existing file is only replaced by a complete one. A destination that cannot be
    written raises :class:`~vdvae_latents.core.errors.UserError` naming it.
    """
    array = _as_uint8_nhwc(images)
    n, h, w, c = array.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    if scale is None:
        scale = max(1, math.ceil(MIN_TILE_PIXELS / min(h, w)))
    grid = make_grid(array, ncols=ncols, pad=pad, scale=scale)
    # A 2-d uint8 array becomes mode "L", (H, W, 3) uint8 becomes "RGB".
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    info = None
    if title or row_labels:
        n_rows = math.ceil(n / (ncols or math.ceil(math.sqrt(n))))
        if row_labels is not None and len(row_labels) != n_rows:
            raise ValueError(f"row_labels needs one label per grid row ({n_rows}), got {len(row_labels)}")
        picture, box = label_grid(picture, cell_height=h * scale, pad=pad, title=title, row_labels=row_labels)
        info = PngInfo()
        info.add_text(GRID_BOX_KEY, ",".join(map(str, box)))

    path = Path(path).expanduser()
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"cannot write image grid {path}: the folder {folder} {what}.")
    if path.is_dir():
        raise UserError(f"cannot write image grid {path}: it is a folder.")
    with atomic_file(path, what="image grid") as f:
        picture.save(f, format="PNG", pnginfo=info)
    return path


def read_grid(path: str | os.PathLike) -> np.ndarray:
    """The image grid of a PNG written by :func:`save_grid`, without its title and labels.

    (H, W) for grayscale, (H, W, 3) for colour: exactly the pixels of the unlabelled grid.
    A PNG without a recorded grid box (an unlabelled grid, or any other image) is returned whole.
    """
    with Image.open(path) as picture:
        box = getattr(picture, "text", {}).get(GRID_BOX_KEY)
        pixels = np.asarray(picture)
    if box is None:
        return pixels
    left, top, width, height = (int(v) for v in box.split(","))
    return pixels[top:top + height, left:left + width]


# ----------------------------------------------------------------------------- labelled figures
MARGIN = 8  # pixels between the canvas edge, the title, the labels and the grid
INK = 32  # near-black text on white, in both L and RGB figures
TITLE_WIDTH = 460  # pixels a title may take beside a grid narrower than that


def label_grid(grid: Image.Image, *, cell_height: int, pad: int, title: str | None = None,
               row_labels: list[str] | None = None) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``grid`` (a :func:`make_grid` picture with rows ``cell_height`` pixels tall) on a white
    canvas, ``title`` wrapped above it and each of ``row_labels`` right-aligned beside its row.

    Returns the figure and the grid's box (left, top, width, height) in it. The grid is pasted,
    never resampled, so the box holds its exact pixels. Text scales with the tiles (at least
    14 px) so that labels stay legible next to large images.
    """
    size = max(14, min(28, cell_height // 6))
    font = _font(size)
    measure = ImageDraw.Draw(Image.new(grid.mode, (1, 1)))
    label_width = max((measure.textlength(t, font=font) for t in row_labels or []), default=0)
    label_column = math.ceil(label_width) + MARGIN if row_labels else 0
    # The title may be as wide as the labelled grid, or TITLE_WIDTH for small grids (fewer lines).
    width = MARGIN + label_column + grid.width + MARGIN
    lines = _wrap(title or "", font, max(width - 2 * MARGIN, TITLE_WIDTH), measure)
    line_height = size + size // 3
    width = max(width, MARGIN + max((math.ceil(measure.textlength(t, font=font)) for t in lines), default=0) + MARGIN)
    top = MARGIN + (len(lines) * line_height + MARGIN if lines else 0)
    left = MARGIN + label_column
    canvas = Image.new(grid.mode, (width, top + grid.height + MARGIN), _white(grid.mode))
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    ink = INK if grid.mode == "L" else (INK, INK, INK)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * line_height), line, font=font, fill=ink)
    for row, text in enumerate(row_labels or []):
        # Right-aligned, centred on the row (by the text's box: bitmap fonts take no anchor).
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        middle = top + pad + row * (cell_height + pad) + cell_height / 2
        draw.text((left - MARGIN - x1, middle - (y0 + y1) / 2), text, font=font, fill=ink)
    return canvas, (left, top, grid.width, grid.height)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (no system font needed); its bitmap font on builds without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed 11 px bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, max_width: float, draw: ImageDraw.ImageDraw) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``max_width`` pixels (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _white(mode: str) -> int | tuple[int, int, int]:
    return 255 if mode == "L" else (255, 255, 255)


def _as_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Normalise the accepted image inputs of :func:`save_grid` to a uint8 NHWC array."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            t = images.detach().cpu()
            t = t.unsqueeze(0) if t.ndim == 3 else t
            if t.ndim != 4:
                raise ValueError(f"expected a uint8 tensor (N, C, H, W), got shape {tuple(t.shape)}")
            return np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))
        return to_uint8(images)
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels in the array, got {array.dtype} (pass model-scale data as a tensor)")
    if array.ndim == 3:  # (N, H, W) grayscale
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"expected a uint8 array (N, H, W, C), got shape {array.shape}")
    return array
