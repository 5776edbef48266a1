"""
A PyTorch port of OpenAI's guided-diffusion (the reference's module paths and public names),
plus a conditional GAN, a VAE and a PyTorch evaluator. ARCHITECTURE.md maps the subpackages.
"""

# The package version recorded in every run's args.json; setup.py states the same number (a test
# keeps the two equal).
__version__ = "0.2.0"
