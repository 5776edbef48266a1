"""
Small building blocks shared by the diffusion networks: layer factories, initialisation helpers,
the sinusoidal timestep embedding, EMA updates and gradient checkpointing.
"""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .losses import mean_flat  # noqa: F401  (the reference's path; it lives with the loss maths)

# The reference kept its own SiLU for PyTorch 1.5; the built-in one computes the same
# x * sigmoid(x).
SiLU = nn.SiLU


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm that always normalises in float32 and returns the input's dtype, so a half-precision
    torso keeps full-precision statistics (means and variances of fp16 activations overflow easily).
    """

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _pick_by_dims(dims, choices, what):
    if dims not in choices:
        raise ValueError(f"unsupported dimensions for {what}: {dims} (use 1, 2 or 3)")
    return choices[dims]


def conv_nd(dims, *args, **kwargs):
    """
    Build a 1D, 2D or 3D convolution.

    :param dims: number of spatial dimensions (1, 2 or 3).
    :param args: positional arguments of the torch convolution class.
    :param kwargs: keyword arguments of the torch convolution class.
    :return: an nn.Conv1d, nn.Conv2d or nn.Conv3d.
    """
    cls = _pick_by_dims(dims, {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}, "conv_nd")
    return cls(*args, **kwargs)


def linear(*args, **kwargs):
    """
    Build a fully connected layer (a named factory so every layer goes through this module).

    :param args: positional arguments of nn.Linear.
    :param kwargs: keyword arguments of nn.Linear.
    :return: an nn.Linear.
    """
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """
    Build a 1D, 2D or 3D average pooling layer.

    :param dims: number of spatial dimensions (1, 2 or 3).
    :param args: positional arguments of the torch pooling class.
    :param kwargs: keyword arguments of the torch pooling class.
    :return: an nn.AvgPool1d, nn.AvgPool2d or nn.AvgPool3d.
    """
    cls = _pick_by_dims(dims, {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}, "avg_pool_nd")
    return cls(*args, **kwargs)


@torch.no_grad()
def update_ema(target_params, source_params, rate=0.99):
    """
    Move each target parameter towards its source: target <- rate * target + (1 - rate) * source.

    :param target_params: the EMA parameters, updated in place.
    :param source_params: the live parameters, same order and shapes.
    :param rate: the EMA decay; closer to 1 means a slower average.
    """
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"update_ema got {len(targets)} targets but {len(sources)} sources")
    # The reference's mul_ then add_ per tensor, as two foreach calls (no Python loop over the
    # parameters; the same arithmetic).
    torch._foreach_mul_(targets, rate)
    torch._foreach_add_(targets, sources, alpha=1 - rate)


@torch.no_grad()
def zero_module(module):
    """
    Set every parameter of a module to zero. Used on the last layer of residual branches so each
    block starts as the identity.

    :param module: the module to zero in place.
    :return: the same module.
    """
    for param in module.parameters():
        param.zero_()
    return module


@torch.no_grad()
def scale_module(module, scale):
    """
    Multiply every parameter of a module by a constant.

    :param module: the module to scale in place.
    :param scale: the factor.
    :return: the same module.
    """
    for param in module.parameters():
        param.mul_(scale)
    return module


def normalization(channels):
    """
    The normalisation layer used throughout the networks: 32-group GroupNorm computed in float32.

    :param channels: number of input channels (a multiple of 32).
    :return: a GroupNorm32 module.
    """
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """
    Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer's positional
    encoding (Vaswani et al. 2017, section 3.5): the first half of the channels holds cosines and
    the second half sines, at frequencies spaced geometrically from 1 down to 1/max_period.

    :param timesteps: a 1-D tensor of N timesteps.
    :param dim: the embedding width; an odd width gets one trailing zero channel.
    :param max_period: sets the lowest frequency of the embedding.
    :return: an [N x dim] float32 tensor.
    """
    half = dim // 2
    freqs = _timestep_frequencies(half, max_period, timesteps.device)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


_FREQUENCIES = {}


def _timestep_frequencies(half, max_period, device):
    """
    The float32 frequencies exp(-ln(max_period) * i / half), i < half, on `device`.

    They are computed on the CPU, so every device sees identical values, and kept per device:
    copying them at every call would stop the host at every forward on an accelerator.
    """
    if torch.compiler.is_compiling():
        # Traced into the graph (a constant there); a cache filled while tracing would hold
        # fake tensors.
        exponents = torch.arange(half, dtype=torch.float32, device=device) / half
        return torch.exp(-math.log(max_period) * exponents)
    key = (half, float(max_period), torch.device(device))
    freqs = _FREQUENCIES.get(key)
    if freqs is None:
        with torch.inference_mode(False), torch.no_grad():
            exponents = torch.arange(start=0, end=half, dtype=torch.float32) / half
            freqs = torch.exp(-math.log(max_period) * exponents).to(device=device)
        _FREQUENCIES[key] = freqs
    return freqs


def checkpoint(func, inputs, params, flag):
    """
    Run `func(*inputs)`, optionally without keeping its intermediate activations: they are
    recomputed during the backward pass, trading compute for memory.

    :param func: the function to evaluate.
    :param inputs: the sequence of arguments for `func`.
    :param params: parameters `func` uses without taking them as arguments. Kept for the
        reference's signature; non-reentrant checkpointing finds them by itself.
    :param flag: when False, simply call `func`.
    :return: the output of `func`.
    """
    # deviation from reference: torch.utils.checkpoint in non-reentrant mode replaces the
    # hand-written autograd Function; it handles parameters, RNG state (dropout) and autocast,
    # and works with DistributedDataParallel. Nothing is saved when grad is off anyway.
    del params
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
