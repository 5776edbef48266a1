"""
Respaced diffusion: sample (or evaluate) a model trained with T steps using only a subset of them
(Nichol & Dhariwal 2021, section 4), e.g. 250 evenly spread steps or DDIM's strided 25.
"""

import torch as th

from .gaussian_diffusion import GaussianDiffusion
from .diffusion.schedules import respace_betas, space_timesteps  # noqa: F401  (space_timesteps lives here in the reference)

__all__ = ["SpacedDiffusion", "space_timesteps"]


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process that skips steps of a base diffusion process.

    The kept steps keep their alpha_bar, so the betas between them are recomputed; the model still
    sees the original timestep indices (rescaled to 0..1000 when rescale_timesteps), as do
    guidance functions.

    :param use_timesteps: a collection of timesteps from the original process to retain.
    :param kwargs: the keyword arguments of GaussianDiffusion for the base process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        # The process the model was trained with: the ODE solvers read its noise levels.
        self._base_alphas_cumprod = base.alphas_cumprod
        betas, self.timestep_map = respace_betas(base.alphas_cumprod, self.use_timesteps)
        # The map as a tensor, per (device, dtype): building it at every model call would copy
        # it to the device (a host synchronisation on a GPU) several times per step.
        self._timestep_map_tensors = {}
        super().__init__(**{**kwargs, "betas": betas})

    @property
    def base_alphas_cumprod(self):
        """alpha_bar over all original_num_steps steps of the base process."""
        return self._base_alphas_cumprod

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        wrapped = self._wrap_model(cond_fn)
        # Where the gradient is taken (guidance.make_classifier_cond_fn) survives the wrapping;
        # t - 1 is then a step of the spaced process, which the wrapper maps.
        wrapped.guidance_at = getattr(cond_fn, "guidance_at", "x_t")
        return super().condition_mean(wrapped, *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model,
            self.timestep_map,
            self.rescale_timesteps,
            self.original_num_steps,
            map_tensors=self._timestep_map_tensors,
        )

    def _scale_timesteps(self, t):
        # The wrapper maps and scales the timesteps itself.
        return t


class _WrappedModel:
    """Calls a model (or guidance function) with original, optionally rescaled, timesteps."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps, map_tensors=None):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self.map_tensors = {} if map_tensors is None else map_tensors

    def _map_on(self, device, dtype):
        key = (device, dtype)
        table = self.map_tensors.get(key)
        if table is None:
            with th.inference_mode(False):
                table = th.tensor(self.timestep_map, device=device, dtype=dtype)
            self.map_tensors[key] = table
        return table

    def __call__(self, x, ts, **kwargs):
        new_ts = self._map_on(ts.device, ts.dtype)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
