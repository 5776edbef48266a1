"""
Writing generated images: the reference's samples_NxHxWxC.npz plus a PNG grid to look at.
"""

import math
import os

import numpy as np
import torch
from PIL import Image

from .checkpoints import atomic_write

# A grid of every sample of a 50k-image run would be gigapixels; show the first ones only.
DEFAULT_GRID_MAX_IMAGES = 64


def to_uint8(x):
    """
    Map model outputs in [-1, 1] (float NCHW tensor) to uint8 NHWC, exactly as the reference
    sampling scripts do: ((x + 1) * 127.5) clamped to [0, 255] and truncated.
    """
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _as_uint8_nhwc(images):
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (use to_uint8 first), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected images of shape (N, H, W, C) with C in 1, 3, 4, got {images.shape}"
        )
    return images


def make_grid_png(images_uint8_nhwc, path, nrow=None, padding=2, pad_value=0):
    """
    Save images side by side as one PNG, nrow per row, separated by padding pixels.

    :param images_uint8_nhwc: uint8 array or tensor (N, H, W, C), C in 1, 3 or 4.
    :param path: the PNG file to write.
    :param nrow: images per row (default: ceil(sqrt(N)), a near-square grid).
    :param padding: pixels between and around the images.
    :param pad_value: grey level of the padding (0 = black).
    :return: path.
    """
    images = _as_uint8_nhwc(images_uint8_nhwc)
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("cannot make a grid of zero images")
    if nrow is None:
        nrow = math.ceil(math.sqrt(count))
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    ncol = min(nrow, count)
    nrows = math.ceil(count / nrow)
    grid = np.full(
        (nrows * (height + padding) + padding, ncol * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for i, image in enumerate(images):
        top = padding + (i // nrow) * (height + padding)
        left = padding + (i % nrow) * (width + padding)
        grid[top : top + height, left : left + width] = image
    if channels == 1:
        grid = grid[..., 0]
    Image.fromarray(grid).save(path, format="PNG")
    return path


def save_images_npz(path, images_uint8_nhwc, labels_or_None=None):
    """
    Save images as an npz in the samples format (arr_0: uint8 NHWC images, arr_1: int64 labels
    when given), written to a temporary file and renamed, so readers never see a partial file.

    :return: path.
    """
    images = _as_uint8_nhwc(images_uint8_nhwc)
    arrays = [images]
    if labels_or_None is not None:
        labels = labels_or_None
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"got {labels.shape} labels for {images.shape[0]} images; expected one per image"
            )
        arrays.append(labels)
    # positional arrays are stored as arr_0, arr_1
    atomic_write(path, lambda f: np.savez(f, *arrays))
    return path


def save_samples(images_uint8_nhwc, labels_or_None, out_dir, grid_max_images=DEFAULT_GRID_MAX_IMAGES):
    """
    Save samples as out_dir/samples_NxHxWxC.npz (arr_0: the uint8 NHWC images, arr_1: the int64
    labels when given) and a PNG grid of the first grid_max_images next to it (same stem, .png).

    The npz is written to a temporary file and renamed, so readers never see a partial file.

    :param images_uint8_nhwc: uint8 array or tensor (N, H, W, C).
    :param labels_or_None: N class labels, or None for unconditional samples.
    :param out_dir: the folder to write to (created if missing).
    :param grid_max_images: how many samples the PNG grid shows at most.
    :return: the npz path.
    """
    images = _as_uint8_nhwc(images_uint8_nhwc)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shape_str = "x".join(str(s) for s in images.shape)
    npz_path = save_images_npz(os.path.join(out_dir, f"samples_{shape_str}.npz"), images, labels_or_None)
    if images.shape[0] > 0 and grid_max_images > 0:
        make_grid_png(images[:grid_max_images], os.path.splitext(npz_path)[0] + ".png")
    return npz_path
