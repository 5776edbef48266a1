"""
Editing by noising and denoising: SDEdit (Meng et al. 2022). An input image is diffused to an
intermediate time t0 = strength * T (q_sample, their eq. 2 for the VP process) and the reverse
process is run from there with any sampler, guided or not; a small strength keeps the input, a
strength of 1 ignores it.

Strength and steps: the sampler walks the first k = ceil(strength * T) of T steps counted from
the clean end, starting at index k - 1. For ddpm and ddim T is the diffusion's own (respaced)
step count; the ODE/SDE solvers start at the noise level of base timestep k - 1 (T = the training
steps) and spend their `evaluations` between there and their smallest level. When k = T the run
is sampling from noise exactly: the start is the drawn noise itself, not the input noised to
T - 1 (whose weight sqrt(alpha_bar_{T-1}) is about 0.006 on the linear schedule), so that a
strength of 1 with a seed gives the samples of plain sampling with that seed.

Random draws: one torch.randn(*shape) for the forward noise (the draw a sampling loop starts
with), then the sampler's own draws.
"""

import math

import numpy as np
import torch as th

from . import solvers
from .denoiser import DEFAULT_SIGMA_MIN, solver_sample_loop_progressive
from .sampling import LoopOptions, last_sample, loop_start, run_steps

__all__ = ["check_edit_strength", "edit_steps", "sdedit_loop", "sdedit_loop_progressive"]

DIFFUSION_SAMPLERS = ("ddpm", "ddim")


def check_edit_strength(strength):
    """:raises ValueError: unless 0 < strength <= 1."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(
            f"the edit strength (--edit_strength) must lie in (0, 1], got {strength}: 1 samples "
            "from noise, values near 0 keep the input (0.5 is a middle ground)"
        )


def edit_steps(strength, num_timesteps):
    """k = ceil(strength * T) in 1..T, with strength * T rounded first so that 0.3 * 1000 is 300."""
    check_edit_strength(strength)
    return min(num_timesteps, max(1, math.ceil(round(strength * num_timesteps, 6))))


def sdedit_loop(diffusion, model, x_start, **kwargs):
    """
    Edit a batch of images. The arguments are those of sdedit_loop_progressive.

    :return: the edited images, of x_start's shape.
    """
    return last_sample(sdedit_loop_progressive(diffusion, model, x_start, **kwargs))


def sdedit_loop_progressive(
    diffusion,
    model,
    x_start,
    *,
    strength,
    sampler="ddim",
    evaluations=None,
    sigma_grid=None,
    eta=0.0,
    **loop_options,
):
    """
    Like sdedit_loop, but yield each step's output (as the sampler's progressive loop does).

    :param diffusion: the GaussianDiffusion (respaced for ddpm/ddim; the solvers read its base
        process).
    :param model: the model, as for p_sample_loop (a guided model function works).
    :param x_start: the input images, an [N x C x ...] tensor in [-1, 1].
    :param strength: in (0, 1]: how far to noise the input (see the module docstring).
    :param sampler: "ddpm", "ddim" or a solver name of solvers.SOLVERS.
    :param evaluations: the solvers' model evaluations for the partial run (required with
        them); ddpm and ddim run k of their steps.
    :param sigma_grid: the solvers' grid (None: the solver's default).
    :param eta: DDIM's eta (sampler "ddim" only).
    :param loop_options: noise (the standard normal noise to diffuse with; else one
        randn(*shape)), clip_denoised, denoised_fn, cond_fn, model_kwargs, device and progress,
        as for p_sample_loop (sampling.LoopOptions).
    """
    options = LoopOptions.read("sdedit_loop", loop_options)
    check_edit_strength(strength)
    if sampler not in DIFFUSION_SAMPLERS and sampler not in solvers.SOLVERS:
        known = ", ".join(DIFFUSION_SAMPLERS + tuple(solvers.SOLVERS))
        raise ValueError(f"unknown sampler {sampler!r}; known samplers: {known}")
    if not isinstance(x_start, th.Tensor):
        raise TypeError(f"x_start must be a tensor of images, got {type(x_start).__name__}")
    shape = tuple(x_start.shape)
    noise, device = loop_start(
        model, shape, noise=options.noise, device=options.device or x_start.device
    )
    x_start = x_start.to(device)

    if sampler in DIFFUSION_SAMPLERS:
        total = diffusion.num_timesteps
        k = edit_steps(strength, total)
        if k == total:
            x = noise
        else:
            t0 = th.full((shape[0],), k - 1, device=device, dtype=th.long)
            x = diffusion.q_sample(x_start, t0, noise=noise)
        if sampler == "ddpm":
            step, extra = diffusion.p_sample, {}
        else:
            step, extra = diffusion.ddim_sample, {"eta": eta}
        yield from run_steps(step, model, x, range(k - 1, -1, -1), device=device,
                             progress=options.progress, desc="editing",
                             **options.step_kwargs(), **extra)
        return

    if evaluations is None:
        raise ValueError(f"sampler {sampler} needs its number of model evaluations (evaluations=)")
    base = np.asarray(diffusion.base_alphas_cumprod, dtype=np.float64)
    k = edit_steps(strength, len(base))
    solver_args = dict(sampler=sampler, sigma_grid=sigma_grid)
    if k == len(base):
        yield from solver_sample_loop_progressive(
            diffusion, model, shape, evaluations=evaluations, **solver_args,
            **options.keywords(noise=noise, device=device))
        return
    abar = float(base[k - 1])
    sigma_start = math.sqrt((1.0 - abar) / abar)
    x = math.sqrt(abar) * x_start + math.sqrt(1.0 - abar) * noise
    lowest = max(DEFAULT_SIGMA_MIN, math.sqrt((1.0 - base[0]) / base[0]))
    if sigma_start <= lowest:
        # Already at the solvers' smallest level: one step to sigma 0 (x = D(x)).
        yield from solver_sample_loop_progressive(
            diffusion, model, shape, sigmas=[sigma_start, 0.0], **solver_args,
            **options.keywords(noise=x, device=device))
        return
    yield from solver_sample_loop_progressive(
        diffusion, model, shape, evaluations=evaluations, sigma_max=sigma_start, **solver_args,
        **options.keywords(noise=x, device=device))
