"""
What does a VAE's latent space look like, and do the classes cluster? Encode a labelled image
folder to posterior means, fit a PCA (in torch), scatter the first two components coloured by
class, and print the leave-one-out kNN accuracy.

    python scripts/vae_latent_pca.py --model_path logs/vae003000.pt --image_size 28 \
        --data_dir data/digits --out_dir pca/

Writes latent_pca.npz and latent_pca.png. A model with --latent_size 2 is plotted raw (no PCA
rotation). --features_npz runs the same analysis on any features (arrays "features"[, "labels"]).
Runs in one process.
"""

import argparse
import os
import sys

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.runtime.checkpoints import load_checkpoint
from guided_diffusion.image_datasets import class_labels_from_paths, list_image_files_recursively
from guided_diffusion.vae import (
    ARCH_FLAGS,
    embedding_report,
    encode_means,
    folder_batches,
    load_vae,
    spread_indices,
    vae_defaults,
)
from guided_diffusion.script_util import add_dict_to_argparser, args_to_dict


def create_argparser():
    defaults = dict(
        model_path="",
        data_dir="",
        features_npz="",
        batch_size=256,
        max_images=0,
        knn_k=5,
        out_dir="",
    )
    defaults.update(vae_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def _labels_or_none(paths):
    try:
        return class_labels_from_paths(paths)
    except ValueError:
        logger.warn(
            "warning: file names carry no class ('<class>_<name>.png'): plotting in one colour, "
            "no kNN accuracy"
        )
        return None, None


def main(args):
    logger.configure(dir=args.out_dir or None, format_strs=["stdout", "log"])
    out_dir = logger.get_dir()
    if args.features_npz:
        with np.load(args.features_npz) as npz:
            if "features" not in npz:
                raise ValueError(f"{args.features_npz} has no 'features' array (found {list(npz.keys())})")
            features = npz["features"]
            labels = npz["labels"] if "labels" in npz else None
        if labels is None:
            logger.warn("warning: no 'labels' array: plotting in one colour, no kNN accuracy")
        names, title, raw = None, f"features of {os.path.basename(args.features_npz)}", False
    else:
        if not args.model_path or not args.data_dir:
            raise ValueError("pass --model_path and --data_dir (or --features_npz)")
        flags = args_to_dict(args, ARCH_FLAGS)
        model = load_vae(load_checkpoint(args.model_path), flags, args.model_path)
        model.to(dist_util.dev()).eval()
        paths = list_image_files_recursively(args.data_dir)
        paths = [paths[i] for i in spread_indices(len(paths), args.max_images)]
        labels, names = _labels_or_none(paths)
        if model.class_cond and labels is None:
            raise ValueError("a class-conditional encoder needs labelled file names ('<class>_...')")
        batches = folder_batches(
            paths, image_size=args.image_size, batch_size=args.batch_size, labels=labels
        )
        if not model.class_cond:
            batches = ((x, None) for x, _ in batches)
        features = encode_means(model, batches)
        title = f"VAE posterior means, {os.path.basename(os.path.normpath(args.data_dir))}"
        raw = features.shape[1] == 2
    result = embedding_report(
        torch.as_tensor(features),
        out_dir,
        labels=labels,
        class_names=names,
        k=args.knn_k,
        raw_2d=raw,
        title=title,
    )
    ratio = result["ratio"]
    logger.log(f"explained variance ratio of PC1, PC2: {ratio[0]:.3f}, {ratio[1]:.3f}")
    if result["knn_2d"] is not None:
        space = "raw 2-D latent" if raw else "2-D PCA"
        logger.log(
            f"{args.knn_k}-NN leave-one-out accuracy on the {space}: {result['knn_2d']:.4f} "
            f"(all {features.shape[1]} dimensions {result['knn_full']:.4f}, chance {result['chance']:.4f})"
        )
    logger.log(f"wrote {result['npz']} and {result['png']}")


if __name__ == "__main__":
    parsed = create_argparser().parse_args()
    try:
        main(parsed)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vae_latent_pca.py: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
