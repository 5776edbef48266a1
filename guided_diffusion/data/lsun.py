"""
An LSUN category as an image folder: the lmdb database of the LSUN download tools (e.g.
bedroom_train_lmdb, each value an encoded webp/jpeg image) written as <prefix>_<index>.png, resized
as the reference prepared the data of its LSUN models: scaled with a BOX filter so the short side
is image_size, then the centre image_size square.

Needs the lmdb package (pip install 'guided-diffusion[lsun]').
"""

import io
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from ..errors import ScriptError, UnreadableImageError


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise ScriptError(
            "reading LSUN needs the lmdb package: pip install 'guided-diffusion[lsun]' (or "
            "pip install lmdb)"
        ) from None
    return lmdb


def lsun_crop(pil_image, image_size):
    """The reference's LSUN preprocessing: BOX-resize the short side to image_size, centre crop."""
    width, height = pil_image.size
    scale = image_size / min(width, height)
    pil_image = pil_image.resize(
        (int(round(scale * width)), int(round(scale * height))), resample=Image.BOX
    )
    arr = np.array(pil_image.convert("RGB"))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def read_lmdb_images(lmdb_path, image_size, limit=None):
    """Yield (key, uint8 image [image_size, image_size, 3]) in the database's key order."""
    lmdb = _lmdb()
    if not os.path.exists(lmdb_path):
        raise FileNotFoundError(f"lmdb database not found: {lmdb_path}")
    try:
        env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False, max_readers=64,
                        subdir=os.path.isdir(lmdb_path))
    except lmdb.Error as exc:
        raise ScriptError(f"{lmdb_path} is not an lmdb database ({exc})") from None
    try:
        with env.begin(write=False) as txn:
            for count, (key, value) in enumerate(txn.cursor()):
                if limit is not None and count >= limit:
                    break
                try:
                    with Image.open(io.BytesIO(value)) as opened:
                        opened.load()
                        image = lsun_crop(opened, image_size)
                except (OSError, ValueError, SyntaxError) as exc:
                    raise UnreadableImageError(
                        f"entry {key.decode(errors='replace')} of {lmdb_path} is not an image "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                    ) from None
                yield key, image
    finally:
        env.close()


def write_lsun(lmdb_path, out_dir, image_size=256, prefix="bedroom", limit=None):
    """
    Export an LSUN lmdb as out_dir/<prefix>_<index:07d>.png, written into a temporary folder
    renamed at the end (out_dir is complete or absent).

    :return: the number of images written.
    :raises ScriptError: without lmdb, for a non-empty out_dir, or a bad database.
    """
    if image_size < 1:
        raise ScriptError(f"--image_size must be positive, got {image_size}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ScriptError(f"{out_dir} exists and is not empty: pass a new output folder")
    _lmdb()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".")
    count = 0
    try:
        for _, image in read_lmdb_images(lmdb_path, image_size, limit=limit):
            Image.fromarray(image).save(os.path.join(tmp, f"{prefix}_{count:07d}.png"))
            count += 1
        if count == 0:
            raise ScriptError(f"{lmdb_path} holds no images")
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count
