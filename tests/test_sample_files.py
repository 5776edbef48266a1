"""Sample files: the uint8 conversion, the npz layout and a decodable PNG grid."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.sampling.files import (
    GRID_MAX_CLASSES,
    class_grid,
    grid_scale,
    make_grid_png,
    save_samples,
    to_uint8,
)


def test_to_uint8_values_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0, 0.999]).reshape(1, 1, 2, 3).repeat(1, 3, 1, 1)
    x[:, 1] = 0.5  # a different value per channel shows the channel axis moved last
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 2, 3, 3)
    # (v + 1) * 127.5 clamped, then truncated: 0, 127.5->127, 255, clamp 0, clamp 255, 254.87->254
    assert out[0, :, :, 0].flatten().tolist() == [0, 127, 255, 0, 255, 254]
    assert out[0, :, :, 1].flatten().tolist() == [191] * 6  # 1.5 * 127.5 = 191.25


def random_images(n, h=8, w=8, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(n, h, w, c), dtype=np.uint8)


def tile(grid, row, col, h, w, scale, pad=2):
    """The image at (row, col) of a grid of h x w images magnified by scale, back at 1x."""
    top, left = pad + row * (h * scale + pad), pad + col * (w * scale + pad)
    return grid[top : top + h * scale : scale, left : left + w * scale : scale]


def test_save_samples_with_labels_writes_npz_and_a_grid_of_one_row_per_class(tmp_path):
    images = random_images(5)
    labels = [3, 1, 4, 1, 5]
    path = save_samples(images, labels, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "samples_5x8x8x3.npz")
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_0"], images)
        assert data["arr_1"].dtype == np.int64
        assert data["arr_1"].tolist() == labels

    png = tmp_path / "out" / "samples_5x8x8x3.png"
    with Image.open(png) as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        # Classes 1, 3, 4, 5: four rows of two (class 1 has two samples), each 8x8 image
        # magnified 16x so the narrow side passes 256: 2 * (128 + 2) + 2 = 262 wide.
        assert grid.size == (262, 4 * 130 + 2)
        pixels = np.array(grid)
    np.testing.assert_array_equal(tile(pixels, 0, 0, 8, 8, 16), images[1])  # class 1, in order
    np.testing.assert_array_equal(tile(pixels, 0, 1, 8, 8, 16), images[3])
    np.testing.assert_array_equal(tile(pixels, 1, 0, 8, 8, 16), images[0])  # class 3
    assert (tile(pixels, 1, 1, 8, 8, 16) == 0).all()  # class 3 has one sample: a blank tile
    np.testing.assert_array_equal(tile(pixels, 3, 0, 8, 8, 16), images[4])  # class 5
    # Every magnified pixel is a 16x16 block of one value (nearest neighbour).
    block = pixels[2:18, 2:18]
    assert (block == block[0, 0]).all()
    assert (pixels[0:2] == 0).all()
    # No temporary files left behind.
    assert sorted(os.listdir(tmp_path / "out")) == ["samples_5x8x8x3.npz", "samples_5x8x8x3.png"]


def test_save_samples_without_labels_and_from_tensors(tmp_path):
    images = torch.from_numpy(random_images(4, h=6, w=10))
    path = save_samples(images, None, tmp_path)
    assert os.path.basename(path) == "samples_4x6x10x3.npz"
    with np.load(path) as data:
        assert data.files == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], images.numpy())
    with Image.open(tmp_path / "samples_4x6x10x3.png") as grid:
        # 2 x 2 images; 21x makes the height 2 * (126 + 2) + 2 = 258 >= 256.
        assert grid_scale(6, 10, 2, 2, 2) == 21
        assert grid.size == (2 * (210 + 2) + 2, 258)
        np.testing.assert_array_equal(tile(np.array(grid), 1, 1, 6, 10, 21), images[3].numpy())


def test_grid_shows_at_most_64_samples(tmp_path):
    save_samples(random_images(70, h=4, w=4), None, tmp_path)
    with Image.open(tmp_path / "samples_70x4x4x3.png") as grid:
        assert grid.size == (8 * (4 * 8 + 2) + 2,) * 2 and min(grid.size) >= 256


def test_make_grid_png_grey_nrow_and_native_size(tmp_path):
    images = random_images(3, h=5, w=7, c=1)
    out = make_grid_png(images, str(tmp_path / "g.png"), nrow=2, padding=1, min_side=0)
    with Image.open(out) as grid:
        assert grid.mode == "L" and grid.size == (2 * 8 + 1, 2 * 6 + 1)
        pixels = np.array(grid)
    np.testing.assert_array_equal(pixels[7:12, 1:8], images[2, :, :, 0])
    with Image.open(make_grid_png(images, str(tmp_path / "big.png"), nrow=2)) as grid:
        assert min(grid.size) >= 256 and grid.mode == "L"


def test_a_long_row_is_not_stretched_past_the_cap(tmp_path):
    # One row of 40 images: 32x would make it 256 high but 10322 wide; the cap keeps 6x.
    with Image.open(make_grid_png(random_images(40), str(tmp_path / "row.png"), nrow=40)) as grid:
        assert grid.size == (40 * (48 + 2) + 2, 48 + 4)
    assert grid_scale(8, 8, 1, 40, 2) == 6
    assert grid_scale(64, 64, 8, 8, 2) == 1  # large grids stay as they are


def test_class_grid_rows_order_and_limits():
    images = random_images(30, h=2, w=2)
    labels = np.array([7, 2] * 15)
    tiles, per_row = class_grid(images, labels, per_class=3)
    assert per_row == 3 and tiles.shape == (6, 2, 2, 3)
    np.testing.assert_array_equal(tiles[:3], images[[1, 3, 5]])  # class 2 first, in order
    np.testing.assert_array_equal(tiles[3:], images[[0, 2, 4]])
    # Without per_class the rows share max_images; at most GRID_MAX_CLASSES rows.
    _, per_row = class_grid(images, labels, max_images=8)
    assert per_row == 4
    many = random_images(2000, h=1, w=1)
    tiles, per_row = class_grid(many, np.arange(2000) % 1000)
    assert len(tiles) == GRID_MAX_CLASSES * per_row and per_row == 2
    with pytest.raises(ValueError, match="one per image"):
        class_grid(images, labels[:3])


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_samples(np.zeros((2, 4, 4, 3), dtype=np.float32), None, tmp_path)
    with pytest.raises(ValueError, match="N, H, W, C"):
        save_samples(np.zeros((2, 3, 8, 8), dtype=np.uint8), None, tmp_path)  # NCHW by mistake
    with pytest.raises(ValueError, match="one per image"):
        save_samples(random_images(2), [1, 2, 3], tmp_path)
