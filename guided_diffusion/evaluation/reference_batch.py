"""
A reference batch of one's own data for the evaluator: the images of a folder brought to the
training size exactly as load_data brings them (short side scaled with BOX halvings then bicubic,
centre crop; no flip), written as the reference's batches are (arr_0: uint8 N x H x W x 3, arr_1:
labels when asked), optionally with the Inception statistics of every image of the folder
(mu, sigma, mu_s, sigma_s), which the evaluator then reads instead of recomputing.

The npz is written as a stream (a 50k-image batch at 256x256 is 10 GB) into a temporary file that
is renamed when complete.
"""

import zipfile

import numpy as np
from tqdm.auto import tqdm

from ..errors import ScriptError
from ..image_datasets import (
    center_crop_arr,
    class_labels_from_paths,
    list_image_files_recursively,
    read_image,
)
from ..runtime.files import atomic_write
from ..runtime.shapes import image_hw
from .metrics import FIDStatistics


def spread_indices(total, count):
    """`count` indices spread evenly over range(total) (all of them when count is 0 or more)."""
    if not count or count >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))


def make_reference_batch(folder, out_path, image_size, class_cond=False, max_images=0,
                         evaluator=None, batch_size=64, progress=True):
    """
    Write a reference batch of the images of `folder`.

    :param folder: a folder of images, searched recursively (load_data's order).
    :param out_path: the .npz to write.
    :param image_size: the training --image_size (a side, or (height, width)).
    :param class_cond: also store the labels from the file names as arr_1.
    :param max_images: arr_0 holds at most this many images, spread evenly over the folder
        (0 = all); statistics always cover every image, as the reference's batches do.
    :param evaluator: an evaluation.evaluator.Evaluator to compute the statistics with, or None
        to store images only.
    :return: (out_path, number of images in arr_0, number of images in the statistics).
    :raises ScriptError / ValueError: for an empty folder, unreadable or unlabelled images.
    """
    paths = [p for p in list_image_files_recursively(folder, flag="the folder argument")
             if not p.lower().endswith(".npy")]
    if not paths:
        raise ScriptError(f"{folder} holds no image files (.npy arrays are not pictures)")
    if evaluator is not None and len(paths) < 2:
        raise ScriptError(f"{folder} holds {len(paths)} image: statistics need at least 2")
    labels = np.asarray(class_labels_from_paths(paths)[0], dtype=np.int64) if class_cond else None
    kept = spread_indices(len(paths), max_images)
    keep = np.zeros(len(paths), dtype=bool)
    keep[kept] = True
    height, width = image_hw(image_size)
    step = max(1, batch_size)

    def read(path):
        arr = center_crop_arr(read_image(path, 3), image_size)
        return np.asarray(arr, dtype=np.uint8)

    def write(f):
        pools, spatials = [], []
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False,
                    "shape": (len(kept), height, width, 3),
                }
                np.lib.format.write_array_header_2_0(member, header)
                with tqdm(total=len(paths), unit="img", disable=not progress) as bar:
                    for start in range(0, len(paths), step):
                        batch = np.stack([read(p) for p in paths[start : start + step]])
                        member.write(np.ascontiguousarray(batch[keep[start : start + step]]).tobytes())
                        if evaluator is not None:
                            pool, spatial = evaluator.compute_activations([batch])
                            pools.append(pool)
                            spatials.append(spatial)
                        bar.update(len(batch))
            extras = {}
            if labels is not None:
                extras["arr_1"] = labels[kept]
            if evaluator is not None:
                pool_stats = FIDStatistics.from_features(np.concatenate(pools))
                spatial_stats = FIDStatistics.from_features(np.concatenate(spatials))
                extras.update(mu=pool_stats.mu, sigma=pool_stats.sigma,
                              mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma)
            for name, array in extras.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)

    atomic_write(out_path, write)
    return out_path, len(kept), len(paths) if evaluator is not None else 0
