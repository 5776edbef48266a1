"""
Image folders as an endless stream of training batches.

A dataset is a folder (searched recursively) of jpg/jpeg/png/gif files, and .npy arrays for data
that is not a picture (any channel count). For class-conditional training the class of an image
is the part of its file name before the first "_" (e.g. "cat_0001.png" is class "cat"); class
names are numbered in sorted order. In a distributed job, rank r of W reads the files r, r + W,
r + 2W, ... of the sorted list.

Channels (in_channels): 3, the reference's, turns every picture into RGB (grey ImageNet JPEGs
included); 1 keeps grey pictures grey and refuses colour ones; 2 and 4 read grey+alpha and RGBA.
A .npy array ([H, W] or [H, W, C]; uint8 0..255, or floats already in [-1, 1]) is used as it is
and must have exactly in_channels channels and the image size.
"""

import functools
import math
import os
import random

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from . import dist_util, logger
from .errors import ImageChannelsError, UnreadableImageError
from .diffusion.guidance import drop_labels
from .runtime.resumable_data import MappedBatches, ResumableBatches
from .runtime.files import blobfile
from .runtime.shapes import format_image_size, image_hw

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
# deviation from reference: .npy arrays are data files too (N-channel data that is no picture).
ARRAY_EXTENSIONS = ("npy",)
# The PIL mode a picture is converted to for each channel count (3: the reference's RGB).
PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    seed=None,
    in_channels=3,
    flag="--data_dir",
    class_names=None,
):
    """
    An endless stream of (images, kwargs) batches from an image folder.

    The stream's order is a pure function of (seed, rank, epoch) and its position can be saved
    and restored (state_dict / load_state_dict), so a resumed run reads the batches the
    interrupted run would have read next (see resumable_data).

    :param data_dir: the dataset folder.
    :param batch_size: images per batch on this rank.
    :param image_size: side of the square images produced, or (height, width) for rectangles
        (an addition: the image is scaled to cover the rectangle, then cropped).
    :param class_cond: if True, kwargs holds "y", the int64 class labels of the batch.
    :param deterministic: if True, read files in sorted order instead of shuffling.
    :param random_crop: if True, crop at a random place and scale (augmentation).
    :param random_flip: if True, flip each image horizontally with probability 1/2.
    :param seed: seed of the order and the augmentations; None: torch.initial_seed(), which the
        training scripts set to --seed + rank.
    :param in_channels: channels of the images produced (see the module's docstring).
    :param flag: the flag that named data_dir, for error messages (e.g. "--val_data_dir").
    :param class_names: with class_cond, number the classes as these names (the training
        folder's, for a validation folder: check_validation_classes) instead of by the folder's
        own sorted names; None: the folder's own.
    :return: an iterator of (float32 NCHW tensor in [-1, 1], dict) pairs that never ends, with
        state_dict() and load_state_dict().
    :raises ValueError: on an unspecified or empty folder, unlabelled files with class_cond, or
                        fewer images on this rank than batch_size.
    :raises FileNotFoundError: when data_dir does not exist.
    """
    if not data_dir:
        raise ValueError(f"unspecified data directory: pass {flag} pointing to a folder of images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    all_files = list_image_files_recursively(data_dir, flag=flag)
    classes = None
    if class_cond:
        classes, names = class_labels_from_paths(all_files)
        if class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            missing = [name for name in names if name not in index]
            if missing:
                raise ValueError(_foreign_classes_message(data_dir, missing, class_names, flag))
            classes = [index[names[label]] for label in classes]
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        shard=rank,
        num_shards=world,
        random_crop=random_crop,
        random_flip=random_flip,
        in_channels=in_channels,
    )
    if len(dataset) < batch_size:
        # drop_last would make every epoch empty and the generator would spin forever.
        raise ValueError(
            f"rank {rank} of {world} has {len(dataset)} images in {data_dir} but batch_size is "
            f"{batch_size}: lower --batch_size or add images to {flag}"
        )
    # deviation from reference: the reference was itself a generator over a shuffled DataLoader,
    # so every error above only surfaced at the first next(), and its order could not be resumed.
    return _ImageBatches(
        dataset, batch_size, shuffle=not deterministic, seed=seed, rank=rank, num_workers=1
    )


class _ImageBatches(ResumableBatches):
    def __next__(self):
        try:
            return super().__next__()
        except (UnreadableImageError, ImageChannelsError) as exc:
            # A worker's error comes back wrapped in its traceback text; keep only our message.
            raise type(exc)(_last_line(str(exc), type(exc))) from None


def _last_line(text, kind=UnreadableImageError):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    prefix = kind.__name__ + ": "
    return last.split(prefix, 1)[1] if prefix in last else last



def _is_remote(path):
    return "://" in str(path)


def list_image_files_recursively(data_dir, flag="--data_dir"):
    """
    Every image file under data_dir, in sorted order.

    Each folder's entries are visited in sorted order and sub-folders are expanded in place, as in
    the reference, so the order (and hence which rank reads which file) matches it.

    :param flag: the flag that named data_dir, for error messages ("--data_dir", "--input"),
        or words for a positional argument ("the FOLDER argument").
    :raises FileNotFoundError: when data_dir does not exist.
    :raises ValueError: when it holds no image files.
    """
    data_dir = os.fspath(data_dir)
    if _is_remote(data_dir):
        exists = blobfile().isdir(data_dir)
    else:
        exists = os.path.isdir(data_dir)
    if not exists:
        raise FileNotFoundError(f"data directory not found: {data_dir} (check {flag})")
    results = _walk(data_dir)
    if not results:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)}) found under "
            f"{data_dir}: check {flag}"
        )
    return results


# The reference's private name, kept for code written against it.
def _list_image_files_recursively(data_dir):
    return list_image_files_recursively(data_dir)


def _walk(folder):
    if _is_remote(folder):
        listdir, join, isdir = blobfile().listdir, blobfile().join, blobfile().isdir
    else:
        listdir, join, isdir = os.listdir, os.path.join, os.path.isdir
    found = []
    for entry in sorted(listdir(folder)):
        path = join(folder, entry)
        # deviation from reference: folders are recognised before extensions, so a folder
        # named "x.png" is searched rather than read as an image.
        if isdir(path):
            found.extend(_walk(path))
        elif _is_data_file(entry):
            found.append(path)
    return found


def _is_data_file(name):
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS + ARRAY_EXTENSIONS


def _is_array_file(path):
    return str(path).lower().endswith(tuple("." + e for e in ARRAY_EXTENSIONS))


def class_labels_from_paths(paths):
    """
    Class labels from file names: the class is the name before its first "_".

    :param paths: image paths.
    :return: (labels, class_names): one int label per path, and the sorted class names, where
             label i means class_names[i].
    :raises ValueError: when a file name has no "_" (so no class).
    """
    names = []
    unlabelled = []
    for path in paths:
        base = os.path.basename(str(path).rstrip("/"))
        if "_" not in base:
            unlabelled.append(base)
        names.append(base.split("_", 1)[0])
    if unlabelled:
        # deviation from reference: the reference silently made the whole name the class.
        raise ValueError(
            f"class_cond needs file names of the form '<class>_<anything>.<ext>', but "
            f"{len(unlabelled)} file(s) have no '_', e.g. {unlabelled[0]!r}: rename them or "
            "pass --class_cond False"
        )
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    return [index[name] for name in names], class_names


class ImageDataset(Dataset):
    """
    The images of one shard: files shard, shard + num_shards, ... of image_paths.

    Items are (CHW float32 array in [-1, 1], {"y": np.int64} or {}).
    """

    def __init__(
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        random_crop=False,
        random_flip=True,
        in_channels=3,
    ):
        """
        :param resolution: side of the square output images, or (height, width).
        :param image_paths: all image paths of the dataset (every shard's).
        :param classes: one int label per path, or None for unlabelled data.
        :param shard: which shard this dataset holds (the rank).
        :param num_shards: how many shards there are (the world size).
        :param random_crop: crop at a random place and scale instead of the centre.
        :param random_flip: flip horizontally with probability 1/2.
        :param in_channels: channels of the output (see the module's docstring).
        """
        super().__init__()
        if classes is not None and len(classes) != len(image_paths):
            raise ValueError(f"{len(classes)} class labels given for {len(image_paths)} images")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.resolution = resolution
        self.local_images = list(image_paths)[shard::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.in_channels = in_channels

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        path = self.local_images[idx]
        if _is_array_file(path):
            # Arrays are data, not pictures: no resampling, so no crop; a flip is still a flip.
            arr = read_array(path, self.resolution, self.in_channels)
        else:
            pil_image = read_image(path, self.in_channels)
            if self.random_crop:
                arr = random_crop_arr(pil_image, self.resolution)
            else:
                arr = center_crop_arr(pil_image, self.resolution)
            arr = _with_channel_axis(arr)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 127.5 - 1
        else:
            arr = arr.astype(np.float32)

        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict


def _with_channel_axis(arr):
    # PIL gives grey images as [H, W]; every consumer wants [H, W, C].
    return arr[:, :, None] if arr.ndim == 2 else arr


def _open_image(path):
    try:
        if _is_remote(path):
            with blobfile().BlobFile(path, "rb") as f:
                pil_image = Image.open(f)
                pil_image.load()
        else:
            with Image.open(path) as opened:
                opened.load()
                pil_image = opened.copy()
        return pil_image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(
            f"cannot read image {path} ({reason}): delete or replace the file"
        ) from None


def read_image(path, in_channels=3):
    """
    Decode a picture and convert it to in_channels channels (PIL_MODES): 3 makes anything RGB
    (the reference), 1 keeps grey grey (16-bit grey scaled to 8 bits) and refuses colour, 2 and
    4 give grey+alpha and RGBA.

    :raises UnreadableImageError: naming the file when it cannot be decoded.
    :raises ImageChannelsError: naming the file and the fix when it cannot have that many
        channels.
    """
    pil_image = _open_image(path)
    if in_channels not in PIL_MODES:
        raise ImageChannelsError(
            f"--in_channels {in_channels} but {path} is a picture (1 to 4 channels): store "
            f"{in_channels}-channel data as .npy arrays [H, W, {in_channels}]"
        )
    # deviation from reference: 16-bit grey is scaled to 8 bits before it becomes RGB; the
    # reference's convert("RGB") clips it at 255 (nearly every pixel white).
    pil_image = wide_grey_to_8bit(pil_image)
    if in_channels == 3:
        return pil_image.convert("RGB")
    colour = "R" in pil_image.getbands() or pil_image.mode == "P" and _palette_has_colour(pil_image)
    if in_channels in (1, 2) and colour:
        rgb = np.asarray(pil_image.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            raise ImageChannelsError(
                f"{path} is a colour image but --in_channels is {in_channels} (the folder mixes "
                "grey and colour images): convert it to grey or remove it, or pass "
                "--in_channels 3"
            )
    return pil_image.convert(PIL_MODES[in_channels])


def wide_grey_to_8bit(pil_image):
    """
    16-bit (CT, microscopy: "I;16" and its byte orders) or 32-bit ("I", "F") grey as 8-bit grey
    ("L"), scaled (16-bit: by 255/65535; 32-bit: by the image's own maximum), since PIL's own
    conversion clips at 255; any other mode is returned as it is. The training reader and the
    editing scripts' reader both use it, so an image reads the same in both.
    """
    if not (pil_image.mode.startswith("I;16") or pil_image.mode in ("I", "F")):
        return pil_image
    wide = np.asarray(pil_image, dtype=np.float64)
    top = 65535.0 if pil_image.mode.startswith("I;16") else max(float(wide.max()), 1.0)
    return Image.fromarray(np.clip(np.round(wide * (255.0 / top)), 0, 255).astype(np.uint8))


def _palette_has_colour(pil_image):
    rgb = np.asarray(pil_image.convert("RGB"))
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _read_image(path):
    """The reference's reading: any picture as RGB (kept for code written against it)."""
    return read_image(path, 3)


def read_array(path, image_size, in_channels):
    """
    Read a .npy data file as it is: [H, W] (one channel) or [H, W, C], uint8 (0..255) or floats
    already in [-1, 1].

    :return: an [H, W, C] array (uint8 or float32).
    :raises UnreadableImageError: when it cannot be read or has another size or dtype.
    :raises ImageChannelsError: when it has another channel count than in_channels.
    """
    try:
        if _is_remote(path):
            with blobfile().BlobFile(path, "rb") as f:
                arr = np.load(f, allow_pickle=False)
        else:
            arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(
            f"cannot read array {path} ({reason}): delete or replace the file"
        ) from None
    if arr.ndim not in (2, 3):
        raise UnreadableImageError(
            f"{path} holds an array of shape {arr.shape}: data files must be [H, W] or [H, W, C]"
        )
    arr = _with_channel_axis(arr)
    if arr.shape[2] != in_channels:
        raise ImageChannelsError(
            f"{path} has {arr.shape[2]} channels but --in_channels is {in_channels} (every file "
            f"of a folder needs the same count): pass --in_channels {arr.shape[2]} or fix the file"
        )
    height, width = image_hw(image_size)
    if arr.shape[:2] != (height, width):
        raise UnreadableImageError(
            f"{path} is {arr.shape[0]}x{arr.shape[1]} but --image_size is "
            f"{format_image_size(image_size)}: arrays are read as they are (no resizing), so "
            f"save them at {height}x{width}"
        )
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise UnreadableImageError(
            f"{path} holds {arr.dtype} values: save uint8 (0..255) or floats in [-1, 1]"
        )
    if arr.size and (not np.isfinite(arr).all() or arr.min() < -1 or arr.max() > 1):
        raise UnreadableImageError(
            f"{path} holds floats outside [-1, 1]: scale them to [-1, 1] (or save uint8 0..255)"
        )
    return arr.astype(np.float32)


def _downscale_by_halving(pil_image, min_side):
    # Repeated 2x BOX reductions before the final bicubic resize avoid the aliasing of a single
    # large bicubic reduction (what PIL's reducing_gap does in newer versions).
    while min(*pil_image.size) >= 2 * min_side:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    return pil_image


def _resize_short_side(pil_image, short_side):
    pil_image = _downscale_by_halving(pil_image, short_side)
    scale = short_side / min(*pil_image.size)
    return pil_image.resize(
        tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC
    )


def _resize_to_cover(pil_image, height, width):
    """
    Scale so the image covers height x width (the smallest such scale), halving with BOX first
    as _resize_short_side does. For a square this is exactly _resize_short_side.
    """
    if height == width:
        return _resize_short_side(pil_image, height)
    while pil_image.size[0] >= 2 * width and pil_image.size[1] >= 2 * height:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = max(width / pil_image.size[0], height / pil_image.size[1])
    size = tuple(
        max(round(s * scale), want) for s, want in zip(pil_image.size, (width, height))
    )
    return pil_image.resize(size, resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """
    Resize so the short side is image_size, then cut the central image_size square. For a
    (height, width) rectangle: scale to cover it, then cut it from the centre.

    :return: an HWC (HW for grey) uint8 array of shape (image_size, image_size, channels).
    """
    height, width = image_hw(image_size)
    arr = np.array(_resize_to_cover(pil_image, height, width))
    top = (arr.shape[0] - height) // 2
    left = (arr.shape[1] - width) // 2
    return arr[top : top + height, left : left + width]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """
    Resize so the short side is a random length in [ceil(image_size / max_crop_frac),
    ceil(image_size / min_crop_frac)], then cut an image_size square at a random place. For a
    (height, width) rectangle the random length is drawn for its shorter side and the image is
    scaled to cover the rectangle enlarged by the same factor.

    :return: an HWC (HW for grey) uint8 array of shape (image_size, image_size, channels).
    """
    height, width = image_hw(image_size)
    side = min(height, width)
    shortest = math.ceil(side / max_crop_frac)
    longest = math.ceil(side / min_crop_frac)
    short_side = random.randrange(shortest, longest + 1)
    if height == width:
        arr = np.array(_resize_short_side(pil_image, short_side))
    else:
        grow = short_side / side
        arr = np.array(_resize_to_cover(pil_image, round(height * grow), round(width * grow)))
    top = random.randrange(arr.shape[0] - height + 1)
    left = random.randrange(arr.shape[1] - width + 1)
    return arr[top : top + height, left : left + width]


def read_image_folder(data_dir, image_size, class_cond=False, limit=None, in_channels=3,
                      flag="--data_dir"):
    """
    Read the images of a folder as they are, for tools that compare outputs with them pixel by
    pixel (e.g. DDIM inversion): no resizing, cropping or flipping, so every image must already
    be image_size x image_size.

    :param data_dir: the folder, searched recursively, files in sorted order (as load_data).
    :param image_size: the side every image must have, or (height, width).
    :param class_cond: if True, also return labels from the file names (as load_data).
    :param limit: read only the first `limit` files (None or 0: all).
    :param in_channels: channels to read the images with (see read_image).
    :return: (uint8 array [N, height, width, in_channels], int64 labels [N] or None).
    :param flag: the flag that named the folder, for error messages.
    :raises ValueError: naming the first image of another size, or an unreadable one.
    """
    paths = list_image_files_recursively(data_dir, flag=flag)
    labels = None
    if class_cond:
        labels, _ = class_labels_from_paths(paths)
    if limit:
        paths = paths[:limit]
        labels = None if labels is None else labels[:limit]
    height, width = image_hw(image_size)
    images = []
    for path in paths:
        if _is_array_file(path):
            arr = read_array(path, image_size, in_channels)
            if arr.dtype != np.uint8:
                raise UnreadableImageError(
                    f"{path} holds floats: this tool compares uint8 images, save it as uint8"
                )
            images.append(arr)
            continue
        pil_image = read_image(path, in_channels)
        if pil_image.size != (width, height):
            got_w, got_h = pil_image.size
            other = f", or a model trained at --image_size {got_w}" if got_w == got_h else ""
            raise ValueError(
                f"image {path} is {got_w}x{got_h} but --image_size is "
                f"{format_image_size(image_size)}: give {width}x{height} images{other}"
            )
        images.append(_with_channel_axis(np.asarray(pil_image, dtype=np.uint8)))
    label_arr = None if labels is None else np.asarray(labels, dtype=np.int64)
    return np.stack(images), label_arr


def check_dataset_classes(data_dir, num_classes, flag="--data_dir"):
    """
    Compare a class-conditional dataset's classes with the model's label count.

    More classes than labels cannot train: a ValueError names the --num_classes to pass. Fewer
    is the small-data trap of the reference's default (1000 ImageNet classes for a 4-class
    folder): the run works, but most labels never appear in training while sampling draws
    labels from all of them, so one warning line (per count, per process) names --num_classes K.

    :param flag: the flag that named data_dir, for error messages.
    :return: the class names, in label order.
    :raises ValueError: naming the --num_classes to pass.
    """
    _, names = class_labels_from_paths(list_image_files_recursively(data_dir, flag=flag))
    if len(names) > num_classes:
        raise ValueError(
            f"{data_dir} has {len(names)} classes but the model has {num_classes} labels: pass "
            f"--num_classes {len(names)}"
        )
    if len(names) < num_classes and (len(names), num_classes) not in _WARNED_CLASS_COUNTS:
        # classifier_train checks its validation folder too: the same counts warn once.
        _WARNED_CLASS_COUNTS.add((len(names), num_classes))
        logger.warn(
            f"warning: {data_dir} has {len(names)} classes but --num_classes is {num_classes}: "
            f"{num_classes - len(names)} labels never appear in training, yet sampling draws "
            f"from all {num_classes}; pass --num_classes {len(names)} (unless classes come later)"
        )
    return names


_WARNED_CLASS_COUNTS = set()


def _foreign_classes_message(data_dir, missing, class_names, flag, train_flag="--data_dir"):
    shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (
        f"{data_dir} has {len(missing)} class(es) that the training folder ({train_flag}) does "
        f"not have ({shown}; it has {len(class_names)}: "
        f"{', '.join(repr(n) for n in list(class_names)[:5])}{' ...' if len(class_names) > 5 else ''}): "
        f"the model only knows the training folder's classes, so {flag} must use the same class "
        f"names (fix {flag}, not --num_classes)"
    )


def check_validation_classes(val_dir, class_names, flag="--val_data_dir"):
    """
    Check, before training, that a class-conditional validation folder holds only classes of the
    training folder (its labels are numbered by the training folder's names: load_data with
    class_names), so that a run does not die at its first validation, mid-run.

    :param class_names: the training folder's class names (check_dataset_classes).
    :return: the validation folder's class names.
    :raises FileNotFoundError, ValueError: naming `flag` (missing, empty, unlabelled files,
        classes the training folder lacks).
    """
    _, names = class_labels_from_paths(list_image_files_recursively(val_dir, flag=flag))
    missing = [name for name in names if name not in set(class_names)]
    if missing:
        raise ValueError(_foreign_classes_message(val_dir, missing, class_names, flag))
    return names


class _DropBatchLabels:
    def __init__(self, prob, null_label):
        self.prob = prob
        self.null_label = null_label

    def __call__(self, batch, model_kwargs):
        if "y" not in model_kwargs:
            raise ValueError("--class_dropout_prob needs labelled data: pass --class_cond True")
        model_kwargs = dict(model_kwargs)
        model_kwargs["y"] = drop_labels(model_kwargs["y"], prob=self.prob, null_label=self.null_label)
        return batch, model_kwargs



def with_label_dropout(data, *, prob, null_label):
    """
    A training stream whose labels are replaced by the null class at rate prob (Ho & Salimans
    2022, Algorithm 1); the stream itself when prob is 0. The position of the stream still
    saves and restores with its state_dict.

    :param data: an iterator of (images, {"y": labels, ...}) batches.
    :param prob: the dropout rate p.
    :param null_label: the index of the null class (num_classes).
    """
    if prob <= 0:
        return data
    return MappedBatches(data, _DropBatchLabels(prob, null_label))


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False,
                       in_channels=3, **load_kwargs):
    """
    Batches of large images with their area-downsampled versions as model_kwargs["low_res"]
    (what super_res_train.py trains on; the reference defined it in that script).

    :param in_channels: channels of the images (see load_data).
    :param load_kwargs: further load_data keywords (e.g. deterministic=True, random_flip=False
        for a fixed validation subset).
    """
    if small_size > large_size:
        raise ValueError(f"--small_size {small_size} is larger than --large_size {large_size}")
    data = load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=large_size,
        class_cond=class_cond,
        in_channels=in_channels,
        **load_kwargs,
    )
    # A mapped stream rather than a generator, so that its position saves with the checkpoint.
    return MappedBatches(data, functools.partial(_with_low_res, small_size=small_size))



def _with_low_res(large_batch, model_kwargs, small_size):
    model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
    return large_batch, model_kwargs
