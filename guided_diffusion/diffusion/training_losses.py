"""
Training losses and likelihood of a GaussianDiffusion: the simple MSE objective (Ho et al. 2020,
eq. 14), the hybrid objective with a learned variance (Nichol & Dhariwal 2021, eq. 16) and the
variational bound in bits per dimension.
"""

import numpy as np
import torch as th
from tqdm.auto import tqdm

from . import outputs
from .types import LossType, ModelMeanType
from ..losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

_LN2 = np.log(2.0)


class TrainingLossesMixin:
    """Loss and bits-per-dim methods of GaussianDiffusion; relies on its tables and p_mean_variance."""

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational bound, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) ||
        p(x_{t-1}|x_t)) for t > 0, and the discretised decoder NLL at t = 0 (Ho et al. 2020, eq. 5).

        :return: a dict with 'output' (shape [N]) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2

        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Training losses for a single timestep per batch element.

        :param model: the model, called as model(x_t, scaled_t, **model_kwargs).
        :param x_start: the [N x C x ...] clean images.
        :param t: a batch of timestep indices.
        :param model_kwargs: extra keyword arguments for the model (e.g. class labels).
        :param noise: if given, the noise to diffuse with; otherwise one randn_like draw.
        :return: a dict with a 'loss' tensor of shape [N], plus 'mse' and 'vb' where they apply.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        model_output, var_values = outputs.split_output(model_output, x_t, self.model_var_type)
        if var_values is not None:
            # The vb term trains only the variance: the mean is detached so that the MSE term
            # alone drives it (Nichol & Dhariwal 2021, section 3.1).
            frozen = th.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *_args, frozen=frozen: frozen,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Keep the vb term on the scale it has with 1000 steps (the paper's lambda).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension; no model is involved."""
        t = th.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=th.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / _LN2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """
        The whole variational bound, in bits per dimension, with its per-step terms.

        Steps run from T-1 down to 0, each drawing one randn_like(x_start) to diffuse with.

        :param progress: if True, show a progress bar.
        :return: a dict with 'total_bpd' and 'prior_bpd' (shape [N]) and the [N x T] tables
            'vb', 'xstart_mse' and 'mse' (the noise-prediction error).
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="bpd"):
            t = th.full((batch,), step, device=x_start.device, dtype=th.long)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": th.stack(xstart_mse, dim=1),
            "mse": th.stack(mse, dim=1),
        }
