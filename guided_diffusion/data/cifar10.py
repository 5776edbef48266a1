"""
CIFAR-10 as image folders: the "CIFAR-10 python version" archive its authors distribute
(cifar-10-python.tar.gz: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta, each a
pickled dict) written as <out_dir>/train/<class>_<index>.png and <out_dir>/test/... , the naming
load_data reads classes from (class names "airplane" ... "truck" sort in label order).

The batches are pickles. Unpickling can run code, so they are read with an unpickler that only
rebuilds what the format holds (dicts, lists, bytes, numpy arrays) and refuses anything else.
"""

import io
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings

import numpy as np
from PIL import Image

from ..errors import ScriptError

SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"
SIDE = 32

# What a CIFAR batch pickle may name: numpy's array and scalar reconstruction, nothing else.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),  # a numpy int label in a re-pickled batch
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise ScriptError(
                f"the archive's pickle names {module}.{name}, which a CIFAR-10 batch never "
                "holds: refusing to unpickle it (is this the python version of CIFAR-10?)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core under numpy 2
            return super().find_class(module, name)


def load_pickle(data):
    """Unpickle one batch (bytes) as the archive's Python 2 pickles load: byte-string keys."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        if isinstance(exc, ScriptError):
            raise
        raise ScriptError(f"cannot unpickle a CIFAR-10 batch ({exc})") from None
    if not isinstance(obj, dict):
        raise ScriptError("a CIFAR-10 batch must be a pickled dict")
    # Keys are bytes in the distributed archive (Python 2 str); accept str keys as well.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _member(archive, name):
    for member in archive.getmembers():
        if member.isfile() and os.path.basename(member.name) == name:
            return archive.extractfile(member).read()
    raise ScriptError(
        f"the archive has no {name}: pass cifar-10-python.tar.gz (the python version)"
    )


def read_split(archive, split, label_names):
    """Yield (uint8 image [32, 32, 3], class name) of a split, in the archive's order."""
    for batch_name in SPLITS[split]:
        batch = load_pickle(_member(archive, batch_name))
        data = np.asarray(batch.get("data"))
        labels = batch.get("labels")
        if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or labels is None:
            raise ScriptError(
                f"{batch_name} is not a CIFAR-10 batch (data {data.shape}, labels "
                f"{'missing' if labels is None else 'present'})"
            )
        if len(labels) != len(data):
            raise ScriptError(f"{batch_name} holds {len(data)} images but {len(labels)} labels")
        # Each row: the 1024 red values, then green, then blue, each 32 rows of 32.
        images = data.astype(np.uint8).reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
        for image, label in zip(images, labels):
            if not 0 <= int(label) < len(label_names):
                raise ScriptError(f"{batch_name} has label {label} outside the {len(label_names)} classes")
            yield image, label_names[int(label)]


def write_cifar10(archive_path, out_dir, limit=None):
    """
    Convert the archive into out_dir/train and out_dir/test, written into a temporary folder
    beside out_dir and renamed at the end, so out_dir is complete or absent.

    :param limit: write only the first `limit` images of each split (None: all).
    :return: {split: number of images written}.
    :raises FileNotFoundError: when the archive is missing.
    :raises ScriptError: when it is not the python version of CIFAR-10, or out_dir is not empty.
    """
    if not os.path.isfile(archive_path):
        raise FileNotFoundError(f"archive not found: {archive_path}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ScriptError(f"{out_dir} exists and is not empty: pass a new --out_dir")
    try:
        archive = tarfile.open(archive_path)
    except (tarfile.TarError, OSError) as exc:
        raise ScriptError(
            f"{archive_path} is not a tar archive ({exc}): pass cifar-10-python.tar.gz"
        ) from None
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".")
    counts = {}
    try:
        with archive:
            meta = load_pickle(_member(archive, META))
            label_names = [n.decode() if isinstance(n, bytes) else str(n)
                           for n in meta.get("label_names", [])]
            if not label_names:
                raise ScriptError(f"{META} has no label_names: is this CIFAR-10's python version?")
            for split in SPLITS:
                folder = os.path.join(tmp, split)
                os.makedirs(folder)
                count = 0
                for image, name in read_split(archive, split, label_names):
                    if limit is not None and count >= limit:
                        break
                    Image.fromarray(image).save(os.path.join(folder, f"{name}_{count:05d}.png"))
                    count += 1
                counts[split] = count
        if os.path.exists(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
