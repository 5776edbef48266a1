"""
The one reading of a diffusion model's output, shared by GaussianDiffusion (p_mean_variance, the
training losses, classifier guidance) and the ODE solvers' denoiser (denoiser.DiscreteDenoiser).

A model output is read at a noise level. The coefficients of that level come from a level
object: TimestepLevel looks them up at integer timesteps in a diffusion's float64 tables (cast to
float32 after the lookup, as the reference does); SigmaLevel computes them as Python floats at a
continuous noise level sigma = sqrt((1 - alpha_bar) / alpha_bar). Every formula below is written
once, in the float operation order of the reference, so the diffusion's results are unchanged.
"""

import math

import torch as th

from .types import ModelMeanType, ModelVarType

__all__ = [
    "SigmaLevel",
    "TimestepLevel",
    "eps_from_xstart",
    "guided_xstart",
    "learns_variance",
    "process_xstart",
    "read_variance",
    "read_xstart",
    "split_output",
    "xstart_from_eps",
    "xstart_from_xprev",
]


def learns_variance(var_type):
    """True when the model outputs variance channels (LEARNED, LEARNED_RANGE)."""
    return ModelVarType(var_type) in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


def split_output(model_output, x, var_type):
    """
    Split a model output into its prediction (x's channels) and its variance channels.

    :param model_output: the [N x C' x ...] output.
    :param x: the model's input, [N x C x ...].
    :param var_type: the diffusion's ModelVarType; with a learned variance C' must be 2 C.
    :return: (prediction, variance values or None).
    :raises ValueError: one line naming the flag when the channel count does not fit.
    """
    learned = learns_variance(var_type)
    channels = x.shape[1]
    expected = channels * (2 if learned else 1)
    if model_output.dim() < 2 or model_output.shape[1] != expected:
        got = model_output.shape[1] if model_output.dim() >= 2 else tuple(model_output.shape)
        hint = "--learn_sigma False" if learned else "--learn_sigma True"
        raise ValueError(
            f"the model outputs {got} channels but this diffusion expects {expected} for "
            f"{channels}-channel images; the model and diffusion flags disagree (try {hint})"
        )
    if model_output.shape[0] != x.shape[0] or model_output.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"the model output has shape {tuple(model_output.shape)} but its input has "
            f"{tuple(x.shape)}: the model must keep the batch and image sizes"
        )
    if not learned:
        return model_output, None
    prediction, var_values = th.split(model_output, channels, dim=1)
    return prediction, var_values


def _table_entry(name):
    # Looked up when read, as a formula needs it: most readings use a few of the coefficients.
    return property(lambda level: level.table(name))


class TimestepLevel:
    """
    The coefficients at integer timesteps of a diffusion.

    :param lookup: lookup(name) returns the diffusion's float64 table `name` at the timesteps,
        cast to float32 and broadcast to the images' shape.
    """

    sqrt_recip_abar = _table_entry("sqrt_recip_alphas_cumprod")
    sqrt_recipm1_abar = _table_entry("sqrt_recipm1_alphas_cumprod")
    recip_coef1 = _table_entry("recip_posterior_mean_coef1")
    coef2_over_coef1 = _table_entry("posterior_mean_coef2_over_coef1")

    def __init__(self, lookup):
        self.table = lookup

    @property
    def sqrt_one_minus_abar(self):
        # In float32 from the float32 alpha_bar, as the reference's condition_score computes it.
        return (1 - self.table("alphas_cumprod")).sqrt()


class SigmaLevel:
    """
    The coefficients at a continuous noise level sigma (alpha_bar = 1 / (1 + sigma^2)), as
    Python floats. The posterior of one discrete step does not exist here, so a model that
    predicts the previous x cannot be read.
    """

    def __init__(self, sigma):
        self.sigma = float(sigma)
        self.sqrt_recip_abar = math.sqrt(1.0 + self.sigma * self.sigma)
        self.sqrt_recipm1_abar = self.sigma
        self.sqrt_one_minus_abar = self.sigma / self.sqrt_recip_abar

    @property
    def recip_coef1(self):
        raise ValueError(_PREVIOUS_X_AT_SIGMA)

    coef2_over_coef1 = recip_coef1

    def table(self, name):
        raise ValueError(f"no table {name!r} at a continuous noise level")


_PREVIOUS_X_AT_SIGMA = (
    "a model that predicts the previous x (ModelMeanType.PREVIOUS_X) can only be read at its "
    "own timesteps: use --sampler ddpm or ddim"
)


def xstart_from_eps(x_t, eps, level):
    """Invert q_sample for x_0: x_0 = x_t / sqrt(abar) - sqrt(1 / abar - 1) eps."""
    return level.sqrt_recip_abar * x_t - level.sqrt_recipm1_abar * eps


def eps_from_xstart(x_t, pred_xstart, level):
    """The noise that takes pred_xstart to x_t: (x_t / sqrt(abar) - x_0) / sqrt(1 / abar - 1)."""
    return (level.sqrt_recip_abar * x_t - pred_xstart) / level.sqrt_recipm1_abar


def xstart_from_xprev(x_t, xprev, level):
    """Invert the posterior mean mu = coef1 x_0 + coef2 x_t (Ho et al. 2020, eq. 7) for x_0."""
    return level.recip_coef1 * xprev - level.coef2_over_coef1 * x_t


def read_xstart(mean_type, prediction, x_t, level):
    """
    The x_0 a model's prediction implies (before clipping).

    :param mean_type: the ModelMeanType: EPSILON, START_X or PREVIOUS_X.
    :param prediction: the prediction channels of the output (split_output).
    :param x_t: the model's input.
    :param level: a TimestepLevel or SigmaLevel.
    """
    mean_type = ModelMeanType(mean_type)
    if mean_type == ModelMeanType.EPSILON:
        return xstart_from_eps(x_t, prediction, level)
    if mean_type == ModelMeanType.START_X:
        return prediction
    return xstart_from_xprev(x_t, prediction, level)


def process_xstart(pred_xstart, clip_denoised, denoised_fn=None):
    """denoised_fn (if any), then clipping to [-1, 1] (if clip_denoised), as the reference."""
    if denoised_fn is not None:
        pred_xstart = denoised_fn(pred_xstart)
    return pred_xstart.clamp(-1, 1) if clip_denoised else pred_xstart


def read_variance(var_type, var_values, level):
    """
    The reverse-process (variance, log variance) of a step at integer timesteps.

    LEARNED reads the log variance directly; LEARNED_RANGE interpolates it between the clipped
    posterior log variance and log beta with frac = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15);
    FIXED_SMALL is the posterior variance, FIXED_LARGE beta (with the posterior variance at t = 0).

    :param var_values: the variance channels of the output (None for the fixed types).
    :param level: a TimestepLevel whose tables include log_betas, fixed_large_variance and
        fixed_large_log_variance.
    """
    var_type = ModelVarType(var_type)
    if var_type == ModelVarType.LEARNED:
        log_variance = var_values
    elif var_type == ModelVarType.LEARNED_RANGE:
        min_log = level.table("posterior_log_variance_clipped")
        max_log = level.table("log_betas")
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
    elif var_type == ModelVarType.FIXED_SMALL:
        return level.table("posterior_variance"), level.table("posterior_log_variance_clipped")
    else:
        return level.table("fixed_large_variance"), level.table("fixed_large_log_variance")
    return th.exp(log_variance), log_variance


def guided_xstart(pred_xstart, x_t, gradient, level):
    """
    Classifier guidance on the score (Dhariwal & Nichol 2021, Algorithm 2, eq. 14): the noise
    implied by pred_xstart is shifted by -sqrt(1 - abar) * gradient and read back as x_0.

    :param gradient: scale * grad_{x_t} log p(y | x_t), of x_t's shape.
    :return: the guided x_0 prediction.
    """
    eps = eps_from_xstart(x_t, pred_xstart, level)
    eps = eps - level.sqrt_one_minus_abar * gradient
    return xstart_from_eps(x_t, eps, level)
