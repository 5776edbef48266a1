"""
Image files in and out of sampling: the reference's samples_NxHxWxC.npz plus a PNG grid to look
at, one image file per sample (--save_images, npz_to_images.py), reading such npz files, image
files and folders back, and the DDIM tools' latents files.
"""

import math
import os
import re
import shutil
import tempfile
import zipfile

import numpy as np
import torch
from PIL import Image

from ..errors import ScriptError
from ..runtime.files import atomic_write, file_kind
from ..runtime.shapes import format_image_size, image_hw

# A grid of every sample of a 50k-image run would be gigapixels; show the first ones only.
DEFAULT_GRID_MAX_IMAGES = 64
# Grids are for people: small images are magnified until the grid is this many pixels a side...
GRID_MIN_SIDE = 256
# ...but a single row of many images is not stretched past this.
GRID_MAX_SIDE = 2048
# A class grid shows at most this many class rows.
GRID_MAX_CLASSES = 16


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
    if images.ndim != 4 or images.shape[-1] < 1:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    if images.shape[1] in (1, 2, 3, 4) and images.shape[-1] > 4:
        # N-channel samples are allowed, but a few rows of many channels is NCHW by mistake.
        raise ValueError(
            f"expected images of shape (N, H, W, C), got {images.shape}: NCHW? (use to_uint8)"
        )
    return images


def _viewable(images):
    """
    What a PNG grid can show of N-channel samples: grey, RGB and RGBA as they are; any other
    channel count (2, or 5 and more, from --in_channels) as its first channel in grey.
    """
    if images.shape[-1] in (1, 3, 4):
        return images
    return images[..., :1]


def make_grid_png(images_uint8_nhwc, path, nrow=None, padding=2, pad_value=0,
                  min_side=GRID_MIN_SIDE):
    """
    Save images side by side as one PNG, nrow per row, separated by padding pixels, each image
    magnified (nearest neighbour, by a whole factor) so that the grid is at least min_side pixels
    a side: samples of 8x8 or 16x16 pixels are otherwise too small to look at.

    :param images_uint8_nhwc: uint8 array or tensor (N, H, W, C), C in 1, 3 or 4.
    :param path: the PNG file to write.
    :param nrow: images per row (default: ceil(sqrt(N)), a near-square grid).
    :param padding: pixels between and around the images (not magnified).
    :param pad_value: grey level of the padding (0 = black).
    :param min_side: the grid's smaller side reaches at least this (0: native size), unless the
        factor that takes would make its longer side exceed GRID_MAX_SIDE (a single row of many
        images): then the largest factor that keeps it within.
    :return: path.
    """
    images = _viewable(_as_uint8_nhwc(images_uint8_nhwc))
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("cannot make a grid of zero images")
    if nrow is None:
        nrow = math.ceil(math.sqrt(count))
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    ncol = min(nrow, count)
    nrows = math.ceil(count / nrow)
    scale = grid_scale(height, width, nrows, ncol, padding, min_side)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        height, width = height * scale, width * scale
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
    picture = Image.fromarray(grid)
    atomic_write(path, lambda f: picture.save(f, format="PNG"))
    return path


def grid_scale(height, width, rows, cols, padding, min_side=GRID_MIN_SIDE):
    """
    The whole magnification make_grid_png applies to images of height x width in a grid of
    rows x cols: the smallest that makes both sides at least min_side, lowered while the longer
    side would pass GRID_MAX_SIDE; 1 when the grid is large enough already.
    """

    def sides(scale):
        return (rows * (height * scale + padding) + padding,
                cols * (width * scale + padding) + padding)

    scale = 1
    while min(sides(scale)) < min_side:
        scale += 1
    while scale > 1 and max(sides(scale)) > GRID_MAX_SIDE:
        scale -= 1
    return scale


def class_grid(images_uint8_nhwc, labels, max_images=DEFAULT_GRID_MAX_IMAGES, per_class=None,
               max_classes=GRID_MAX_CLASSES):
    """
    Arrange labelled samples with one row per class, classes in increasing order, each row that
    class's samples in their order, shorter rows filled with blank (black) tiles.

    :param images_uint8_nhwc: uint8 (N, H, W, C) array or tensor.
    :param labels: N class labels.
    :param max_images: about how many samples the grid shows (split evenly over the rows).
    :param per_class: samples per row, instead of the share of max_images.
    :param max_classes: rows at most (the first classes in order); 1000 ImageNet rows would
        make a strip nobody can look at.
    :return: (uint8 tiles [rows * per_row, H, W, C] in row order, per_row) for make_grid_png
        with nrow=per_row.
    """
    images = _as_uint8_nhwc(images_uint8_nhwc)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.shape != (len(images),):
        raise ValueError(f"got {labels.shape} labels for {len(images)} images; expected one per image")
    if len(images) == 0:
        raise ValueError("cannot make a grid of zero images")
    classes = np.unique(labels)[:max_classes]
    members = [np.flatnonzero(labels == c) for c in classes]
    if per_class is None:
        per_class = max(1, math.ceil(max_images / len(classes)))
    per_row = max(1, min(per_class, max(len(m) for m in members)))
    tiles = np.zeros((len(classes) * per_row, *images.shape[1:]), dtype=np.uint8)
    for row, indices in enumerate(members):
        chosen = indices[:per_row]
        tiles[row * per_row : row * per_row + len(chosen)] = images[chosen]
    return tiles, per_row


def save_images_npz(path, images_uint8_nhwc, labels_or_None=None):
    """
    Save images as an npz in the samples format (arr_0: uint8 NHWC images, arr_1: int64 labels
    when given), written to a temporary file and renamed, so readers never see a partial file.
    The same arrays give the same bytes (np.savez stamps its members with a fixed date), so a
    resumed run's file is the uninterrupted run's.

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


def samples_npz_name(shape):
    """The file name of samples of `shape` (N, H, W, C): samples_NxHxWxC.npz."""
    return "samples_" + "x".join(str(s) for s in shape) + ".npz"


def save_samples(images_uint8_nhwc, labels_or_None, out_dir, grid_max_images=DEFAULT_GRID_MAX_IMAGES,
                 grid_per_class=None, save_images=False):
    """
    Save samples as out_dir/samples_NxHxWxC.npz (arr_0: the uint8 NHWC images, arr_1: the int64
    labels when given) and a PNG grid next to it (same stem, .png): with labels one row per
    class (class_grid), else the first grid_max_images in a near-square grid; magnified to at
    least GRID_MIN_SIDE pixels a side either way.

    Every file is written to a temporary file and renamed, so readers never see a partial file;
    the npz comes last, so that it marks the whole result complete. A result of the same shape
    already there is replaced: its npz and grid, and the sample files of its PNG folder (those
    named as sample_file_name names them; other files in that folder are never touched).

    :param images_uint8_nhwc: uint8 array or tensor (N, H, W, C).
    :param labels_or_None: N class labels, or None for unconditional samples.
    :param out_dir: the folder to write to (created if missing).
    :param grid_max_images: about how many samples the PNG grid shows (0: no grid).
    :param grid_per_class: samples per class row (labelled samples), instead of a share of
        grid_max_images.
    :param save_images: also write one image file per sample into the folder named like the
        npz without .npz (samples_NxHxWxC/, see save_image_files); without it the sample files
        of an earlier result there are removed (they would not match the new npz).
    :return: the npz path.
    """
    images = _as_uint8_nhwc(images_uint8_nhwc)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    npz_path = os.path.join(out_dir, samples_npz_name(images.shape))
    folder = os.path.splitext(npz_path)[0]
    if save_images:
        save_image_files(images, labels_or_None, folder)
    else:
        remove_sample_files(folder)
    if images.shape[0] > 0 and grid_max_images > 0:
        png_path = folder + ".png"
        if labels_or_None is None:
            make_grid_png(images[:grid_max_images], png_path)
        else:
            tiles, per_row = class_grid(images, labels_or_None, max_images=grid_max_images,
                                        per_class=grid_per_class)
            make_grid_png(tiles, png_path, nrow=per_row)
    save_images_npz(npz_path, images, labels_or_None)
    return npz_path


def finished_samples(out_dir, shape):
    """
    The first file of a finished samples result of `shape` in out_dir that exists (its npz,
    its grid, a sample file in its PNG folder), or None: what save_samples would replace.
    """
    npz_path = os.path.join(out_dir, samples_npz_name(shape))
    folder = os.path.splitext(npz_path)[0]
    for path in (npz_path, folder + ".png"):
        if os.path.exists(path):
            return path
    found = sample_files_in(folder)
    return os.path.join(folder, found[0]) if found else None


# ------------------------------------------------------------------ one file per sample

# Channels a PNG holds, and the PIL mode of each; other counts are written as .npy arrays.
PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def png_bytes(height, width, channels=3):
    """
    About the most disk one sample's PNG takes: its pixels (deflate cannot shrink noise and adds
    a little), a filter byte per row, the PNG chunks, and at least one 4 KiB block.
    """
    return max(4096, int(height * (width * channels + 1) * 1.01) + 1024)


def sample_file_name(index, label=None, digits=6, channels=3):
    """
    The name of sample `index`: "<index>.png", or "<index>_<label>.png" with a label; the index
    zero-padded to `digits` so that names sort in sample order; ".npy" for channel counts a PNG
    cannot hold.
    """
    ext = "png" if channels in PNG_MODES else "npy"
    stem = f"{index:0{digits}d}" if label is None else f"{index:0{digits}d}_{int(label)}"
    return f"{stem}.{ext}"


# The names sample_file_name gives: what a result's PNG folder holds of ours.
SAMPLE_FILE = re.compile(r"\d{6,}(_-?\d+)?\.(png|npy)")


def sample_files_in(folder):
    """The sample files (named as sample_file_name names them) in folder, sorted."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(name for name in names if SAMPLE_FILE.fullmatch(name)
                  and os.path.isfile(os.path.join(folder, name)))


def remove_sample_files(folder, keep=()):
    """
    Delete the sample files in folder except those named in `keep` (an earlier result's files
    that a new one did not write again); any other file is left alone, and so is the folder.
    """
    keep = set(keep)
    for name in sample_files_in(folder):
        if name not in keep:
            os.remove(os.path.join(folder, name))


class ImageFileWriter:
    """
    Write samples one file each into a folder: files go to a hidden temporary folder beside it
    and are moved in when close() succeeds, replacing files of the same names; the sample files
    of an earlier result that were not written again are then removed, and nothing else in the
    folder is touched. On an error (or a Ctrl-C) the folder is left as it was.

    # deviation from reference (of this port's earlier versions: the reference has no such
    # folder): the folder used to be replaced whole, deleting whatever else it held.

    Use as a context manager; call write(images, labels) for each batch, in sample order.

    :param folder: the destination folder.
    :param total: how many samples will be written (for the zero padding of the names).
    """

    def __init__(self, folder, total):
        self.folder = os.path.abspath(os.fspath(folder))
        self.digits = max(6, len(str(max(total - 1, 0))))
        self.count = 0
        self.names = []
        self._tmp = None

    def __enter__(self):
        parent = os.path.dirname(self.folder)
        os.makedirs(parent, exist_ok=True)
        self._tmp = make_temporary_folder(self.folder)
        return self

    def write(self, images_uint8_nhwc, labels_or_None=None):
        images = _as_uint8_nhwc(images_uint8_nhwc)
        labels = None if labels_or_None is None else _labels_array(labels_or_None, len(images))
        for i, image in enumerate(images):
            label = None if labels is None else labels[i]
            name = sample_file_name(self.count, label, self.digits, image.shape[-1])
            write_image_file(os.path.join(self._tmp, name), image)
            self.names.append(name)
            self.count += 1

    def __exit__(self, kind, exc, tb):
        try:
            if kind is None:
                move_files_in(self._tmp, self.folder, self.names)
                remove_sample_files(self.folder, keep=self.names)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return False


def make_temporary_folder(folder):
    """A new hidden folder beside `folder` for files to be moved into it."""
    return tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)),
                            prefix="." + os.path.basename(folder) + ".", suffix=".tmp")


def move_files_in(source, folder, names):
    """Move the named files of `source` into `folder` (created when missing), replacing files
    of the same names there."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        os.replace(os.path.join(source, name), os.path.join(folder, name))


def write_image_file(path, image):
    """One uint8 HWC image as a PNG (grey, grey+alpha, RGB or RGBA by its channel count), or as
    a .npy array when the path says so."""
    if path.endswith(".npy"):
        np.save(path, image)
        return
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(pixels).save(path, format="PNG")


def save_image_files(images_uint8_nhwc, labels_or_None, folder):
    """
    Write each image as its own file in `folder` (see ImageFileWriter: an earlier result's
    sample files are replaced, other files kept): "<index>_<label>.png" when labels are given,
    else "<index>.png" (grey, grey+alpha, RGB or RGBA by the channel count; .npy for other
    counts).

    :return: the folder.
    """
    images = _as_uint8_nhwc(images_uint8_nhwc)
    with ImageFileWriter(folder, len(images)) as writer:
        writer.write(images, labels_or_None)
    return os.fspath(folder)


def _labels_array(labels, count):
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (count,):
        raise ValueError(f"got {labels.shape} labels for {count} images; expected one per image")
    return labels


def npz_to_image_files(npz_path, folder=None, limit=None, batch_size=256):
    """
    Write the images of a samples npz (arr_0, with labels arr_1 when present) one file each,
    as save_image_files names them, reading the npz in batches (a 50k-image file never sits in
    memory at once).

    :param folder: the destination (default: beside the npz, named like it without .npz).
    :param limit: write only the first `limit` images (None or 0: all).
    :return: (folder, number of files written).
    :raises ScriptError: when the file is not such an npz (a PNG, a latents file, ...).
    """
    from ..evaluation.npz import NpzArrayStream, npz_keys

    check_npz_file(npz_path, "samples")
    keys = npz_keys(npz_path)
    if "arr_0" not in keys:
        raise ScriptError(
            f"{npz_path} has no arr_0 (it holds {', '.join(keys) or 'nothing'}): pass a samples "
            "npz written by a sampling script"
        )
    folder = folder or os.path.splitext(os.fspath(npz_path))[0]
    labels = None
    if "arr_1" in keys:
        with np.load(npz_path) as data:
            labels = data["arr_1"]
    with NpzArrayStream(path=npz_path, name="arr_0") as stream:
        if len(stream.shape) != 4 or stream.dtype != np.uint8:
            raise ScriptError(
                f"{npz_path}: arr_0 is {stream.dtype} of shape {stream.shape}, expected uint8 "
                "images (N, H, W, C) as the sampling scripts write them"
            )
        total = len(stream) if not limit else min(limit, len(stream))
        if labels is not None and len(labels) != len(stream):
            raise ScriptError(
                f"{npz_path} holds {len(stream)} images but {len(labels)} labels (arr_1)"
            )
        with ImageFileWriter(folder, total) as writer:
            for batch in stream.batches(batch_size):
                batch = batch[: total - writer.count]
                if len(batch) == 0:
                    break
                start = writer.count
                writer.write(batch, None if labels is None else labels[start : start + len(batch)])
    return folder, total


# ------------------------------------------------------------------ what a file really is

def check_npz_file(path, what, hint=""):
    """
    Refuse, in one line, a file given where an npz is expected (instead of numpy's message
    about pickled data).

    :param what: what the file should hold, for the message (e.g. "base samples").
    :param hint: what to pass instead, appended to the message.
    :raises FileNotFoundError: when it is missing.
    :raises ScriptError: when it is not an npz.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ScriptError(f"{path} is a folder but {what} must be an npz file{hint}")
    kind = file_kind(path)
    if kind is not None:
        raise ScriptError(f"{path} is {kind}, but {what} must be an npz file (np.savez){hint}")
    try:
        with zipfile.ZipFile(path):
            pass
    except zipfile.BadZipFile:
        raise ScriptError(f"{path} is not a readable npz file (a damaged zip archive){hint}") from None


def read_image_npz(path, image_size, class_cond=False, size_flag="--image_size", what="images",
                   labels_hint="add them as arr_1 or pass --class_cond False", channels=3):
    """
    Read images as image_sample.py writes them: arr_0 uint8 [N, H, W, C], arr_1 int64 labels.

    :param path: the npz file.
    :param image_size: the side the images must have, or (height, width).
    :param class_cond: if True, the labels are required and returned.
    :param size_flag: the flag that sets image_size (for messages).
    :param what: what the file holds (for messages), e.g. "base samples".
    :param labels_hint: what to do when labels are missing (for messages).
    :param channels: the channel count C the images must have (--in_channels).
    :return: (uint8 images, int64 labels or None; None unless class_cond).
    :raises FileNotFoundError: when the file is missing.
    :raises ScriptError: when it is no npz (an image, say), unreadable, or of the wrong shapes.
    """
    check_npz_file(path, what)
    try:
        with np.load(path) as obj:
            image_arr = obj["arr_0"]
            label_arr = obj["arr_1"] if "arr_1" in obj else None
    except (OSError, ValueError, KeyError) as exc:
        raise ScriptError(f"cannot read {what} {path}: {exc}") from None
    height, width = image_hw(image_size)
    expected = (height, width, channels)
    if image_arr.ndim != 4 or tuple(image_arr.shape[1:]) != expected:
        hint = ""
        if image_arr.ndim == 4 and tuple(image_arr.shape[1:3]) != (height, width):
            hint = (f": pass {size_flag} {format_image_size(tuple(image_arr.shape[1:3]))} (with "
                    "a model trained for it)")
        elif image_arr.ndim == 4:
            hint = f": pass --in_channels {image_arr.shape[3]} (with a model trained for it)"
        raise ScriptError(
            f"{what} {path} have shape {tuple(image_arr.shape)}, expected "
            f"(N, {height}, {width}, {channels}) for {size_flag} "
            f"{format_image_size(image_size)}{hint}"
        )
    if image_arr.dtype != np.uint8:
        raise ScriptError(f"{what} {path} must be uint8 images, got {image_arr.dtype}")
    if not class_cond:
        return image_arr, None
    if label_arr is None:
        raise ScriptError(f"--class_cond True needs labels (arr_1) in {path}: {labels_hint}")
    if label_arr.shape != (len(image_arr),):
        raise ScriptError(
            f"{path} holds {len(image_arr)} images but labels (arr_1) of shape {label_arr.shape}"
        )
    return image_arr, label_arr.astype(np.int64)


def read_images(path, image_size, class_cond=False, limit=None, channels=3, flag="--input"):
    """
    Images to compare outputs with pixel by pixel: an image folder (read as is, labels from the
    file names) or an npz of uint8 images (arr_0, with labels as arr_1).

    :param limit: keep the first `limit` images (None or 0: all).
    :return: (uint8 images [N, height, width, channels], int64 labels or None).
    """
    from ..image_datasets import read_image_folder

    if not path:
        raise ScriptError("no images given: pass --input FOLDER or --input FILE.npz")
    if os.path.isdir(path):
        return read_image_folder(path, image_size, class_cond=class_cond, limit=limit,
                                 in_channels=channels, flag=flag)
    images, labels = read_image_npz(path, image_size, class_cond=class_cond, channels=channels)
    if limit:
        images, labels = images[:limit], (None if labels is None else labels[:limit])
    return images, labels


def read_low_res_images(path, small_size, class_cond=False, channels=3):
    """
    The images super_res_sample.py upsamples (--base_samples): an npz of samples (arr_0, labels
    arr_1), one image file, or a folder of images (labels from the file names, as training
    reads them). Pictures are brought to small_size as training brings its images to size
    (scaled so the short side fits, then the centre cropped): a picture of that size is used
    as it is.

    :param channels: the channel count (--in_channels).
    :return: (uint8 images [N, small, small, channels], int64 labels or None; None unless
        class_cond).
    :raises FileNotFoundError: when the path is missing.
    :raises ScriptError: for a file that is neither an npz nor a picture, wrong shapes, or
        missing labels.
    """
    from ..image_datasets import (
        IMAGE_EXTENSIONS,
        center_crop_arr,
        class_labels_from_paths,
        list_image_files_recursively,
        read_image,
    )

    if not path:
        raise ScriptError(
            "pass --base_samples: an npz of samples (image_sample.py's output), an image file "
            "or a folder of images"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"base samples not found: {path}")
    if os.path.isfile(path) and file_kind(path) is None:
        return read_image_npz(
            path, small_size, class_cond=class_cond, size_flag="--small_size",
            what="base samples", channels=channels,
            labels_hint="sample the base images with a class-conditional model",
        )
    if os.path.isdir(path):
        paths = [p for p in list_image_files_recursively(path, flag="--base_samples")
                 if not p.lower().endswith(".npy")]
        if not paths:
            raise ScriptError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    elif file_kind(path) in ("a PNG image", "a JPEG image", "a GIF image"):
        paths = [path]
    else:
        raise ScriptError(
            f"--base_samples {path} is {file_kind(path)}: pass an npz of samples, an image "
            "file or a folder of images"
        )
    labels = None
    if class_cond:
        labels = np.asarray(class_labels_from_paths(paths)[0], dtype=np.int64)
    images = []
    for image_path in paths:
        arr = center_crop_arr(read_image(image_path, channels), small_size)
        images.append(arr[:, :, None] if arr.ndim == 2 else arr)
    return np.stack(images), labels


def uint8_to_model_input(images):
    """uint8 NHWC images (array or tensor) to a float32 NCHW tensor in [-1, 1]."""
    tensor = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    return tensor.float() / 127.5 - 1.0


def save_latents(path, x_T, labels=None, steps=None, images=None):
    """
    Write DDIM latents as an npz: "x_T" float32 [N, C, H, W], and when given "labels" int64 [N],
    "steps" (the number of DDIM steps that produced them) and "images" (the uint8 NHWC images
    they encode). Written atomically.

    :return: path.
    """
    arrays = {"x_T": _numpy(x_T).astype(np.float32)}
    if labels is not None:
        arrays["labels"] = _numpy(labels).astype(np.int64)
    if steps is not None:
        arrays["steps"] = np.asarray(steps, dtype=np.int64)
    if images is not None:
        arrays["images"] = _numpy(images).astype(np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_latents(path, image_size, class_cond=False, channels=3):
    """
    Read latents written by save_latents (ddim_invert.py) and check they fit the model.

    :param image_size: the model's image size.
    :param class_cond: if True, the file must hold labels.
    :return: (x_T float32 tensor [N, C, H, W], int64 label tensor or None, steps or None).
    :raises FileNotFoundError: when the file is missing.
    :raises ScriptError: when it is unreadable, not a latents file, or of another shape.
    """
    check_npz_file(path, "latents", hint=": pass the latents.npz of ddim_invert.py")
    try:
        with np.load(path) as obj:
            if "x_T" not in obj:
                raise ScriptError(
                    f"{path} is not a latents file (no x_T array): write one with ddim_invert.py"
                )
            x_T = obj["x_T"]
            labels = obj["labels"] if "labels" in obj else None
            steps = int(obj["steps"]) if "steps" in obj else None
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ScriptError):
            raise
        raise ScriptError(f"cannot read latents {path}: {exc}") from None
    expected = (channels, image_size, image_size)
    if x_T.ndim != 4 or tuple(x_T.shape[1:]) != expected:
        hint = ""
        if x_T.ndim == 4 and x_T.shape[2] == x_T.shape[3] and x_T.shape[1] == channels:
            hint = f": pass --image_size {x_T.shape[2]} (with a model trained for it)"
        raise ScriptError(
            f"latents {path} have shape {tuple(x_T.shape)} but the model flags need "
            f"(N, {channels}, {image_size}, {image_size}) for --image_size {image_size}{hint}"
        )
    if class_cond and labels is None:
        raise ScriptError(
            f"--class_cond True needs labels in {path}: invert the images with a "
            "class-conditional model (ddim_invert.py --class_cond True)"
        )
    label_tensor = torch.from_numpy(labels.astype(np.int64)) if class_cond else None
    return torch.from_numpy(x_T.astype(np.float32)), label_tensor, steps


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
