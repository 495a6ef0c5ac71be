"""Figures a reader understands at a glance: the probe figure's names never collide and its
accuracy axis shows the differences; the decode figure pairs originals with decodings and
says so, and still shows the decodings when the store's data is gone.

(The image grids' pixels are checked in test_images.py, the decode figure's decoded pixels in
test_encode.py, the first-K figure in test_cli_run.py and kl.png in test_cli_analyze.py.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from vdvae_latents.data.grids import GRID_BOX_KEY, read_grid
from vdvae_latents.downstream.figures import format_bytes, probe_figure

# The quickstart's probe (README): four feature sets within 0.01 of each other, far above chance.
QUICKSTART_PROBE = {
    "model": "logreg", "store": "quickstart-out/train.zarr", "test_store": "quickstart-out/test.zarr",
    "n_train": 1437, "n_test": 180, "seeds": 3, "chance_accuracy": 0.078,
    "rows": [
        {"name": "active", "features": 78, "bytes_per_image": 156, "disk_bytes_per_image": 153.0,
         "test_accuracy": 0.972, "test_accuracy_std": 0.0, "test_accuracies": [0.972, 0.972, 0.972]},
        {"name": "pixels", "features": 64, "bytes_per_image": 64, "test_accuracy": 0.967,
         "test_accuracy_std": 0.0, "test_accuracies": [0.967, 0.967, 0.967]},
        {"name": "random", "features": 78, "bytes_per_image": 312, "test_accuracy": 0.970,
         "test_accuracy_std": 0.012, "test_accuracies": [0.961, 0.967, 0.983]},
        {"name": "pca", "features": 64, "bytes_per_image": 256, "test_accuracy": 0.965,
         "test_accuracy_std": 0.003, "test_accuracies": [0.961, 0.967, 0.967]},
    ],
}


def overlapping(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_the_probe_figure_names_every_feature_set_apart_on_an_axis_zoomed_to_the_accuracies():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = probe_figure(QUICKSTART_PROBE)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the figure out as saving it does
    renderer = canvas.get_renderer()
    accuracy, size = fig.axes
    names = {label.get_text(): label.get_position()[1] for label in accuracy.get_yticklabels()}
    top_down = sorted(names, key=names.get, reverse=True)  # the report's order, the store on top
    assert top_down == ["active (78 features)", "pixels (64 features)", "random (78 features)", "pca (64 features)"]
    # No two texts of the figure overlap: names, value labels, titles, tick labels.
    texts = [t for ax in fig.axes for t in ax.texts + ax.get_yticklabels() + [ax.title]]
    assert not overlapping([t.get_window_extent(renderer) for t in texts if t.get_text() and t.get_visible()])
    # The accuracy axis spans the values (0.961 .. 0.983), not 0..1; chance is stated, not drawn.
    low, high = accuracy.get_xlim()
    assert 0.95 < low < 0.961 and 0.983 < high < 0.995
    assert "majority class 0.078" in accuracy.get_title()
    assert not any(0.078 in np.asarray(line.get_xdata()) for line in accuracy.get_lines())
    # Sizes in bytes with their unit, the store's on-disk size beside its in-memory one.
    assert [t.get_text() for t in size.texts] == ["156 B (on disk: 153 B)", "64 B", "312 B", "256 B"]
    assert "bytes per image" in size.get_xlabel()


@pytest.mark.parametrize("n, text", [(64, "64 B"), (1224, "1.22 kB"), (81_600, "81.6 kB"), (2.2e9, "2.2 GB")])
def test_bytes_are_written_with_their_unit(n, text):
    assert format_bytes(n) == text


def test_the_decode_figure_pairs_originals_with_decodings_and_keeps_the_decodings_when_the_data_is_gone(
        tiny_digits_run, tmp_path):
    from vdvae_latents.data import load_images
    from vdvae_latents.stores.decode import decode_store
    from vdvae_latents.stores.encode import encode_to_store

    digits = load_images("digits", split="all")
    data = tmp_path / "digits100.npz"
    np.savez(data, images=digits.images[:100], labels=digits.labels[:100])  # test split: 10 images
    store = tmp_path / "test.zarr"
    encode_to_store(tiny_digits_run, str(data), store, split="test", keep="10%", granularity="element",
                    kl_limit=32, device="cpu")
    decode_store(store, tmp_path / "with.png", rows="0:10", device="cpu")
    data.unlink()
    decode_store(store, tmp_path / "without.png", rows="0:10", device="cpu")

    tile = 8 * 4 + 2  # 8x8 digits shown at 32 px, 2 px apart
    with_data, without = read_grid(tmp_path / "with.png"), read_grid(tmp_path / "without.png")
    assert with_data.shape == (4 * tile + 2, 8 * tile + 2)  # 10 images, 8 a row: originals, decodings, twice
    assert without.shape == (2 * tile + 2, 8 * tile + 2)  # the decodings alone
    np.testing.assert_array_equal(without[:tile], with_data[tile:2 * tile])  # the same decodings
    with Image.open(tmp_path / "without.png") as img:
        assert GRID_BOX_KEY in img.text and img.height > without.shape[0]
