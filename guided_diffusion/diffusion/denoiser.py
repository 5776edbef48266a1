"""
The ODE solvers of solvers.py on this project's discrete-time models.

A GaussianDiffusion trained over T steps defines noise levels only at its integer timesteps:
sigma_t = sqrt((1 - abar_t) / abar_t). The solvers work in continuous sigma, so a sigma between
two levels is given the fractional timestep that interpolates log sigma linearly between them
(as k-diffusion does for discrete DDPM models; Karras et al. 2022, appendix C.3.4, instead round
to the nearest level). The network takes fractional timesteps as they are: its timestep
embedding is a continuous function of t.
"""

import math

import numpy as np
import torch

from . import outputs
from . import solvers as samplers
from .sampling import LoopOptions, last_sample, loop_start
from .types import ModelMeanType

__all__ = [
    "DEFAULT_SIGMA_GRID",
    "DiscreteDenoiser",
    "SIGMA_GRIDS",
    "solver_sample_loop",
    "solver_sample_loop_progressive",
    "solver_sigmas",
]

# The noise range of Karras et al. (2022) for data in [-1, 1], clipped to the model's own range
# as they do for discrete models.
DEFAULT_SIGMA_MIN = 0.002
DEFAULT_SIGMA_MAX = 80.0


class DiscreteDenoiser:
    """
    D(x; sigma) of a discrete-time diffusion model, for the solvers of solvers.py.

    The solver's x = x_t / sqrt(abar) is scaled back to the model's x_t, the model is called at
    the (fractional) timestep of sigma, and its output is read as a prediction of x_0 by the
    diffusion's own reading (outputs.read_xstart at a SigmaLevel). Learned-variance channels
    are dropped: an ODE solver has no use for them.

    :param diffusion: the GaussianDiffusion the model was trained with. A SpacedDiffusion may be
        respaced: its base process (base_alphas_cumprod) gives the noise levels and timesteps,
        and its respacing is not used (the solvers choose their own noise levels).
    :param model: called as model(x_t, t, **model_kwargs) with t a float tensor of timesteps
        (scaled to [0, 1000) when diffusion.rescale_timesteps).
    :param clip_denoised: clip the x_0 prediction to [-1, 1].
    :param denoised_fn: if not None, applied to the x_0 prediction before clipping.
    :param cond_fn: classifier guidance: cond_fn(x_t, t, **model_kwargs) returns
        scale * grad log p(y | x_t); the x_0 prediction is shifted as condition_score does for
        DDIM (outputs.guided_xstart; Dhariwal & Nichol 2021, Algorithm 2), after clipping.
    """

    def __init__(self, diffusion, model, *, clip_denoised=True, denoised_fn=None, cond_fn=None):
        mean_type = ModelMeanType(diffusion.model_mean_type)
        if mean_type not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
            raise ValueError(
                "the ODE solvers need a model that predicts the noise or x_0, not the previous "
                "x (ModelMeanType.PREVIOUS_X): use --sampler ddpm or ddim"
            )
        self.model = model
        self.mean_type = mean_type
        self.var_type = diffusion.model_var_type
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.cond_fn = cond_fn
        self.rescale_timesteps = diffusion.rescale_timesteps
        abar = np.asarray(diffusion.base_alphas_cumprod, dtype=np.float64)
        self.num_timesteps = len(abar)
        self.sigmas = np.sqrt((1.0 - abar) / abar)
        self.log_sigmas = np.log(self.sigmas)
        self.evaluations = 0

    @property
    def sigma_min(self):
        """The noise level of timestep 0."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        """The noise level of timestep T - 1."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        """
        The fractional timestep of a noise level: log sigma interpolated linearly between the
        model's levels, clamped to [0, T - 1]. Pure float64 host arithmetic (no device sync).
        """
        return float(np.interp(math.log(sigma), self.log_sigmas, np.arange(self.num_timesteps)))

    def t_to_sigma(self, t):
        """The noise level of a fractional timestep in [0, T - 1] (the inverse of sigma_to_t)."""
        return float(np.exp(np.interp(t, np.arange(self.num_timesteps), self.log_sigmas)))

    def model_timestep(self, sigma):
        """The timestep value the network is called with for noise level sigma."""
        t = self.sigma_to_t(sigma)
        return t * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t

    def __call__(self, x, sigma, **model_kwargs):
        """
        :param x: the solver's state x_0 + sigma * eps, an [N x C x ...] tensor.
        :param sigma: the noise level, a Python float > 0.
        :return: the prediction of x_0, of x's shape.
        """
        self.evaluations += 1
        level = outputs.SigmaLevel(sigma)
        x_t = x / level.sqrt_recip_abar
        t = torch.full((x.shape[0],), self.model_timestep(sigma), device=x.device)
        with torch.no_grad():
            out = self.model(x_t, t, **model_kwargs)
        prediction, _ = outputs.split_output(out, x, self.var_type)
        denoised = outputs.process_xstart(
            outputs.read_xstart(self.mean_type, prediction.to(x.dtype), x_t, level),
            self.clip_denoised,
            self.denoised_fn,
        )
        if self.cond_fn is not None:
            gradient = self.cond_fn(x_t, t, **model_kwargs)
            denoised = outputs.guided_xstart(denoised, x_t, gradient.to(x.dtype), level)
        return denoised


# The grids of noise levels: Karras et al. (2022, eq. 5), and the two of DPM-Solver (Lu et al.
# 2022, section 3.3): uniform in lambda = -log sigma ("logSNR") and uniform in time.
SIGMA_GRIDS = ("karras", "logsnr", "time")
# The grid each solver uses when none is named (its row of solvers.SOLVER_TABLE): of the three, the one never far from the best:
# the smallest worst-case ratio of its Wasserstein-1 distance to a Gaussian mixture to the best
# grid's, over the linear and cosine schedules (T = 1000) and 5, 10, 20 and 50 model
# evaluations (experiments/solver_grids.py; the measured tables are in docs/solvers.md). On the cosine schedule DPM-Solver++(2M) on the Karras
# grid is no better than DDIM at 10 evaluations; on the logSNR grid it is on both schedules.
DEFAULT_SIGMA_GRID = {name: row.default_grid for name, row in samplers.SOLVER_TABLE.items()}


def solver_sigmas(denoiser, num_steps, *, grid="karras", sigma_min=None, sigma_max=None, rho=7.0):
    """
    The noise levels the solvers visit: num_steps levels from sigma_max down to sigma_min, then 0.

    The range defaults to max(0.002, the model's smallest level) .. min(80, its largest)
    (Karras et al. 2022, Table 1 and their handling of discrete models).

    :param grid: "karras": evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5);
        "logsnr": evenly spaced in log sigma; "time": evenly spaced in the model's (fractional)
        timestep, read back through the diffusion's table (DPM-Solver's time-uniform grid on a
        discrete model, the spacing of DDIM's evenly respaced steps).
    """
    lo = max(DEFAULT_SIGMA_MIN, denoiser.sigma_min) if sigma_min is None else sigma_min
    hi = min(DEFAULT_SIGMA_MAX, denoiser.sigma_max) if sigma_max is None else sigma_max
    if grid == "karras":
        return samplers.karras_sigmas(num_steps, lo, hi, rho=rho)
    if grid == "logsnr":
        return samplers.logsnr_sigmas(num_steps, lo, hi)
    if grid == "time":

        def spread(n):
            times = np.linspace(denoiser.sigma_to_t(hi), denoiser.sigma_to_t(lo), n)
            levels = [denoiser.t_to_sigma(t) for t in times]
            # The ends exactly as asked (the table round trip can move them by a rounding).
            return [hi] + levels[1:-1] + [lo]

        return samplers.grid_levels(num_steps, lo, hi, spread)
    raise ValueError(f"unknown sigma grid {grid!r}; known grids: {', '.join(SIGMA_GRIDS)}")


def solver_sample_loop_progressive(
    diffusion,
    model,
    shape,
    *,
    sampler,
    evaluations=None,
    sigmas=None,
    sigma_grid=None,
    sigma_min=None,
    sigma_max=None,
    rho=7.0,
    **loop_options,
):
    """
    Like solver_sample_loop, but yield a dict per solver step: "sample" (the state as the
    model's x_t at the step's end; the image after the last step), "pred_xstart" (the x_0
    prediction the step used), "sigma" and "sigma_next".
    """
    options = LoopOptions.read("solver_sample_loop", loop_options)
    if sampler not in samplers.SOLVERS:
        raise ValueError(f"unknown solver {sampler!r}; known solvers: {', '.join(samplers.SOLVERS)}")
    denoiser = DiscreteDenoiser(
        diffusion,
        model,
        clip_denoised=options.clip_denoised,
        denoised_fn=options.denoised_fn,
        cond_fn=options.cond_fn,
    )
    if sigmas is None:
        if evaluations is None:
            raise ValueError("give the number of model evaluations (evaluations=) or sigmas=")
        steps = samplers.steps_for_evaluations(sampler, evaluations)
        sigmas = solver_sigmas(
            denoiser, steps, grid=sigma_grid or DEFAULT_SIGMA_GRID[sampler],
            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        )
    # The seed contract of the DDIM loop: one randn(*shape) when no noise is given; then the
    # ODE solvers draw nothing, the SDE solvers one randn_like per step (solvers.py).
    x_t, _ = loop_start(model, shape, noise=options.noise, device=options.device)
    # The start is x_t itself, read at the first level: x = x_t / sqrt(abar).
    x = x_t * math.sqrt(1.0 + sigmas[0] ** 2)
    solver = samplers.SOLVERS[sampler]
    extra_args = options.model_kwargs or {}
    for out in solver(denoiser, x, sigmas, extra_args=extra_args, progress=options.progress):
        yield {
            "sample": out["x"] / math.sqrt(1.0 + out["sigma_next"] ** 2),
            "pred_xstart": out["denoised"],
            "sigma": out["sigma"],
            "sigma_next": out["sigma_next"],
        }


def solver_sample_loop(diffusion, model, shape, *, sampler, evaluations=None, **kwargs):
    """
    Generate samples with a solver of solvers.py: the ODE solvers "euler", "heun", "dpmpp_2m",
    "dpmpp_3m" or the SDE solvers "euler_ancestral", "dpmpp_2m_sde".

    :param diffusion: the diffusion the model was trained with; a respaced SpacedDiffusion is
        read through its base process (see DiscreteDenoiser): the solvers choose their own
        noise levels, so the respacing plays no part.
    :param model: the model, as for p_sample_loop.
    :param shape: the shape of the samples, (N, C, H, W).
    :param sampler: the solver's name.
    :param evaluations: the budget of model evaluations per sample (the scripts'
        --evaluations); see solvers.steps_for_evaluations for how each solver spends it.
    :param sigmas: instead of evaluations, the noise levels to visit (decreasing, ending 0).
    :param noise: the starting x_t, read at the first noise level (x_T ~ N(0, I) for sampling;
        an image noised to sigma_max for SDEdit); else drawn with one randn(*shape). The SDE
        solvers then draw one randn_like per step (solvers.py).
    :param clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress: as for
        ddim_sample_loop (see DiscreteDenoiser).
    :param sigma_grid: "karras", "logsnr" or "time" (solver_sigmas); None: the solver's
        DEFAULT_SIGMA_GRID.
    :param sigma_min, sigma_max, rho: override the noise range and Karras's warp.
    :return: the final batch of samples.
    """
    progressive = solver_sample_loop_progressive(
        diffusion, model, shape, sampler=sampler, evaluations=evaluations, **kwargs
    )
    return last_sample(progressive)


