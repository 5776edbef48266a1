"""
Living next to other libraries: `diffusers_export` writes our UNet (and DiT) with its noise
schedule as a Hugging Face diffusers folder (UNet2DModel / DiTTransformer2DModel + DDPMScheduler).
diffusers is an optional dependency, imported only when an export runs.
"""
