from setuptools import setup

setup(
    name="guided-diffusion",
    version="0.1.0",
    description=(
        "PyTorch port of guided-diffusion (ADM): diffusion training, respacing, DDIM, "
        "classifier guidance, super-resolution and NLL, plus a conditional GAN, a VAE "
        "and a PyTorch evaluator."
    ),
    python_requires=">=3.10",
    packages=["guided_diffusion", "guided_diffusion.cgan", "guided_diffusion.vae", "evaluations", "datasets"],
    install_requires=[
        "torch>=1.13",
        "numpy",
        "blobfile>=1.0.5",
        "pillow",
        "tqdm",
        "scipy",
        "matplotlib",
        "mpi4py",
        # The mpich wheel gives mpiexec without system packages (Linux and macOS wheels).
        "mpich; platform_system != 'Windows'",
    ],
    extras_require={
        "dev": ["pytest", "scikit-learn"],
    },
)
