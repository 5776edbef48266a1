"""
Sampling the conditional GAN: balanced or fixed labels, samples drawn on every rank and gathered
in a fixed order, generators loaded from checkpoints, grids with one row per class, and the network flags the sampling scripts read from a checkpoint.
"""

import math

import torch

from .. import dist_util
from ..cli.flags import checkpoint_flags
from ..errors import ScriptError
from ..runtime.kept_rounds import KeptRounds
from .networks import cgan_defaults, create_cgan, sample_noise
from .training import check_checkpoint_flags, load_cgan_checkpoint

__all__ = ["balanced_labels", "generate_samples", "load_generator", "class_grid", "generator_flags"]


def balanced_labels(num_samples, num_classes, class_label=-1):
    """
    :param num_samples: how many labels.
    :param num_classes: number of classes.
    :param class_label: a fixed class, or -1 for 0, 1, ..., num_classes - 1, 0, 1, ... (balanced).
    :return: int64 tensor [num_samples].
    """
    if class_label >= num_classes:
        raise ValueError(f"--class_label {class_label} is not below --num_classes {num_classes}")
    if class_label >= 0:
        return torch.full((num_samples,), class_label, dtype=torch.int64)
    return torch.arange(num_samples, dtype=torch.int64) % num_classes



@torch.no_grad()
def generate_samples(
    generator,
    *,
    num_samples,
    num_classes,
    class_label=-1,
    batch_size=100,
    progress=False,
    keep_dropout=False,
    kept=None,
):
    """
    Draw class-conditional samples on every rank and gather them in a fixed order.

    The labels are balanced over classes (or all class_label). In each round every rank draws
    batch_size samples for its slice of the global label list, and the gathered result is the
    same list in order, so one process gives the same images as several (up to the noise).

    :param generator: a generator in eval mode (the EMA, usually).
    :param num_samples: total number of samples over all ranks.
    :param num_classes: number of classes.
    :param class_label: -1 for balanced classes, else the class of every sample.
    :param batch_size: samples per rank and round.
    :param progress: show a progress bar on rank 0.
    :param keep_dropout: leave the generator's dropout active while sampling. A generator trained
        with dropout can learn to draw its variety from the dropout masks rather than from z
        (we saw this with the paper's MLP on digits); this samples it as it was trained.
    :param kept: an opened runtime.kept_rounds.KeptRounds of the run's rounds
        (ceil(num_samples / (batch_size * ranks)), see sampling.loop.keep_sample_rounds): each
        round is kept as it finishes, and those an earlier run of the same command kept are not
        drawn again; None: nothing is kept.
    :return: (float NCHW RGB in [-1, 1] on the CPU, int64 labels), both of length num_samples;
        with kept rounds the images are on rank 0 only (None on the other ranks).
    """
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = next(generator.parameters()).device
    labels = balanced_labels(num_samples, num_classes, class_label)
    per_round = batch_size * world
    rounds = math.ceil(num_samples / per_round)
    if kept is None:
        kept = KeptRounds(None, rounds, per_round=per_round, total=num_samples)
    # Pad so every rank runs the same number of full batches (collectives need that).
    padded = balanced_labels(rounds * per_round, num_classes, class_label)
    dropouts = [m for m in generator.modules() if isinstance(m, torch.nn.Dropout)]
    modes = [m.training for m in dropouts]
    for m in dropouts:
        m.train(keep_dropout)
    bar = None
    if progress and dist_util.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, initial=kept.kept, desc="sampling", unit="batch")

    def make_round(r):
        start = r * per_round + rank * batch_size
        y = padded[start : start + batch_size].to(device)
        z = sample_noise(batch_size, generator.z_dim, device=device)
        images = generator.to_images(generator(z, y)).float()
        if bar is not None:
            bar.update(1)
        return {"images": images}

    try:
        kept.run(make_round)
    finally:
        for m, mode in zip(dropouts, modes):
            m.train(mode)
        if bar is not None:
            bar.close()
    arrays = kept.arrays()
    if arrays is None:
        return None, labels
    return torch.from_numpy(arrays["images"][:num_samples]), labels


def load_generator(path, model_flags, *, use_ema=True):
    """
    Build a generator from flags and load a checkpoint's EMA (or raw) weights into it.

    :param path: a cgan%06d.pt checkpoint.
    :param model_flags: the network flags (cgan_defaults keys); they must match the checkpoint's.
    :param use_ema: load the exponential moving average (what sampling should use).
    :return: the generator in eval mode, on the CPU.
    """
    ckpt = load_cgan_checkpoint(path)
    check_checkpoint_flags(ckpt, model_flags, path)
    generator, _ = create_cgan(**model_flags)
    generator.load_state_dict(ckpt["ema" if use_ema else "generator"])
    return generator.eval()



def class_grid(images, labels, *, per_class=10):
    """
    Arrange samples for a grid with one row per class.

    :param images: uint8 [N, H, W, C] (numpy or torch).
    :param labels: int labels [N].
    :param per_class: images per row at most.
    :return: (uint8 [rows * k, H, W, C] in row order, k) where k is the row length: the
        smallest number of samples any present class has, capped at per_class.
    """
    labels = torch.as_tensor(labels)
    images = torch.as_tensor(images)
    classes = torch.unique(labels).tolist()
    k = min(per_class, min(int((labels == c).sum()) for c in classes))
    rows = [images[labels == c][:k] for c in classes]
    return torch.cat(rows), k


def generator_flags(args, given):
    """
    The network flags of the checkpoint args.model_path, put into args (cgan_defaults() keys),
    for the sampling and evaluation scripts: the checkpoint records them, so they are not asked
    for again.

    :param args: the parsed flags (model_path and the cgan_defaults() flags).
    :param given: the flags given on the command line (cli.flags.explicit_flags).
    :return: {flag: value} to build the generator with.
    :raises ScriptError: without --model_path, or when a given flag contradicts the checkpoint.
    """
    if not args.model_path:
        raise ScriptError("pass --model_path pointing to a cgan%06d.pt checkpoint of cgan_train.py")
    saved = dict(load_cgan_checkpoint(args.model_path)["flags"])
    if saved.get("arch") == "mlp":
        saved.pop("conv_channels", None)  # the MLP networks have no convolutions
    # The keys that shape the weights, and --dropout, the rate --sample_dropout samples with.
    return checkpoint_flags(saved, args, given, tuple(cgan_defaults()), args.model_path)
