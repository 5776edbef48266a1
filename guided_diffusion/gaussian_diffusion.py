"""
Gaussian diffusion: the forward process, the model's reverse process, guidance, sampling and
training losses (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

This module keeps the reference's public names. The work is split by job: ``schedules`` holds the
pure float64 table maths, ``diffusion_sampling`` the samplers, ``diffusion_losses`` the training
losses and likelihood; this file holds the process itself and how model outputs are read.
"""

import numpy as np
import torch as th

from .diffusion.training_losses import TrainingLossesMixin
from .diffusion.sampling import SamplingMixin
from .diffusion.types import LossType, ModelMeanType, ModelVarType
from .diffusion.schedules import (  # noqa: F401  (re-exported: these names lived here in the reference)
    UnknownScheduleError,
    betas_for_alpha_bar,
    diffusion_tables,
    extract_into_tensor as _extract_into_tensor,
    get_named_beta_schedule,
)

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "betas_for_alpha_bar",
    "get_named_beta_schedule",
]


class GaussianDiffusion(SamplingMixin, TrainingLossesMixin):
    """
    Utilities for training and sampling diffusion models.

    :param betas: a 1-D numpy array of betas for each diffusion timestep, from T down to 1.
    :param model_mean_type: a ModelMeanType saying what the model outputs.
    :param model_var_type: a ModelVarType saying how the variance is output.
    :param loss_type: a LossType saying which loss to train with.
    :param rescale_timesteps: if True, pass floating point timesteps into the model so that they
        are always scaled like in the original paper (0 to 1000).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        self.loss_type = LossType(loss_type)
        self.rescale_timesteps = rescale_timesteps

        tables = diffusion_tables(betas)
        self.betas = tables["betas"]
        self.num_timesteps = int(self.betas.shape[0])
        for name, values in tables.items():
            setattr(self, name, values)
        # Tables the reference derived from others at every lookup (1 - alphas_cumprod, ...)
        # are kept here, so that each is copied to a device once (see extract_into_tensor).
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._log_betas = np.log(self.betas)
        self._recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self._posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        # Reverse-process variances that do not depend on the model.
        large = np.append(self.posterior_variance[1], self.betas[1:])
        self._fixed_variances = {
            ModelVarType.FIXED_LARGE: (large, np.log(large)),
            ModelVarType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
        }

    # -- forward process q -------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :return: a tuple (mean, variance, log_variance), all of x_start's shape.
        """
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(self._one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Diffuse the data for a given number of diffusion steps: sample from q(x_t | x_0).

        :param noise: if given, the standard normal noise to use; otherwise one randn_like draw.
        """
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The diffusion posterior q(x_{t-1} | x_t, x_0).

        :return: a tuple (mean, variance, log_variance clipped at t = 0).
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # -- the model's reverse process p ---------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """
        Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: the model, called as model(x, scaled_t, **model_kwargs).
        :param x: the [N x C x ...] tensor at time t.
        :param t: a 1-D tensor of timesteps.
        :param clip_denoised: if True, clip the x_0 prediction to [-1, 1].
        :param denoised_fn: if not None, applied to the x_0 prediction before clipping.
        :param model_kwargs: extra keyword arguments for the model (e.g. class labels).
        :return: a dict with 'mean', 'variance', 'log_variance' and 'pred_xstart'.
        """
        if model_kwargs is None:
            model_kwargs = {}
        batch, channels = x.shape[:2]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            _check_output_channels(model_output, x, learned_variance=True)
            model_output, var_values = th.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                # Nichol & Dhariwal (2021) eq. 15, with v mapped from [-1, 1] to [0, 1].
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(self._log_betas, t, x.shape)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            _check_output_channels(model_output, x, learned_variance=False)
            variance, log_variance = self._fixed_variances[self.model_var_type]
            model_variance = _extract_into_tensor(variance, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance, t, x.shape)

        def process_xstart(pred):
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # Invert q_sample: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar).
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean for x_0.
        return (
            _extract_into_tensor(self._recip_posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self._posterior_mean_coef2_over_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # -- classifier guidance (Dhariwal & Nichol 2021) ---------------------------------------------

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the mean by variance * grad log p(y | x_t): Algorithm 1 of Dhariwal & Nichol (2021),
        with the guidance scale folded into cond_fn.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the predicted noise by -sqrt(1 - alpha_bar) * grad log p(y | x_t): the score-based
        conditioning of Algorithm 2 (eq. 14) of Dhariwal & Nichol (2021), used by DDIM.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)

        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out


def _check_output_channels(model_output, x, *, learned_variance):
    expected = x.shape[1] * (2 if learned_variance else 1)
    if model_output.shape[1] != expected:
        hint = "--learn_sigma False" if learned_variance else "--learn_sigma True"
        raise ValueError(
            f"the model outputs {model_output.shape[1]} channels but this diffusion expects "
            f"{expected} for {x.shape[1]}-channel images; the model and diffusion flags disagree "
            f"(try {hint})"
        )
