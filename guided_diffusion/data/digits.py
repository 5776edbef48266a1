"""
Write scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes) as an image
folder that load_data reads, named "<label>_<index>.png" so class_cond training works.

The data ships inside scikit-learn, so this needs no network. Pixels (0..16, 16 = ink) are scaled
to 0..255 (white digits on black) and upscaled to --image_size with PIL's bicubic filter (smooth
strokes; --resample nearest keeps the 8x8 blocks). Images are saved as RGB. Class names "0".."9"
sort as strings in the same order as numbers, so label k gets class index k.

    python datasets/digits.py --out_dir data/digits --image_size 32

(The command line is datasets/digits.py's; this module is what it and the tests call.)
"""

import os

import numpy as np
from PIL import Image

RESAMPLE_FILTERS = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def write_digits(out_dir, image_size=32, limit=None, resample="bicubic"):
    """
    Save the digits as RGB PNGs "<label>_<index:04d>.png" in out_dir.

    :param out_dir: the folder to write (created if missing).
    :param image_size: side of the square output images, at least 8.
    :param limit: write only the first `limit` images (None: all 1797).
    :param resample: "bicubic" or "nearest", the upscaling filter.
    :return: out_dir.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (the digits are 8x8), got {image_size}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")

    images, labels = digits_arrays(image_size, limit=limit, resample=resample)
    os.makedirs(out_dir, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).convert("RGB").save(
            os.path.join(out_dir, f"{int(label)}_{index:04d}.png")
        )
    return out_dir


def digits_arrays(image_size=32, limit=None, resample="bicubic"):
    """
    The digits exactly as write_digits saves them (before the RGB conversion, which copies the
    grey value into all three channels), for code that wants them in memory, e.g. to train an
    evaluation classifier on real digits.

    :param image_size: side of the square output images, at least 8.
    :param limit: only the first `limit` images (None: all 1797).
    :param resample: "bicubic" or "nearest", the upscaling filter.
    :return: (uint8 array [N, image_size, image_size] of grey values, int64 array [N] of labels).
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (the digits are 8x8), got {image_size}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn") from None

    digits = load_digits()
    images, labels = digits.images, digits.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = np.empty((len(images), image_size, image_size), dtype=np.uint8)
    for index, image in enumerate(images):
        grey = np.clip(np.round(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        out[index] = np.asarray(
            Image.fromarray(grey).resize((image_size, image_size), resample=RESAMPLE_FILTERS[resample])
        )
    return out, np.asarray(labels, dtype=np.int64)
