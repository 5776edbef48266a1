"""
What does a VAE's latent space look like, and do the classes cluster? Encode a labelled image
folder to posterior means, fit a PCA (in torch), scatter the first two components coloured by
class, and print the leave-one-out kNN accuracy.

    python scripts/vae_latent_pca.py --model_path logs/vae003000.pt --data_dir data/digits \
        --out_dir runs/vae/pca

Writes latent_pca.npz and latent_pca.png to --out_dir (default: the log folder, --log_dir or
$OPENAI_LOGDIR; with --out_dir alone the log goes there too). A model with a 2-d latent is
plotted raw (no PCA rotation). The architecture flags come from the checkpoint, which records
them. --features_npz runs the same analysis on any features (arrays "features"[, "labels"]).
Runs in one process.
"""

import os

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import explicit_flags, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.errors import ScriptError
from guided_diffusion.image_datasets import class_labels_from_paths, list_image_files_recursively
from guided_diffusion.runtime.files import file_kind
from guided_diffusion.script_util import script_parser
from guided_diffusion.vae import (
    embedding_report,
    encode_means,
    folder_batches,
    spread_indices,
    vae_from_checkpoint,
    vae_tool_defaults,
)


def create_argparser():
    return script_parser(
        script_description(__doc__),
        vae_tool_defaults(
            features_npz="",
            batch_size=256,
            max_images=0,
            knn_k=5,
        ),
    )


def _labels_or_none(paths):
    try:
        return class_labels_from_paths(paths)
    except ValueError:
        logger.warn(
            "warning: file names carry no class ('<class>_<name>.png'): plotting in one colour, "
            "no kNN accuracy"
        )
        return None, None


def read_features(path):
    """(features, labels or None) of a --features_npz file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--features_npz {path} does not exist")
    kind = file_kind(path)
    if kind is not None:
        raise ScriptError(f"--features_npz {path} is {kind}: pass an npz with a 'features' array")
    with np.load(path) as npz:
        if "features" not in npz:
            raise ScriptError(f"{path} has no 'features' array (found {list(npz.keys())})")
        return npz["features"], (npz["labels"] if "labels" in npz else None)


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    # Inputs are read (and refused) before the log folder is made.
    model = features = labels = None
    if args.features_npz:
        features, labels = read_features(args.features_npz)
    else:
        if not args.model_path or not args.data_dir:
            raise ScriptError("pass --model_path and --data_dir (or --features_npz)")
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"--data_dir {args.data_dir} is not a folder")
        model = vae_from_checkpoint(args.model_path, args, explicit_flags(parser, argv))
    logger.configure(dir=args.log_dir or args.out_dir or None, format_strs=["stdout", "log"])
    out_dir = args.out_dir or logger.get_dir()
    if model is None:
        if labels is None:
            logger.warn("warning: no 'labels' array: plotting in one colour, no kNN accuracy")
        names, title, raw = None, f"features of {os.path.basename(args.features_npz)}", False
    else:
        model.to(dist_util.dev()).eval()
        paths = list_image_files_recursively(args.data_dir)
        paths = [paths[i] for i in spread_indices(len(paths), args.max_images)]
        labels, names = _labels_or_none(paths)
        if model.class_cond and labels is None:
            raise ScriptError("a class-conditional encoder needs labelled file names ('<class>_...')")
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
    run_main(main)
