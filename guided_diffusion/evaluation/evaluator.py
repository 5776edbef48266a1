"""
Evaluate a batch of samples against a reference batch: Inception Score, FID, sFID, precision and
recall, with the printed output of guided-diffusion's TensorFlow evaluator, in PyTorch.

Either batch may be an .npz (arr_0: uint8 images) or a folder of images of one size.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz \
        --inception_path pt_inception-2015-12-05-6726825d.pth
"""

import argparse
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cli.flags import add_flag
from .inception import HOW_TO_GET_WEIGHTS, WEIGHTS_FILENAME, load_inception
from .metrics import FIDStatistics, ManifoldEstimator, inception_score
from .batches import check_batch_path, is_image_folder, open_image_batch
from .npz import npz_keys, peek_values


class Evaluator:
    """
    Computes Inception features of image batches and the metrics on them.

    :param model: an evaluations.inception.InceptionV3 with loaded weights.
    :param device: torch device to run on.
    :param batch_size: images per forward pass.
    :param softmax_batch_size: pool features per logits matmul for the Inception Score.
    :param manifold_estimator: precision/recall estimator; the reference settings when None.
    :param progress: show progress bars.
    """

    def __init__(
        self,
        *,
        model,
        device="cpu",
        batch_size=64,
        softmax_batch_size=512,
        manifold_estimator=None,
        progress=True,
    ):
        self.model = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.manifold_estimator = manifold_estimator or ManifoldEstimator(device=self.device)
        self.progress = progress

    def read_activations(self, npz_path):
        """
        :param npz_path: a batch file with uint8 NHWC images in ``arr_0`` (3 channels, or 1 for
            grey images, given to the network as 3 equal channels), or a folder of images.
        :return: (pool [N x 2048], spatial [N x 2023]) float32 features.
        """
        with open_image_batch(npz_path) as stream:
            return self.compute_activations(stream.batches(self.batch_size), total=len(stream))

    @torch.inference_mode()
    def compute_activations(self, batches, total=None):
        """
        :param batches: an iterable of [B x H x W x 3] arrays with values in [0, 255].
        :param total: number of images, for the progress bar.
        :return: (pool, spatial) float32 numpy arrays.
        """
        pools, spatials = [], []
        with tqdm(total=total, unit="img", disable=not self.progress) as bar:
            for batch in batches:
                # Copy: rows streamed from the zip are read-only buffers.
                images = torch.tensor(np.asarray(batch), device=self.device)
                pool, spatial = self.model(images)
                pools.append(pool.float().cpu().numpy())
                spatials.append(spatial.float().cpu().numpy())
                bar.update(len(batch))
        if not pools:
            raise ValueError("the batch holds no images")
        return np.concatenate(pools), np.concatenate(spatials)

    def read_statistics(self, npz_path, activations):
        """
        Statistics stored in the batch file (``mu``/``sigma``, ``mu_s``/``sigma_s``) when present,
        otherwise computed from the activations.

        :param npz_path: the batch file the activations came from.
        :param activations: (pool, spatial) from read_activations.
        :return: (pool statistics, spatial statistics).
        """
        if is_image_folder(npz_path):
            return tuple(self.compute_statistics(features) for features in activations)
        keys = set(npz_keys(npz_path))
        result = []
        with np.load(npz_path) as stored:
            names = (("mu", "sigma"), ("mu_s", "sigma_s"))
            for (mu_key, sigma_key), features in zip(names, activations):
                if mu_key in keys and sigma_key in keys:
                    result.append(FIDStatistics(mu=stored[mu_key], sigma=stored[sigma_key]))
                else:
                    result.append(self.compute_statistics(features))
        return tuple(result)

    def compute_statistics(self, activations):
        """
        :param activations: [N x D] features.
        :return: their FIDStatistics.
        """
        return FIDStatistics.from_features(activations)

    @torch.inference_mode()
    def compute_inception_score(self, activations, split_size=5000):
        """
        :param activations: [N x 2048] pool features.
        :param split_size: samples per split (the reference's 5000).
        :return: the Inception Score.
        """
        logits = []
        for start in range(0, len(activations), self.softmax_batch_size):
            pool = torch.from_numpy(activations[start : start + self.softmax_batch_size])
            logits.append(self.model.logits(pool.to(self.device)).cpu().numpy())
        return inception_score(np.concatenate(logits), split_size=split_size)

    def compute_prec_recall(self, activations_ref, activations_sample):
        """
        :param activations_ref: [N1 x 2048] reference pool features.
        :param activations_sample: [N2 x 2048] sample pool features.
        :return: (precision, recall) as floats.
        """
        estimator = self.manifold_estimator
        radii_ref = estimator.manifold_radii(activations_ref)
        radii_sample = estimator.manifold_radii(activations_sample)
        precision, recall = estimator.evaluate_pr(
            activations_ref, radii_ref, activations_sample, radii_sample
        )
        return float(precision[0]), float(recall[0])


def default_inception_path():
    """
    :return: the first existing well-known location of the weight file (the torch hub cache, where
        pytorch-fid keeps it, then the current directory), or None.
    """
    candidates = [
        os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME),
        os.path.abspath(WEIGHTS_FILENAME),
    ]
    return next((path for path in candidates if os.path.isfile(path)), None)


def image_dtype_warning(path, name="arr_0"):
    """
    A one-line warning when a batch file does not hold what the evaluator expects, uint8 NHWC
    images in 0..255 (image_sample.py's output): float images in [0, 1] or [-1, 1] look almost
    black (or half black) to the Inception network, so the scores would mean nothing. Looks at
    the first rows only.

    :return: the warning, naming the conversion that fixes the file, or None when it is uint8.
    """
    if is_image_folder(path):
        return None  # image files are 8-bit by construction
    dtype, _, low, high = peek_values(path, name)
    if dtype == np.uint8 or low is None:
        return None
    start = f"warning: {path}: {name} holds {dtype} values"
    expects = "the evaluator expects uint8 NHWC images in 0..255"
    if np.issubdtype(dtype, np.floating) and low >= -1.0 and high <= 1.0:
        if low < 0.0:
            return (
                f"{start} in [-1, 1] (model outputs?), but {expects}: save "
                "((x + 1) * 127.5).clip(0, 255).astype(np.uint8), or "
                "guided_diffusion.sampling.files.to_uint8(x) for an NCHW tensor"
            )
        return (
            f"{start} in [0, 1], but {expects}: save (x * 255).round().clip(0, 255)"
            ".astype(np.uint8)"
        )
    if low >= 0 and high <= 255:
        return (f"{start} in 0..255, but {expects}: save x.round().astype(np.uint8) to score "
                "the pixels the reference would")
    return f"{start} from {low:g} to {high:g}, but {expects}: rescale to 0..255 and save as uint8"


def _to_stderr(message):
    print(message, file=sys.stderr, flush=True)


def evaluate(*, ref_batch, sample_batch, evaluator, out=print, warn=_to_stderr):
    """
    Run the reference evaluation and print its lines.

    :param ref_batch: reference .npz path, or a folder of images.
    :param sample_batch: sample .npz path, or a folder of images.
    :param evaluator: an Evaluator.
    :param out: print-like function for the output lines.
    :param warn: called with each warning line (a batch that does not hold uint8 images);
        default: standard error.
    :return: dict of the five metrics.
    """
    for path in (ref_batch, sample_batch):
        check_batch_path(path)  # fail on a missing or unreadable batch before long computation
    for path in (ref_batch, sample_batch):
        message = image_dtype_warning(path)
        if message:
            warn(message)

    out("computing reference batch activations...")
    ref_acts = evaluator.read_activations(ref_batch)
    out("computing/reading reference batch statistics...")
    ref_stats, ref_stats_spatial = evaluator.read_statistics(ref_batch, ref_acts)

    out("computing sample batch activations...")
    sample_acts = evaluator.read_activations(sample_batch)
    out("computing/reading sample batch statistics...")
    sample_stats, sample_stats_spatial = evaluator.read_statistics(sample_batch, sample_acts)

    out("Computing evaluations...")
    results = {"Inception Score": evaluator.compute_inception_score(sample_acts[0])}
    out("Inception Score:", results["Inception Score"])
    results["FID"] = sample_stats.frechet_distance(ref_stats)
    out("FID:", results["FID"])
    results["sFID"] = sample_stats_spatial.frechet_distance(ref_stats_spatial)
    out("sFID:", results["sFID"])
    precision, recall = evaluator.compute_prec_recall(ref_acts[0], sample_acts[0])
    results["Precision"], results["Recall"] = precision, recall
    out("Precision:", results["Precision"])
    out("Recall:", results["Recall"])
    return results


def create_argparser():
    parser = argparse.ArgumentParser(description=_description())
    add_flag(parser, "ref_batch", positional=True)
    add_flag(parser, "sample_batch", positional=True)
    add_flag(parser, "inception_path", default=None)
    add_flag(parser, "batch_size", type=int, default=64)
    add_flag(parser, "device", default=None)
    return parser


def _description():
    # The docstring's first paragraph, whole (its first line alone stops mid-sentence).
    return " ".join(__doc__.strip().split("\n\n")[0].split())


def main(argv=None):
    args = create_argparser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    path = args.inception_path or default_inception_path()
    if path is None:
        raise FileNotFoundError(
            f"no Inception weights given and no {WEIGHTS_FILENAME} in the torch hub cache "
            f"or the current directory: {HOW_TO_GET_WEIGHTS}"
        )
    model = load_inception(path, device=device)
    evaluator = Evaluator(model=model, device=device, batch_size=args.batch_size)
    evaluate(ref_batch=args.ref_batch, sample_batch=args.sample_batch, evaluator=evaluator)
