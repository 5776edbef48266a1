"""
Labelled image data for the conditional GAN: class-prefixed image folders (through
image_datasets) and the MNIST IDX files, as uint8 arrays or as endless training batches.

Everything here hands out images in the convention of the diffusion code: float NCHW RGB in
[-1, 1] for batches, uint8 NHWC for whole arrays.
"""

import gzip
import os

import numpy as np
import torch

from .. import dist_util
from ..image_datasets import (
    ALWAYS_LABELLED,
    ImageDataset,
    class_labels_from_paths,
    list_image_files_recursively,
    load_data,
)
from ..runtime.resumable_data import ResumableBatches, epoch_order
from ..sampling.files import to_uint8

# The four files of LeCun's MNIST distribution; both the "-idx3-" and ".idx3-" spellings occur.
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

# The split of the GAN papers' MNIST protocol: train on the first 50000 training images,
# validate on the last 10000, test on the 10000 test images.
MNIST_TRAIN_SIZE = 50000


def _find_mnist_file(folder, names):
    for name in names:
        for suffix in ("", ".gz"):
            path = os.path.join(folder, name + suffix)
            if os.path.isfile(path):
                return path
    return None


def is_mnist_dir(folder):
    """
    :param folder: a folder path.
    :return: True when it holds the MNIST training images file (IDX format, optionally .gz).
    """
    return bool(folder) and os.path.isdir(folder) and (
        _find_mnist_file(folder, MNIST_FILES["train_images"]) is not None
    )


def _read_idx(path, expected_magic):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path} is too short to be an IDX file")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path} is not an MNIST IDX file of the expected kind (magic {magic}, expected "
            f"{expected_magic}): check the file names"
        )
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise ValueError(
            f"{path} is truncated: expected {count} values, found {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def read_mnist(folder):
    """
    Read the MNIST IDX files of a folder into the GAN papers' train/valid/test split.

    :param folder: a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte,
        t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally gzipped).
    :return: dict split name -> (uint8 images [N, 28, 28, 1], int64 labels [N]) for "train"
        (first 50000 training images), "valid" (last 10000) and "test".
    """
    paths = {}
    for key, names in MNIST_FILES.items():
        path = _find_mnist_file(folder, names)
        if path is None:
            raise FileNotFoundError(f"MNIST file {names[0]}[.gz] not found in {folder}")
        paths[key] = path
    train_x = _read_idx(paths["train_images"], 2051)
    train_y = _read_idx(paths["train_labels"], 2049).astype(np.int64)
    test_x = _read_idx(paths["test_images"], 2051)
    test_y = _read_idx(paths["test_labels"], 2049).astype(np.int64)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"MNIST image and label files in {folder} have different lengths")
    cut = min(MNIST_TRAIN_SIZE, len(train_x))
    return {
        "train": (train_x[:cut, :, :, None], train_y[:cut]),
        "valid": (train_x[cut:, :, :, None], train_y[cut:]),
        "test": (test_x[:, :, :, None], test_y),
    }


def load_labeled_images(data_dir, *, image_size, shard=0, num_shards=1):
    """
    Read a class-prefixed image folder ("<class>_<anything>.png") completely into memory,
    resized and centre-cropped exactly as load_data does.

    :param data_dir: the folder (searched recursively).
    :param image_size: side of the square images produced.
    :param shard: read only files shard, shard + num_shards, ... (for distributed training).
    :param num_shards: number of shards.
    :return: (uint8 images [N, image_size, image_size, 3], int64 labels [N], class names).
    """
    paths = list_image_files_recursively(data_dir)
    labels, class_names = class_labels_from_paths(paths, ALWAYS_LABELLED)
    dataset = ImageDataset(
        image_size, paths, classes=labels, shard=shard, num_shards=num_shards, random_flip=False
    )
    images = np.empty((len(dataset), image_size, image_size, 3), dtype=np.uint8)
    out_labels = np.empty(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        arr, cond = dataset[i]
        images[i] = to_uint8(torch.from_numpy(arr)[None])[0].numpy()
        out_labels[i] = cond["y"]
    return images, out_labels, class_names


def uint8_to_float(images):
    """
    Inverse of sample_files.to_uint8 up to quantisation.

    :param images: uint8 array or tensor [N, H, W, C].
    :return: float32 tensor [N, C, H, W] in [-1, 1].
    """
    images = torch.as_tensor(np.asarray(images))
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def array_batches(images, labels, *, batch_size, random_flip=False, seed=None):
    """
    Endless shuffled batches from arrays held in memory.

    Each epoch's order and flips are a pure function of (seed, rank, epoch) (as load_data's), and
    the stream's position saves and restores (state_dict / load_state_dict), so a resumed run
    continues with the batches the interrupted one would have drawn.

    :param images: uint8 [N, H, W, C].
    :param labels: int64 [N].
    :param batch_size: images per batch; incomplete batches at the end of an epoch are dropped.
    :param random_flip: flip each image horizontally with probability 1/2.
    :param seed: seed of order and flips; None: torch.initial_seed() (the scripts seed torch
        with --seed + rank).
    :return: an iterator of (float NCHW in [-1, 1], {"y": int64 tensor}) that never ends.
    """
    if len(images) < batch_size:
        raise ValueError(
            f"only {len(images)} training images for batch_size {batch_size}: lower --batch_size"
        )
    return ArrayBatches(
        uint8_to_float(images),
        torch.as_tensor(np.asarray(labels), dtype=torch.int64),
        batch_size=batch_size,
        random_flip=random_flip,
        seed=seed,
    )


class ArrayBatches(ResumableBatches):
    """
    ResumableBatches over tensors in memory: batches are cut in the consumer (no loader workers)
    and flipped by their items' seeds, so nothing draws from torch's global stream.
    """

    def __init__(self, data, targets, *, batch_size, random_flip=False, seed=None):
        super().__init__(_TensorItems(data, targets), batch_size, seed=seed, num_workers=0)
        self.data = data
        self.targets = targets
        self.random_flip = random_flip
        self._epoch_order = None

    def __next__(self):
        if self.offset >= self.batches_per_epoch:
            self.epoch += 1
            self.offset = 0
        key = (self.seed, self.rank, self.epoch)
        if self._epoch_order is None or self._epoch_order[0] != key:
            order, item_seeds = epoch_order(*key, len(self.data))
            self._epoch_order = (key, torch.from_numpy(order), item_seeds)
        _, order, item_seeds = self._epoch_order
        start = self.offset * self.batch_size
        idx = order[start : start + self.batch_size]
        batch = self.data[idx]
        if self.random_flip:
            # The item seeds are uniform 63-bit numbers, so their lowest bit is a fair coin that
            # belongs to the item's place in the stream.
            flip = torch.from_numpy(item_seeds[start : start + self.batch_size] & 1).bool()
            batch[flip] = batch[flip].flip(-1)
        self.offset += 1
        return batch, {"y": self.targets[idx]}


class _TensorItems(torch.utils.data.Dataset):
    def __init__(self, data, targets):
        self.data, self.targets = data, targets

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index], {"y": self.targets[index]}


def cgan_training_batches(*, data_dir, batch_size, image_size, random_flip=False, preload=True):
    """
    Endless labelled training batches for this rank.

    :param data_dir: a class-prefixed image folder, or a folder with the MNIST IDX files (then
        the first 50000 training images are used and image_size must be 28).
    :param batch_size: images per batch on this rank.
    :param image_size: side of the images.
    :param random_flip: flip horizontally with probability 1/2 (off by default: flipping changes
        the meaning of digits and letters).
    :param preload: read this rank's images into memory once instead of decoding the files every
        epoch (much faster for small datasets such as digits; needs the images to fit in RAM).
    :return: a generator of (float NCHW RGB in [-1, 1], {"y": int64 tensor}) batches.
    """
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    if is_mnist_dir(data_dir):
        if image_size != 28:
            raise ValueError(f"MNIST images are 28x28: pass --image_size 28 (got {image_size})")
        images, labels = read_mnist(data_dir)["train"]
        images = np.repeat(images, 3, axis=3)
        return array_batches(
            images[rank::world], labels[rank::world], batch_size=batch_size, random_flip=random_flip
        )
    if preload:
        images, labels, _ = load_labeled_images(
            data_dir, image_size=image_size, shard=rank, num_shards=world
        )
        return array_batches(images, labels, batch_size=batch_size, random_flip=random_flip)
    return load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=image_size,
        class_cond=True,
        random_flip=random_flip,
    )


def count_classes(data_dir):
    """
    :param data_dir: a class-prefixed image folder or an MNIST folder.
    :return: the number of classes found in it.
    """
    if is_mnist_dir(data_dir):
        return 10
    _, class_names = class_labels_from_paths(list_image_files_recursively(data_dir),
                                             ALWAYS_LABELLED)
    return len(class_names)
