"""datasets/digits.py: scikit-learn's digits written as a labelled image folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.data.digits import write_digits
from guided_diffusion.image_datasets import class_labels_from_paths, list_image_files_recursively

sklearn_datasets = pytest.importorskip("sklearn.datasets")

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_nearest_upscale_keeps_the_digits_pixels(tmp_path):
    out = write_digits(str(tmp_path), image_size=16, limit=30, resample="nearest")
    assert out == str(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 30
    assert all(re.fullmatch(r"\d_\d{4}\.png", n) for n in names)

    digits = sklearn_datasets.load_digits()
    for index in (0, 7, 29):
        label = int(digits.target[index])
        with Image.open(tmp_path / f"{label}_{index:04d}.png") as image:
            assert image.mode == "RGB" and image.size == (16, 16)
            pixels = np.array(image)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        # Each source pixel v in 0..16 becomes a 2x2 block of round(v * 255 / 16).
        want = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(pixels[::2, ::2, 0], want)
        np.testing.assert_array_equal(pixels[1::2, 1::2, 0], want)


def test_labels_become_classes_in_numeric_order(tmp_path):
    write_digits(str(tmp_path), image_size=8, limit=40)
    paths = list_image_files_recursively(str(tmp_path))
    labels, names = class_labels_from_paths(paths)
    assert names == [str(k) for k in range(10)]
    digits = sklearn_datasets.load_digits()
    indices = [int(os.path.basename(p).split("_")[1].split(".")[0]) for p in paths]
    assert labels == [int(digits.target[i]) for i in indices]


def test_command_line_writes_everything_and_rejects_bad_sizes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = str(REPO_ROOT / "datasets" / "digits.py")
    ok = subprocess.run(
        [sys.executable, script, "--out_dir", str(tmp_path / "all"), "--image_size", "8"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(os.listdir(tmp_path / "all")) == 1797
    assert len({n.split("_")[0] for n in os.listdir(tmp_path / "all")}) == 10

    bad = subprocess.run(
        [sys.executable, script, "--out_dir", str(tmp_path / "bad"), "--image_size", "4"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "image_size" in bad.stderr
