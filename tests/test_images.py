"""Tests for vdvae_latents.data.grids: uint8 conversion, grid layout, PNG writing and labelled figures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_latents.data import to_model_input
from vdvae_latents.core.errors import UserError
from vdvae_latents.data.grids import GRID_BOX_KEY, MIN_TILE_PIXELS, PAD_VALUE, make_grid, read_grid, save_grid, to_uint8


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------------ to_uint8


@pytest.mark.parametrize("n_bits", [1, 3, 5, 8])
def test_to_uint8_maps_grid_levels_and_round_trips(n_bits: int) -> None:
    levels = 2**n_bits - 1
    k = np.arange(levels + 1)
    # The grid values exactly as the data pipeline produces them (k in the top n bits).
    x = to_model_input((k << (8 - n_bits)).astype(np.uint8).reshape(1, 1, -1, 1), n_bits=n_bits)
    assert np.allclose(x.numpy().ravel(), 2.0 * k / levels - 1.0, rtol=0, atol=1e-6)
    pixels = to_uint8(x, n_bits=n_bits)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 1, levels + 1, 1)
    np.testing.assert_array_equal(pixels.ravel(), np.rint(k * 255 / levels).astype(np.uint8))
    assert pixels.ravel()[0] == 0 and pixels.ravel()[-1] == 255
    # Back through the data pipeline: the same grid values.
    assert torch.equal(to_model_input(pixels, n_bits=n_bits), x)


def test_to_uint8_8bit_formula_layout_and_clipping() -> None:
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    expected = ((x.double() + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(to_uint8(x), expected)
    # Out-of-range values (a sampler overshooting) clip to the extreme pixels; (C, H, W) is one image.
    np.testing.assert_array_equal(to_uint8(torch.tensor([[[-3.0, 1.7]]])), [[[[0], [255]]]])
    with pytest.raises(ValueError, match="n_bits"):
        to_uint8(x, n_bits=9)


# ----------------------------------------------------------------------- make_grid


def test_make_grid_shape_tiles_and_padding_closed_form() -> None:
    n, h, w, c, ncols, pad, scale = 7, 3, 4, 1, 3, 2, 2
    images = random_uint8((n, h, w, c))
    grid = make_grid(images, ncols=ncols, pad=pad, scale=scale)
    th, tw, nrows = h * scale, w * scale, 3
    assert grid.dtype == np.uint8
    assert grid.shape == (nrows * (th + pad) + pad, ncols * (tw + pad) + pad, c)

    covered = np.zeros(grid.shape[:2], dtype=bool)
    for i in range(n):
        row, col = divmod(i, ncols)
        top, left = pad + row * (th + pad), pad + col * (tw + pad)
        tile = grid[top:top + th, left:left + tw]
        np.testing.assert_array_equal(tile, np.kron(images[i, ..., 0], np.ones((scale, scale), np.uint8))[..., None])
        covered[top:top + th, left:left + tw] = True
    # Everything outside the 7 tiles, including the 2 empty cells, is the pad gray.
    assert (grid[~covered] == PAD_VALUE).all()


def test_make_grid_defaults_and_rgb() -> None:
    images = random_uint8((5, 2, 2, 3))
    grid = make_grid(images)  # ncols = ceil(sqrt(5)) = 3, 2 rows, pad 2
    assert grid.shape == (2 * (2 + 2) + 2, 3 * (2 + 2) + 2, 3)
    # pad=0: a plain concatenation of the tiles.
    flat = make_grid(images[:4], ncols=2, pad=0)
    top = np.concatenate([images[0], images[1]], axis=1)
    bottom = np.concatenate([images[2], images[3]], axis=1)
    np.testing.assert_array_equal(flat, np.concatenate([top, bottom], axis=0))
    # (N, H, W) is grayscale.
    assert make_grid(random_uint8((2, 3, 3)), ncols=2, pad=1).shape == (5, 9, 1)
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.astype(np.float32))
    with pytest.raises(ValueError, match="scale"):
        make_grid(images, scale=0)


# ----------------------------------------------------------------------- save_grid


def test_save_grid_grayscale_png_auto_scale(tmp_path: Path) -> None:
    images = random_uint8((6, 8, 8, 1))
    out = save_grid(tmp_path / "grid.png", images)
    assert out == tmp_path / "grid.png"
    scale = MIN_TILE_PIXELS // 8  # 8x8 digits become 32x32 tiles
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (3 * (8 * scale + 2) + 2, 2 * (8 * scale + 2) + 2)  # (W, H)
        np.testing.assert_array_equal(np.asarray(img), make_grid(images, scale=scale)[..., 0])
    assert os.listdir(tmp_path) == ["grid.png"]  # no temporary file left behind


def test_save_grid_rgb_from_tensors(tmp_path: Path) -> None:
    model_scale = torch.rand(4, 3, 40, 40) * 2 - 1  # >= 32 px: no upscaling by default
    with Image.open(save_grid(tmp_path / "rgb.png", model_scale, ncols=4)) as img:
        assert img.mode == "RGB" and img.size == (4 * 42 + 2, 42 + 2)
        np.testing.assert_array_equal(np.asarray(img), make_grid(to_uint8(model_scale), ncols=4))
    # A uint8 tensor is taken as NCHW pixels; an explicit scale wins over the automatic one.
    pixels = torch.from_numpy(random_uint8((2, 1, 8, 8)))
    with Image.open(save_grid(tmp_path / "u8.png", pixels, scale=1)) as img:
        assert img.mode == "L" and img.size == (2 * 10 + 2, 12)
        np.testing.assert_array_equal(np.asarray(img), make_grid(pixels.permute(0, 2, 3, 1).numpy())[..., 0])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_labelled_grid_keeps_the_grid_exactly_and_adds_title_and_row_labels(tmp_path: Path, channels) -> None:
    images = random_uint8((12, 8, 8, channels))
    raw = make_grid(images, ncols=6, scale=4)
    raw = raw[..., 0] if channels == 1 else raw
    out = save_grid(tmp_path / "fig.png", images, ncols=6, title="digits:test, rows 0-11: originals above "
                    "their decodings from 78 of 2,592 latent scalars", row_labels=["original", "decoded from 78"])
    np.testing.assert_array_equal(read_grid(out), raw)  # the unlabelled grid, pixel for pixel
    with Image.open(out) as img:
        assert img.mode == ("L" if channels == 1 else "RGB")
        figure = np.asarray(img).astype(int)
        left, top, _, _ = (int(v) for v in img.text[GRID_BOX_KEY].split(","))
    assert figure.shape[0] > raw.shape[0] + 20 and figure.shape[1] > raw.shape[1] + 60  # title above, labels left
    # Text is drawn in the margins: dark pixels above the grid (the title) and left of it (the labels).
    assert figure[:top].min() < 100 and figure[top:, :left].min() < 100
    # Without a title or labels the PNG is the grid alone, as before.
    plain = save_grid(tmp_path / "plain.png", images, ncols=6, scale=4)
    np.testing.assert_array_equal(np.asarray(Image.open(plain)), raw)
    np.testing.assert_array_equal(read_grid(plain), raw)


def test_row_labels_must_match_the_grid_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one label per grid row"):
        save_grid(tmp_path / "fig.png", random_uint8((12, 8, 8, 1)), ncols=6, row_labels=["only one"])


def test_save_grid_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    save_grid(target, random_uint8((1, 8, 8, 1)))
    with Image.open(target) as img:
        assert img.size == (36, 36)
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_save_grid_bad_destinations_raise_user_error(tmp_path: Path) -> None:
    images = random_uint8((1, 8, 8, 1))
    missing = tmp_path / "no" / "such" / "grid.png"
    with pytest.raises(UserError) as exc:
        save_grid(missing, images)
    assert str(missing) in str(exc.value) and "does not exist" in str(exc.value)

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        save_grid(a_file / "grid.png", images)

    a_dir = tmp_path / "dir.png"
    a_dir.mkdir()
    with pytest.raises(UserError, match="is a folder"):
        save_grid(a_dir, images)
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "file.txt"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_save_grid_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="ro"):
            save_grid(folder / "grid.png", random_uint8((1, 8, 8, 1)))
    finally:
        folder.chmod(0o700)


def test_save_grid_permission_denied_is_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only folder does for a non-root user, simulated so it also runs as root."""

    def denied(path, flags, mode=0o777, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match="Permission denied") as exc:
        save_grid(tmp_path / "grid.png", random_uint8((1, 8, 8, 1)))
    monkeypatch.undo()
    message = str(exc.value)
    assert str(tmp_path / "grid.png") in message and message.endswith(".") and message.count(". ") == 0
    assert os.listdir(tmp_path) == []


def test_save_grid_failed_write_leaves_target_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "grid.png"
    target.write_bytes(b"previous")

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device") as exc:
        save_grid(target, random_uint8((1, 8, 8, 1)))
    assert str(target) in str(exc.value)
    assert target.read_bytes() == b"previous"  # the old file was never touched
    assert os.listdir(tmp_path) == ["grid.png"]
