"""
Gaussian diffusion: the forward process, the model's reverse process, guidance, sampling and
training losses (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

This module keeps the reference's public names. The work is split by job: ``diffusion.schedules``
holds the pure float64 table maths, ``diffusion.outputs`` how model outputs are read,
``diffusion.sampling`` the samplers, ``diffusion.training_losses`` the training losses and
likelihood; this file holds the process itself and its tables.
"""

import numpy as np
import torch as th

from .diffusion import outputs
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
        # are computed once here, in float64 as the reference did at each lookup.
        large = np.append(self.posterior_variance[1], self.betas[1:])
        tables.update(
            one_minus_alphas_cumprod=1.0 - self.alphas_cumprod,
            log_betas=np.log(self.betas),
            recip_posterior_mean_coef1=1.0 / self.posterior_mean_coef1,
            posterior_mean_coef2_over_coef1=self.posterior_mean_coef2 / self.posterior_mean_coef1,
            fixed_large_variance=large,
            fixed_large_log_variance=np.log(large),
        )
        self._host_tables = tables
        # Device copies of the tables, one dict per device, made at their first use there.
        self._device_tables = {}

    @property
    def base_alphas_cumprod(self):
        """
        alpha_bar over every step of the process the model was trained with (its timesteps are
        the model's): this diffusion's own; a SpacedDiffusion's base process's.
        """
        return self.alphas_cumprod

    def _tables_on(self, device):
        """
        Every float64 table of this diffusion as a tensor on `device`, copied there once.

        # deviation from reference: the reference copies a table to the device at every lookup,
        # which on a GPU stops the host (a synchronising copy) several times per sampling step.
        The tables are read at their first use on a device: build a new diffusion rather than
        changing one's numpy tables afterwards.
        """
        device = th.device(device)
        tables = self._device_tables.get(device)
        if tables is None:
            # Made outside inference mode so that tensors first built under it stay usable in
            # training, and without autograd history.
            with th.inference_mode(False), th.no_grad():
                tables = {
                    name: th.from_numpy(np.array(values, dtype=np.float64)).to(device)
                    for name, values in self._host_tables.items()
                }
            self._device_tables[device] = tables
        return tables

    def _extract(self, name, t, shape):
        """
        The float64 table `name` at timesteps t, cast to float32 after the lookup (as the
        reference) and broadcast to `shape` ([N x ...], N = len(t)).
        """
        values = self._tables_on(t.device)[name][t].float()
        values = values.reshape(values.shape + (1,) * (len(shape) - values.dim()))
        return values.expand(shape)

    def _level(self, t, shape):
        """The coefficients of outputs.py at integer timesteps t, for images of `shape`."""
        return outputs.TimestepLevel(lambda name: self._extract(name, t, shape))

    # -- forward process q -------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :return: a tuple (mean, variance, log_variance), all of x_start's shape.
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
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
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The diffusion posterior q(x_{t-1} | x_t, x_0).

        :return: a tuple (mean, variance, log_variance clipped at t = 0).
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
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
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        level = self._level(t, x.shape)
        prediction, var_values = outputs.split_output(model_output, x, self.model_var_type)
        model_variance, model_log_variance = outputs.read_variance(
            self.model_var_type, var_values, level
        )
        pred_xstart = outputs.process_xstart(
            outputs.read_xstart(self.model_mean_type, prediction, x, level),
            clip_denoised,
            denoised_fn,
        )
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            model_mean = prediction
        else:
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return outputs.xstart_from_eps(x_t, eps, self._level(t, x_t.shape))

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return outputs.xstart_from_xprev(x_t, xprev, self._level(t, x_t.shape))

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return outputs.eps_from_xstart(x_t, pred_xstart, self._level(t, x_t.shape))

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # -- classifier guidance (Dhariwal & Nichol 2021) ---------------------------------------------

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the mean by variance * grad log p(y | x_t): Algorithm 1 of Dhariwal & Nichol (2021),
        with the guidance scale folded into cond_fn.

        The gradient is taken at x_t with timestep t, as in the reference, unless cond_fn has
        ``guidance_at == "mean"`` (guidance.make_classifier_cond_fn): then at the predicted mean
        mu with timestep t - 1 (clamped at 0), where the paper's Taylor expansion of
        log p(y | x_{t-1}) is taken (sec. 4.1; GD#51).
        """
        if model_kwargs is None:
            model_kwargs = {}
        point, point_t = x, t
        if getattr(cond_fn, "guidance_at", "x_t") == "mean":
            # mu is the mean of x_{t-1}, so the classifier sees it at the previous noise level.
            point, point_t = p_mean_var["mean"], (t - 1).clamp(min=0)
        gradient = cond_fn(point, self._scale_timesteps(point_t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the predicted noise by -sqrt(1 - alpha_bar) * grad log p(y | x_t): the score-based
        conditioning of Algorithm 2 (eq. 14) of Dhariwal & Nichol (2021), used by DDIM.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = outputs.guided_xstart(
            p_mean_var["pred_xstart"], x, gradient, self._level(t, x.shape)
        )
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out
