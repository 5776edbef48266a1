"""
Writing a VAE's outputs: prior samples (the samples_NxHxWx3.npz convention of the diffusion
scripts), reconstructions of real images, and an interpolation between two encoded images.
Images are the decoder means E[x|z] (grey values, not binarised draws), saved as 3-channel uint8.
Also loading a checkpoint with the architecture flags it records (vae_from_checkpoint).
"""

import os

import numpy as np
import torch

from .. import dist_util
from ..cli.flags import checkpoint_flags
from ..image_datasets import class_labels_from_paths, list_image_files_recursively
from ..runtime.checkpoints import load_checkpoint
from ..runtime.files import atomic_write
from ..runtime.kept_rounds import KeptRounds
from ..sampling.files import make_grid_png, save_samples, to_uint8
from .networks import ARCH_FLAGS, check_vae_checkpoint, folder_batches, interpolate, load_vae
from .networks import spread_indices, vae_defaults


def vae_tool_defaults(**own):
    """
    The flags of the VAE tools that read a trained model (vae_sample.py, vae_latent_pca.py):
    --model_path, --data_dir, --out_dir and --log_dir, the tool's own flags, then the
    architecture flags (vae_defaults), which the checkpoint's stored flags override.

    :param own: the tool's own flags with their defaults.
    """
    defaults = dict(model_path="", data_dir="", **own, out_dir="", log_dir="")
    defaults.update(vae_defaults())
    return defaults


def vae_from_checkpoint(path, args, given):
    """
    Load a VAE checkpoint with the architecture flags it records, instead of asking for them
    again; they are put into args.

    :param path: a vaeNNNNNN.pt file of vae_train.py.
    :param args: the parsed flags (the ARCH_FLAGS are updated in place).
    :param given: the flags given on the command line (cli.flags.explicit_flags): one that
        contradicts the checkpoint is refused, naming the checkpoint's value.
    :return: the model (on the CPU).
    :raises ScriptError / ValueError: without a path, for another kind of file, or a clash.
    """
    if not path:
        raise ValueError("pass --model_path, a vaeNNNNNN.pt file written by scripts/vae_train.py")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("flags"), dict):
        check_vae_checkpoint(state, {}, path)  # raises: not a VAE checkpoint
    flags = checkpoint_flags(state["flags"], args, given, ARCH_FLAGS, path)
    return load_vae(state, flags, path)


def unit_to_uint8(x):
    """[0, 1] NCHW float -> uint8 NHWC with 3 channels (grayscale is repeated)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return to_uint8(x * 2.0 - 1.0).cpu().numpy()


@torch.no_grad()
def sample_from_prior(model, *, num_samples, batch_size, out_dir, save_images=False, kept=None,
                      also_write=None):
    """
    Decode draws z ~ N(0, I) on every rank, gather them in rank order and save them on rank 0.

    For a class-conditional model the labels of each batch are drawn uniformly before its z.

    :param save_images: also write one PNG per sample (--save_images; sampling.files.save_samples).
    :param kept: an opened runtime.kept_rounds.KeptRounds of the run's rounds
        (ceil(num_samples / (batch_size * ranks)), see sampling.loop.keep_sample_rounds): each
        round is kept as it finishes, those an earlier run of the same command kept are not
        drawn again, and the samples are written through it; None: nothing is kept.
    :param also_write: a function rank 0 calls after the samples are written, for the run's
        other outputs (they then belong to the result the kept rounds make).
    :return: the npz path on rank 0, else None.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError("--num_samples and --batch_size must be at least 1")
    device = dist_util.dev()
    per_round = batch_size * dist_util.get_world_size()
    rounds = -(-num_samples // per_round)
    if kept is None:
        kept = KeptRounds(None, rounds, per_round=per_round, total=num_samples)

    def make_round(_index):
        y = None
        if model.class_cond:
            y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        x = unit_to_uint8(model.sample(batch_size, y, device=device))
        return {"images": torch.from_numpy(x).to(device), "labels": y}

    kept.run(make_round)
    arrays = kept.arrays()

    def write():
        labels = arrays.get("labels")
        path = save_samples(arrays["images"][:num_samples],
                            None if labels is None else labels[:num_samples], out_dir,
                            save_images=save_images)
        if also_write is not None:
            also_write()
        return path

    return kept.finish(write)


def _load_images(model, data_dir, indices=None):
    """Chosen images of a folder (sorted order) as [0, 1] tensors, with labels for a CVAE."""
    paths = list_image_files_recursively(data_dir)
    if indices is not None:
        paths = [paths[i] for i in indices]
    labels = class_labels_from_paths(paths)[0] if model.class_cond else None
    batches = list(folder_batches(paths, image_size=model.image_size, batch_size=len(paths), labels=labels))
    x, y = batches[0]
    device = next(model.parameters()).device
    return model.prepare_input(x.to(device)), None if y is None else y.to(device)


@torch.no_grad()
def save_reconstructions(model, data_dir, num_images, out_dir):
    """
    Reconstruct ``num_images`` images spread evenly over the sorted folder (decoding the
    posterior mean) and write reconstructions.npz (originals, reconstructions[, labels]) and
    reconstructions.png: pairs original | reconstruction, four pairs per row.

    :return: the npz path.
    """
    if num_images < 1:
        raise ValueError(f"--num_recon must be at least 1, got {num_images}")
    total = len(list_image_files_recursively(data_dir))
    x, y = _load_images(model, data_dir, spread_indices(total, num_images))
    originals = unit_to_uint8(x)
    recons = unit_to_uint8(model.reconstruct(x, y))
    pairs = np.stack([originals, recons], axis=1).reshape(-1, *originals.shape[1:])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "reconstructions.npz")
    extra = {} if y is None else dict(labels=y.cpu().numpy().astype(np.int64))
    atomic_write(path, lambda f: np.savez(f, originals=originals, reconstructions=recons, **extra))
    make_grid_png(pairs, os.path.join(out_dir, "reconstructions.png"), nrow=min(8, len(pairs)))
    return path


@torch.no_grad()
def save_interpolation(model, data_dir, steps, out_dir):
    """
    Interpolate linearly between the posterior means of the first and the last image of the
    sorted folder (for the digits: a 0 and a 9). Writes interpolation.npz (images: the decoded
    steps, endpoints: the two originals) and interpolation.png (original, steps, original).

    :return: the npz path.
    """
    total = len(list_image_files_recursively(data_dir))
    if total < 2:
        raise ValueError(f"interpolation needs at least 2 images in {data_dir}, found {total}")
    x, y = _load_images(model, data_dir, [0, total - 1])
    ya, yb = (None, None) if y is None else (y[:1], y[1:])
    path_images = unit_to_uint8(interpolate(model, x[:1], x[1:], steps, ya, yb))
    ends = unit_to_uint8(x)
    row = np.concatenate([ends[:1], path_images, ends[1:]])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "interpolation.npz")
    atomic_write(path, lambda f: np.savez(f, images=path_images, endpoints=ends))
    make_grid_png(row, os.path.join(out_dir, "interpolation.png"), nrow=len(row))
    return path
