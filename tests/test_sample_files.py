"""Sample files: the uint8 conversion, the npz layout and a decodable PNG grid."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.sampling.files import make_grid_png, save_samples, to_uint8


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


def test_save_samples_with_labels_writes_npz_and_png_grid(tmp_path):
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
        # ceil(sqrt(5)) = 3 per row, 2 rows, 2-pixel padding: 3*10+2 wide, 2*10+2 high.
        assert grid.size == (32, 22)
        pixels = np.array(grid)
    np.testing.assert_array_equal(pixels[2:10, 2:10], images[0])
    np.testing.assert_array_equal(pixels[12:20, 12:20], images[4])  # row 1, column 1
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
        assert grid.size == (2 * 12 + 2, 2 * 8 + 2)


def test_grid_shows_at_most_64_samples(tmp_path):
    save_samples(random_images(70, h=4, w=4), None, tmp_path)
    with Image.open(tmp_path / "samples_70x4x4x3.png") as grid:
        assert grid.size == (8 * 6 + 2, 8 * 6 + 2)


def test_make_grid_png_grey_and_nrow(tmp_path):
    images = random_images(3, h=5, w=7, c=1)
    out = make_grid_png(images, str(tmp_path / "g.png"), nrow=2, padding=1)
    with Image.open(out) as grid:
        assert grid.mode == "L" and grid.size == (2 * 8 + 1, 2 * 6 + 1)
        pixels = np.array(grid)
    np.testing.assert_array_equal(pixels[7:12, 1:8], images[2, :, :, 0])


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_samples(np.zeros((2, 4, 4, 3), dtype=np.float32), None, tmp_path)
    with pytest.raises(ValueError, match="N, H, W, C"):
        save_samples(np.zeros((2, 3, 8, 8), dtype=np.uint8), None, tmp_path)  # NCHW by mistake
    with pytest.raises(ValueError, match="one per image"):
        save_samples(random_images(2), [1, 2, 3], tmp_path)
