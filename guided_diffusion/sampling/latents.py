"""
Sampling latent diffusion models (the released DiTs work on the 32x32x4 latents of the Stable
Diffusion VAE, Rombach et al. 2022): --vae_path decodes the sampled latents with a diffusers
AutoencoderKL read from a local folder, and --guidance_channels chooses which channels
classifier-free guidance extrapolates. docs/dit.md.

diffusers is imported only when --vae_path is given, so it stays an optional dependency.
"""

import os

import torch

from ..errors import ScriptError

__all__ = ["GUIDANCE_CHANNELS", "LatentDecoder", "guidance_channel_count", "latent_decoder"]

# --guidance_channels -> how many leading channels guidance extrapolates (None: all of them).
# "first3" is the convention of DiT's own sample.py, which guides channels 0-2 of its 4-channel
# latents and leaves channel 3 (and the variance values) conditional; matching its FIDs needs it.
GUIDANCE_CHANNELS = {"all": None, "first3": 3}

# DiT's latents are the VAE's scaled by this factor (the Stable Diffusion VAE's); a VAE config
# that names its own scaling_factor wins.
DEFAULT_SCALING_FACTOR = 0.18215


def guidance_channel_count(args):
    """
    :return: the channel count for diffusion.guidance.classifier_free_guidance(channels=...),
        None for all of them.
    :raises ScriptError: an unknown --guidance_channels, or first3 for a model of fewer
        channels.
    """
    choice = getattr(args, "guidance_channels", "all")
    if choice not in GUIDANCE_CHANNELS:
        raise ScriptError(f"unknown --guidance_channels {choice!r}: use "
                          f"{' or '.join(GUIDANCE_CHANNELS)}")
    count = GUIDANCE_CHANNELS[choice]
    channels = getattr(args, "in_channels", 3)
    if count is not None and channels < count:
        raise ScriptError(f"--guidance_channels {choice} guides {count} channels, the model has "
                          f"--in_channels {channels}: pass --guidance_channels all")
    return count


class LatentDecoder:
    """
    A diffusers AutoencoderKL that turns sampled latents into images: x = decode(z / s), with s
    the VAE config's scaling_factor (0.18215 when it names none, as DiT uses).

    :param vae: the AutoencoderKL (any module with .config and .decode(z).sample).
    """

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", None)
                                    or DEFAULT_SCALING_FACTOR)
        self.latent_channels = int(config.latent_channels)
        self.channels = int(config.out_channels)
        # Each encoder level but the last halves the image.
        self.factor = 2 ** (len(config.block_out_channels) - 1)

    def image_size(self, latent_size):
        """The decoded side (or (height, width)) of latents of latent_size."""
        if isinstance(latent_size, int):
            return latent_size * self.factor
        return tuple(side * self.factor for side in latent_size)

    def to(self, device):
        self.vae.to(device)
        return self

    @torch.no_grad()
    def __call__(self, latents):
        """[N x latent_channels x h x w] latents -> [N x channels x H x W] images, about
        [-1, 1]."""
        weights = next(self.vae.parameters())
        z = latents.to(weights.device, weights.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.float()


def latent_decoder(args):
    """
    The LatentDecoder of --vae_path, checked against --in_channels before any work; None
    without --vae_path (the latents are then written as they are).

    :raises ScriptError: a missing folder, a folder that is not an AutoencoderKL's, latents of
        another channel count, or diffusers not installed.
    """
    path = getattr(args, "vae_path", "")
    if not path:
        return None
    if not os.path.isdir(path):
        raise ScriptError(f"--vae_path {path}: no such folder (pass a local diffusers "
                          "AutoencoderKL folder, with config.json and its weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ScriptError(f"--vae_path {path} is not a diffusers model folder (no config.json): "
                          "pass the folder AutoencoderKL.save_pretrained wrote")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ScriptError("--vae_path needs the diffusers package: pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds for a folder that is not its model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScriptError(f"--vae_path {path} is not a diffusers AutoencoderKL folder: "
                          f"{first}") from None
    decoder = LatentDecoder(vae)
    channels = getattr(args, "in_channels", 3)
    if decoder.latent_channels != channels:
        raise ScriptError(f"--vae_path {path} decodes {decoder.latent_channels}-channel latents, "
                          f"the model makes --in_channels {channels}: pass --in_channels "
                          f"{decoder.latent_channels}")
    return decoder
