from setuptools import setup

# Only the library is installed. datasets/, evaluations/ and experiments/ hold scripts that run
# from a checkout; installing them as top-level packages would shadow Hugging Face's `datasets`.
PACKAGES = [
    "guided_diffusion",
    "guided_diffusion.cgan",
    "guided_diffusion.cli",
    "guided_diffusion.data",
    "guided_diffusion.diffusion",
    "guided_diffusion.evaluation",
    "guided_diffusion.runtime",
    "guided_diffusion.sampling",
    "guided_diffusion.training",
    "guided_diffusion.vae",
]

setup(
    name="guided-diffusion",
    version="0.2.0",
    description=(
        "PyTorch port of guided-diffusion (ADM): diffusion training, respacing, DDIM, "
        "classifier guidance, super-resolution and NLL, plus a conditional GAN, a VAE "
        "and a PyTorch evaluator."
    ),
    license="MIT",
    python_requires=">=3.10",
    packages=PACKAGES,
    # The released checkpoints' table (download_checkpoints.py, docs/reproduce.md).
    package_data={"guided_diffusion.data": ["released.json"]},
    install_requires=[
        "torch>=1.13",
        "numpy",
        "pillow",
        "tqdm",
        "scipy",
        "matplotlib",
        # guided_diffusion.data.digits reads the digits bundled with scikit-learn (quick start).
        "scikit-learn",
        # `mpiexec -n N` is the reference's launcher: mpi4py, and the mpich wheel for an mpiexec
        # that needs no system packages (Linux and macOS wheels).
        "mpi4py",
        "mpich; platform_system != 'Windows'",
    ],
    extras_require={
        # Checkpoints and logs on object stores (gs://, az://, https://).
        "remote": ["blobfile>=1.0.5"],
        # datasets/lsun.py reads LSUN's lmdb databases.
        "lsun": ["lmdb"],
        # Checkpoints as .safetensors files (--model_path M.safetensors, --save_format).
        "safetensors": ["safetensors"],
        # Export to Hugging Face diffusers (scripts/export_diffusers.py) and its weights.
        "diffusers": ["diffusers", "safetensors"],
        # --log_format wandb / tensorboard.
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        # The tests of every optional part run in CI.
        "dev": ["pytest", "lmdb", "diffusers", "safetensors", "wandb", "tensorboard"],
    },
)
