"""
Where the evaluator's images come from: an .npz batch (arr_0, streamed, see npz.py) or a folder of
image files, read in batches so that neither has to sit in memory at once. Both give uint8 RGB
images [B, H, W, 3]: grey images (one channel, from --in_channels 1 models or grey files) are
repeated into three channels, which is how an RGB network such as Inception sees a grey picture.
"""

import os

import numpy as np

from ..errors import ScriptError
from ..image_datasets import list_image_files_recursively, read_image
from ..runtime.files import file_kind
from .npz import NpzArrayStream, npz_keys


def is_image_folder(path):
    return os.path.isdir(path)


def check_batch_path(path):
    """
    Fail early, in one line, on a batch that cannot be read: a missing path, a file that is not
    an npz (an image, say), a folder without images.
    """
    if os.path.isdir(path):
        # Raises on a folder without images (the evaluator's batches are positional arguments).
        list_image_files_recursively(path, flag="the batch argument")
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such batch file or folder: {path}")
    kind = file_kind(path)
    if kind is not None:
        raise ScriptError(
            f"{path} is {kind}: a batch is an npz (arr_0: uint8 N x H x W x 3 images) or a "
            "folder of images"
        )
    npz_keys(path)


class ImageFolderStream:
    """
    The image files of a folder (recursively, sorted, as load_data lists them) as uint8 RGB
    batches. Every image must have the size of the first: the evaluator compares images as they
    are, and a folder of mixed sizes needs the resize and crop of training first
    (evaluations/make_ref_batch.py).

    Use as a context manager, like NpzArrayStream; ``len(stream)`` is the number of images and
    ``shape`` is (N, H, W, 3).
    """

    def __init__(self, *, path):
        self.path = path
        self.files = [f for f in list_image_files_recursively(path, flag="the batch argument")
                      if not f.endswith(".npy")]
        if not self.files:
            raise ScriptError(f"{path} holds no image files (.npy arrays are not images)")
        first = self._read(self.files[0])
        self.shape = (len(self.files), *first.shape)
        self.dtype = np.dtype(np.uint8)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __len__(self):
        return len(self.files)

    def _read(self, path):
        return np.asarray(read_image(path, 3), dtype=np.uint8)

    def batches(self, batch_size):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        height, width = self.shape[1:3]
        for start in range(0, len(self.files), batch_size):
            batch = []
            for path in self.files[start : start + batch_size]:
                image = self._read(path)
                if image.shape[:2] != (height, width):
                    raise ScriptError(
                        f"{path} is {image.shape[1]}x{image.shape[0]} but {self.files[0]} is "
                        f"{width}x{height}: the images of a folder batch must share one size; "
                        f"make one with python evaluations/make_ref_batch.py {self.path} OUT.npz "
                        "--image_size S"
                    )
                batch.append(image)
            yield np.stack(batch)


class _GreyToRGB:
    """An NpzArrayStream of one-channel images, given out as three equal channels."""

    def __init__(self, stream):
        self._stream = stream
        self.shape = (*stream.shape[:3], 3)
        self.dtype = stream.dtype

    def __len__(self):
        return len(self._stream)

    def batches(self, batch_size):
        for batch in self._stream.batches(batch_size):
            yield np.repeat(batch, 3, axis=-1)


class open_image_batch:
    """
    Open a batch for reading, as a context manager giving an object with len(), shape and
    batches(batch_size): an npz's arr_0, or a folder of images.

    :raises ValueError: when the npz holds no N x H x W x 1 or 3 images.
    """

    def __init__(self, path):
        self.path = path
        self._stream = None

    def __enter__(self):
        if is_image_folder(self.path):
            self._stream = ImageFolderStream(path=self.path)
            return self._stream
        self._stream = NpzArrayStream(path=self.path, name="arr_0").__enter__()
        shape = self._stream.shape
        if len(shape) != 4 or shape[-1] not in (1, 3):
            self._stream.__exit__(None, None, None)
            raise ValueError(
                f"{self.path}: arr_0 has shape {shape}, expected N x H x W x 3 images (or "
                "N x H x W x 1 grey ones)"
            )
        return _GreyToRGB(self._stream) if shape[-1] == 1 else self._stream

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)
        return False
