"""
Likelihood helpers for the variational bound: Gaussian KL, the discretised decoder, and the
per-example mean the losses are reduced with.

The decoder follows Ho et al. (2020), section 3.3: pixel values are 256 bins in [-1, 1] and the
last step's likelihood integrates a Gaussian over each bin.
"""

import numpy as np
import torch as th


def mean_flat(tensor):
    """
    Average over every dimension except the first (batch) one.

    :param tensor: an [N x ...] tensor.
    :return: an [N] tensor.
    """
    return tensor.mean(dim=list(range(1, tensor.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python number as long as one of them is a tensor; numbers are broadcast
    against it.
    """
    reference = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, th.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        v if isinstance(v, th.Tensor) else th.tensor(v).to(reference) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The standard normal CDF through the tanh approximation (Page 1977), as in the reference."""
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood of images under a Gaussian discretised into 256 bins on [-1, 1].

    The outermost bins extend to -inf and +inf so the probabilities sum to one.

    :param x: the target images, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, same shape as x.
    :param log_scales: the Gaussian log standard deviations, same shape as x.
    :return: log probabilities in nats, same shape as x.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    half_bin = 1.0 / 255.0
    centered = x - means
    inv_std = th.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_upper = th.log(cdf_upper.clamp(min=1e-12))
    log_survival_lower = th.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = th.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return th.where(
        x < -0.999,
        log_cdf_upper,
        th.where(x > 0.999, log_survival_lower, log_bin),
    )
