"""
Image folders as an endless stream of training batches.

A dataset is a folder (searched recursively) of jpg/jpeg/png/gif files. For class-conditional
training the class of an image is the part of its file name before the first "_" (e.g.
"cat_0001.png" is class "cat"); class names are numbered in sorted order. In a distributed job,
rank r of W reads the files r, r + W, r + 2W, ... of the sorted list.
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
from .errors import UnreadableImageError
from .diffusion.guidance import drop_labels
from .runtime.resumable_data import MappedBatches, ResumableBatches
from .runtime.files import blobfile

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


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
    flag="--data_dir",
):
    """
    An endless stream of (images, kwargs) batches from an image folder.

    The stream's order is a pure function of (seed, rank, epoch) and its position can be saved
    and restored (state_dict / load_state_dict), so a resumed run reads the batches the
    interrupted run would have read next (see resumable_data).

    :param data_dir: the dataset folder.
    :param batch_size: images per batch on this rank.
    :param image_size: side of the square images produced.
    :param class_cond: if True, kwargs holds "y", the int64 class labels of the batch.
    :param deterministic: if True, read files in sorted order instead of shuffling.
    :param random_crop: if True, crop at a random place and scale (augmentation).
    :param random_flip: if True, flip each image horizontally with probability 1/2.
    :param seed: seed of the order and the augmentations; None: torch.initial_seed(), which the
        training scripts set to --seed + rank.
    :param flag: the flag that named data_dir, for error messages (e.g. "--val_data_dir").
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
        classes, _ = class_labels_from_paths(all_files)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        shard=rank,
        num_shards=world,
        random_crop=random_crop,
        random_flip=random_flip,
    )
    if len(dataset) < batch_size:
        # drop_last would make every epoch empty and the generator would spin forever.
        raise ValueError(
            f"rank {rank} of {world} has {len(dataset)} images in {data_dir} but batch_size is "
            f"{batch_size}: lower --batch_size or add images"
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
        except UnreadableImageError as exc:
            # A worker's error comes back wrapped in its traceback text; keep only our message.
            raise UnreadableImageError(_last_line(str(exc))) from None


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    prefix = UnreadableImageError.__name__ + ": "
    return last.split(prefix, 1)[1] if prefix in last else last



def _is_remote(path):
    return "://" in str(path)


def list_image_files_recursively(data_dir, flag="--data_dir"):
    """
    Every image file under data_dir, in sorted order.

    Each folder's entries are visited in sorted order and sub-folders are expanded in place, as in
    the reference, so the order (and hence which rank reads which file) matches it.

    :param flag: the flag that named data_dir, for error messages.
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
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_dir}: check {flag}"
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
        elif "." in entry and entry.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


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
    ):
        """
        :param resolution: side of the square output images.
        :param image_paths: all image paths of the dataset (every shard's).
        :param classes: one int label per path, or None for unlabelled data.
        :param shard: which shard this dataset holds (the rank).
        :param num_shards: how many shards there are (the world size).
        :param random_crop: crop at a random place and scale instead of the centre.
        :param random_flip: flip horizontally with probability 1/2.
        """
        super().__init__()
        if classes is not None and len(classes) != len(image_paths):
            raise ValueError(f"{len(classes)} class labels given for {len(image_paths)} images")
        self.resolution = resolution
        self.local_images = list(image_paths)[shard::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        path = self.local_images[idx]
        pil_image = _read_image(path)

        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1

        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict


def _read_image(path):
    try:
        if _is_remote(path):
            with blobfile().BlobFile(path, "rb") as f:
                pil_image = Image.open(f)
                pil_image.load()
        else:
            with Image.open(path) as opened:
                opened.load()
                pil_image = opened.copy()
        return pil_image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(
            f"cannot read image {path} ({reason}): delete or replace the file"
        ) from None


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


def center_crop_arr(pil_image, image_size):
    """
    Resize so the short side is image_size, then cut the central image_size square.

    :return: an HWC uint8 array of shape (image_size, image_size, channels).
    """
    arr = np.array(_resize_short_side(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """
    Resize so the short side is a random length in [ceil(image_size / max_crop_frac),
    ceil(image_size / min_crop_frac)], then cut an image_size square at a random place.

    :return: an HWC uint8 array of shape (image_size, image_size, channels).
    """
    shortest = math.ceil(image_size / max_crop_frac)
    longest = math.ceil(image_size / min_crop_frac)
    short_side = random.randrange(shortest, longest + 1)
    arr = np.array(_resize_short_side(pil_image, short_side))
    top = random.randrange(arr.shape[0] - image_size + 1)
    left = random.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def read_image_folder(data_dir, image_size, class_cond=False, limit=None):
    """
    Read the images of a folder as they are, for tools that compare outputs with them pixel by
    pixel (e.g. DDIM inversion): no resizing, cropping or flipping, so every image must already
    be image_size x image_size.

    :param data_dir: the folder, searched recursively, files in sorted order (as load_data).
    :param image_size: the side every image must have.
    :param class_cond: if True, also return labels from the file names (as load_data).
    :param limit: read only the first `limit` files (None or 0: all).
    :return: (uint8 array [N, image_size, image_size, 3], int64 labels [N] or None).
    :raises ValueError: naming the first image of another size, or an unreadable one.
    """
    paths = list_image_files_recursively(data_dir)
    labels = None
    if class_cond:
        labels, _ = class_labels_from_paths(paths)
    if limit:
        paths = paths[:limit]
        labels = None if labels is None else labels[:limit]
    images = []
    for path in paths:
        pil_image = _read_image(path)
        if pil_image.size != (image_size, image_size):
            width, height = pil_image.size
            other = f", or a model trained at --image_size {width}" if width == height else ""
            raise ValueError(
                f"image {path} is {width}x{height} but --image_size is {image_size}: give "
                f"{image_size}x{image_size} images{other}"
            )
        images.append(np.asarray(pil_image, dtype=np.uint8))
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


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False):
    """
    Batches of large images with their area-downsampled versions as model_kwargs["low_res"]
    (what super_res_train.py trains on; the reference defined it in that script).
    """
    if small_size > large_size:
        raise ValueError(f"--small_size {small_size} is larger than --large_size {large_size}")
    data = load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=large_size,
        class_cond=class_cond,
    )
    # A mapped stream rather than a generator, so that its position saves with the checkpoint.
    return MappedBatches(data, functools.partial(_with_low_res, small_size=small_size))



def _with_low_res(large_batch, model_kwargs, small_size):
    model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
    return large_batch, model_kwargs
