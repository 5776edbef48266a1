"""
What the editing scripts (image_inpaint.py, image_edit.py) share: reading the images and masks to
edit, the guidance of a model (class labels, classifier-free guidance, a noisy classifier), and
writing the results (one PNG per input plus the reference's samples_NxHxWx3.npz).

Images: PNG (or JPEG, GIF) files, or folders of them read recursively in sorted order. Grey
images are used as RGB with the grey value in every channel, as the training data loader does;
an image with another number of channels (an alpha channel, CMYK) is refused. An image of
another size than --image_size is resized and centre-cropped as the training data is
(image_datasets.center_crop_arr). A mask is read as grey levels, white (>= 128) = keep; it must
have its image's size and is resized and cropped with it.
"""

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from .. import dist_util, logger
from ..diffusion.guidance import classifier_free_guidance, make_classifier_cond_fn
from ..errors import ScriptError, UnreadableImageError
from ..image_datasets import center_crop_arr, list_image_files_recursively, wide_grey_to_8bit
from ..runtime.files import write_json
from ..runtime.kept_rounds import run_passes
from . import files as sample_files

__all__ = [
    "check_class_label",
    "edit_names",
    "finished_edits",
    "guided_model",
    "input_paths",
    "make_labels",
    "read_edit_images",
    "read_inpainting_inputs",
    "run_in_batches",
    "write_edits",
]

# PIL modes by the number of image channels they hold; 1 and 3 are what the models take.
_GREY_MODES = ("L", "1")
# Colour without alpha (a JPEG may decode as YCbCr): made RGB, as training does.
_COLOUR_MODES = ("RGB", "YCbCr", "LAB", "HSV")


def input_paths(path, flag="--input"):
    """
    The image files a flag names: the file itself, or every image in a folder (sorted, recursive).

    :raises ScriptError: for an empty flag; FileNotFoundError for a missing path.
    """
    if not path:
        raise ScriptError(f"pass {flag} FILE.png or {flag} FOLDER (the images to edit)")
    if os.path.isdir(path):
        return list_image_files_recursively(path, flag=flag)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    return [path]


def _open(path):
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(f"cannot read image {path} ({reason})") from None


def _rgb(image, path):
    """The image as RGB, refusing channel counts the models cannot take."""
    # Wide grey (16-bit, 32-bit) to 8 bits as training reads it (image_datasets.read_image).
    image = wide_grey_to_8bit(image)
    if image.mode == "P":
        # A palette image is colour; with a transparent entry it carries an alpha channel.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _GREY_MODES or image.mode in _COLOUR_MODES:
        return image.convert("RGB")
    bands = len(image.getbands())
    raise ScriptError(
        f"image {path} has {bands} channel{'s' if bands != 1 else ''} ({image.mode}); the model "
        "takes RGB (3) or grey (1): save it without an alpha channel, e.g. as an RGB PNG"
    )


def _fit(image, image_size):
    if image.size == (image_size, image_size):
        return np.asarray(image, dtype=np.uint8)
    return center_crop_arr(image, image_size)


def read_edit_images(path, image_size):
    """
    :return: (uint8 images [N, image_size, image_size, 3], their paths).
    """
    paths = input_paths(path)
    images = [_fit(_rgb(_open(p), p), image_size) for p in paths]
    return np.stack(images), paths


def _mask_paths(mask, image_paths, image_root):
    """One mask path per image: the one file, or the file of the same relative name."""
    if not mask:
        raise ScriptError("pass --mask FILE.png or --mask FOLDER (white = keep)")
    if not os.path.isdir(mask):
        if not os.path.exists(mask):
            raise FileNotFoundError(f"--mask {mask}: no such file or folder")
        return [mask] * len(image_paths)
    by_name = {}
    for path in list_image_files_recursively(mask, flag="--mask"):
        by_name[os.path.splitext(os.path.relpath(path, mask))[0]] = path
    found = []
    base = image_root if os.path.isdir(image_root) else os.path.dirname(image_root)
    for image_path in image_paths:
        name = os.path.splitext(os.path.relpath(image_path, base))[0]
        if name not in by_name:
            raise ScriptError(
                f"no mask for image {image_path} in {mask}: give each image a mask of the same "
                f"name ({name}.png), or pass one mask file for all"
            )
        found.append(by_name[name])
    return found


def read_inpainting_inputs(images, mask, image_size, invert_mask=False):
    """
    Read the images to inpaint and their masks.

    :param images: an image file or folder.
    :param mask: a mask file (for every image) or a folder of masks named like the images.
    :param invert_mask: if True, black = keep instead of white.
    :return: (uint8 images [N, S, S, 3], bool masks [N, S, S] (True = keep), image paths).
    :raises ScriptError: for a mask of another size than its image, or one that keeps every
        pixel or none of them.
    """
    image_paths = input_paths(images)
    mask_paths = _mask_paths(mask, image_paths, images)
    arrays, masks = [], []
    for image_path, mask_path in zip(image_paths, mask_paths):
        image = _rgb(_open(image_path), image_path)
        mask_image = _open(mask_path)
        if mask_image.size != image.size:
            raise ScriptError(
                f"mask {mask_path} is {mask_image.size[0]}x{mask_image.size[1]} but image "
                f"{image_path} is {image.size[0]}x{image.size[1]}: give a mask of the image's size"
            )
        grey = _fit(mask_image.convert("L"), image_size)
        keep = grey >= 128
        if invert_mask:
            keep = ~keep
        kind = "black" if invert_mask else "white"
        other = "False" if invert_mask else "True"
        if keep.all():
            raise ScriptError(
                f"mask {mask_path} keeps every pixel of {image_path} ({kind} = keep): nothing to "
                f"inpaint; mark the region to fill, or pass --invert_mask {other}"
            )
        if not keep.any():
            raise ScriptError(
                f"mask {mask_path} keeps no pixel of {image_path} ({kind} = keep): nothing to "
                f"inpaint from; mark the region to keep, or pass --invert_mask {other}"
            )
        arrays.append(_fit(image, image_size))
        masks.append(keep)
    return np.stack(arrays), np.stack(masks), image_paths


def check_class_label(class_label, num_classes):
    """:raises ScriptError: unless class_label is -1 (random) or a class index."""
    if not -1 <= class_label < num_classes:
        raise ScriptError(
            f"--class_label {class_label} is not a class of this model: pass 0 to "
            f"{num_classes - 1}, or -1 for random classes"
        )


def make_labels(count, *, class_label, num_classes, device):
    """
    Class labels of a batch: all `class_label`, or drawn with one torch.randint over the classes
    when class_label is -1 (as image_sample.py draws them, before the batch's noise).
    """
    if class_label < 0:
        return torch.randint(low=0, high=num_classes, size=(count,), device=device)
    return torch.full((count,), class_label, dtype=torch.long, device=device)


def guided_model(model, *, class_cond, guidance_scale, num_classes, classifier=None,
                 classifier_scale=1.0):
    """
    The model function and guidance gradient of an editing run.

    :return: (model_fn(x, t, y=None), cond_fn or None): classifier-free guidance when
        guidance_scale != 1 (the model itself at 1); the labels reach the model only when it is
        class-conditional, and always the classifier.
    """
    guided = classifier_free_guidance(model, guidance_scale, null_label=num_classes)

    def model_fn(x, t, y=None):
        if class_cond:
            return guided(x, t, y=y)
        return model(x, t)

    cond_fn = None
    if classifier is not None:
        cond_fn = make_classifier_cond_fn(classifier, classifier_scale)
    return model_fn, cond_fn


def run_in_batches(images_uint8, batch_size, edit_batch, *, labels_needed, class_label,
                   num_classes, masks=None, progress=True, kept=None):
    """
    Edit the images batch after batch on the compute device.

    :param edit_batch: edit_batch(x_start, model_kwargs, mask or None) -> float NCHW in [-1, 1].
    :param kept: an opened KeptRounds of one pass over the images in batches of batch_size
        (sampling.loop.kept_pass_rounds): each finished batch is kept, and the batches an
        earlier run of the same command kept are not edited again; None: nothing is kept.
    :return: (uint8 edited images [N, S, S, 3], int64 labels or None).
    """
    from tqdm.auto import tqdm

    device = dist_util.dev()
    total = len(images_uint8)
    bar = tqdm(total=total, disable=not progress, desc="editing", unit="image",
               initial=0 if kept is None else min(kept.kept * batch_size, total))

    def edit(_pass, items):
        chunk = images_uint8[items]
        model_kwargs = {}
        if labels_needed:
            model_kwargs["y"] = make_labels(len(chunk), class_label=class_label,
                                            num_classes=num_classes, device=device)
        x_start = sample_files.uint8_to_model_input(chunk).to(device)
        mask = None
        if masks is not None:
            mask = torch.from_numpy(masks[items]).unsqueeze(1).to(device)
        edited = sample_files.to_uint8(edit_batch(x_start, model_kwargs, mask).float()).cpu().numpy()
        if mask is not None:
            # The kept pixels are the input's bytes: the library keeps them exactly in float, but
            # the reference's float-to-uint8 truncation lowers some values (1 to 63) by one.
            keep = masks[items]
            edited[keep] = chunk[keep]
        bar.update(len(chunk))
        logger.log(f"edited {items.stop} of {total} images")
        return {"images": torch.from_numpy(edited), "labels": model_kwargs.get("y")}

    try:
        arrays = run_passes(kept, [None], total, batch_size, edit)[None]
    finally:
        bar.close()
    return arrays["images"], arrays.get("labels")


# Beside the edited images: which input each one was made from (names may carry a suffix).
SOURCES = "sources.json"


def edit_names(paths):
    """
    The output file name of each input: its own name (stem + ".png"), or stem_k.png, k the
    smallest number that makes it differ from every other input's stem and every name given
    before (compared without case, as on macOS and Windows file systems): inputs a/x.png,
    b/x.png and c/x_1.png give x.png, x_2.png and x_1.png.
    """
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    own = {stem.casefold() for stem in stems}
    taken, names = set(), []
    for stem in stems:
        name = stem
        if name.casefold() in taken:
            k = 1
            while f"{stem}_{k}".casefold() in taken or f"{stem}_{k}".casefold() in own:
                k += 1
            name = f"{stem}_{k}"
        taken.add(name.casefold())
        names.append(name + ".png")
    return names


def _sources(folder):
    """The {output name: input path} an earlier run wrote in folder, or {}."""
    try:
        with open(os.path.join(folder, SOURCES)) as f:
            sources = json.load(f)
    except (OSError, ValueError):
        return {}
    return sources if isinstance(sources, dict) else {}


def finished_edits(out_dir, subfolder, paths, shape):
    """
    The first file of a finished editing result that a run on `paths` would replace (the npz,
    its grid, one of its images, the sources file), or None.

    :param shape: the npz's images' shape (N, S, S, 3).
    """
    found = sample_files.finished_samples(out_dir, shape)
    if found:
        return found
    folder = os.path.join(out_dir, subfolder)
    for name in (*edit_names(paths), SOURCES):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def write_edits(images_uint8, labels, paths, out_dir, subfolder):
    """
    Write each edited image as out_dir/subfolder/<its input name>.png (edit_names), which input
    each came from as subfolder/sources.json, and all of them as out_dir/samples_NxHxWx3.npz
    (arr_1: the labels when there are any) plus a PNG grid; the npz last, as the mark of a
    complete result.

    The images go to a temporary folder first and are moved in together; an earlier result's
    images there (those its sources.json names) that this run did not write again are removed,
    and no other file is touched.

    :return: the npz path.
    """
    folder = os.path.join(out_dir, subfolder)
    names = edit_names(paths)
    earlier = _sources(folder)
    tmp = sample_files.make_temporary_folder(folder)
    try:
        for image, name in zip(images_uint8, names):
            sample_files.write_image_file(os.path.join(tmp, name), image)
        write_json(os.path.join(tmp, SOURCES), dict(zip(names, map(os.fspath, paths))))
        sample_files.move_files_in(tmp, folder, [*names, SOURCES])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in set(earlier) - set(names):
        stale = os.path.join(folder, os.path.basename(name))
        if os.path.isfile(stale):
            os.remove(stale)
    return sample_files.save_samples(images_uint8, labels, out_dir)
