"""
Evaluate a batch of samples against a reference batch: Inception Score, FID, sFID, precision and
recall, printed as guided-diffusion's TensorFlow evaluator prints them, computed in PyTorch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz \
        --inception_path pt_inception-2015-12-05-6726825d.pth

The script stays at the reference's path; the code is guided_diffusion.evaluation.evaluator.
"""

from guided_diffusion.cli.main import run_main
from guided_diffusion.evaluation.evaluator import create_argparser, main  # noqa: F401

if __name__ == "__main__":
    run_main(main)
