"""
Deterministic ODE solvers for the probability-flow ODE of a diffusion model, written as pure
functions of a denoiser in the variance-exploding parametrisation of Karras et al. (2022):

    x = x_0 + sigma * eps,    D(x; sigma) ~ E[x_0 | x],    dx/dsigma = (x - D(x; sigma)) / sigma.

A discrete-time model of this project (x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps) is the same
process seen through x = x_t / sqrt(abar), sigma = sqrt((1 - abar) / abar);
denoiser.DiscreteDenoiser turns a GaussianDiffusion and its model into such a D.

Every solver has the one signature

    solver(denoiser, x, sigmas, *, extra_args=None, progress=False)

and is a generator: it yields one dict per step, {"x": x after the step, "denoised": the last
D evaluated, "sigma": the sigma the step started from, "sigma_next": where it ended, "i": the
step index}, so callers can watch or stop the trajectory; sample() drains one and returns the
final x. `sigmas` is a decreasing sequence of floats ending with 0; `denoiser(x, sigma,
**extra_args)` takes a Python float sigma. Nothing here draws random numbers.
"""

import math

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "SOLVERS",
    "MIN_EVALUATIONS",
    "euler",
    "heun",
    "dpmpp_2m",
    "karras_sigmas",
    "sample",
    "steps_for_evaluations",
    "evaluations_for_steps",
]


def karras_sigmas(num_steps, sigma_min, sigma_max, rho=7.0):
    """
    The noise levels of Karras et al. (2022), eq. 5: num_steps levels from sigma_max down to
    sigma_min, evenly spaced in sigma^(1/rho), followed by 0.

    :param num_steps: how many non-zero levels (solver steps); at least 1.
    :param sigma_min: the last non-zero level.
    :param sigma_max: the first level.
    :param rho: the warp; 7 spends more steps at low noise (the paper's choice).
    :return: a list of num_steps + 1 Python floats, the last 0.
    """
    if num_steps < 1:
        raise ValueError(f"need at least one step, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if num_steps == 1:
        return [float(sigma_max), 0.0]
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    levels = (hi + ramp * (lo - hi)) ** rho
    return [float(s) for s in levels] + [0.0]


def _steps(sigmas, progress, desc):
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError("sigmas needs at least two levels (the last one 0)")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] < 0:
        raise ValueError("sigmas must decrease strictly and stay >= 0")
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc=desc):
        yield i, sigmas[i], sigmas[i + 1]


def euler(denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    Euler's method on dx/dsigma = (x - D) / sigma: x_next = D + sigma_next / sigma * (x - D).
    One evaluation per step. On the timesteps of a DDIM schedule this is DDIM with eta = 0
    (Song et al. 2021, eq. 13; Karras et al. 2022, section 3).
    """
    extra_args = extra_args or {}
    for i, sigma, sigma_next in _steps(sigmas, progress, "euler"):
        denoised = denoiser(x, sigma, **extra_args)
        x = denoised + (sigma_next / sigma) * (x - denoised)
        yield {"x": x, "denoised": denoised, "sigma": sigma, "sigma_next": sigma_next, "i": i}


def heun(denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    Heun's second-order method (Karras et al. 2022, Algorithm 1): an Euler step, then the
    slope at its end averaged with the first. Two evaluations per step, except the last step
    to sigma = 0, which is an Euler step (the slope is undefined there): 2 * steps - 1 in all.
    """
    extra_args = extra_args or {}
    for i, sigma, sigma_next in _steps(sigmas, progress, "heun"):
        denoised = denoiser(x, sigma, **extra_args)
        slope = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        if sigma_next == 0:
            x = x_euler
        else:
            denoised_next = denoiser(x_euler, sigma_next, **extra_args)
            slope_next = (x_euler - denoised_next) / sigma_next
            x = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        yield {"x": x, "denoised": denoised, "sigma": sigma, "sigma_next": sigma_next, "i": i}


def dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the exact solution of the
    ODE in lambda = -log sigma with the data prediction extrapolated linearly from the last
    two evaluations. One evaluation per step; the first step and the last one (to sigma = 0,
    where lambda is infinite) are first order, which makes them DDIM steps.
    """
    extra_args = extra_args or {}
    previous = None  # (denoised, step size h) of the step before
    for i, sigma, sigma_next in _steps(sigmas, progress, "dpmpp_2m"):
        denoised = denoiser(x, sigma, **extra_args)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if previous is None:
                estimate = denoised
            else:
                # D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.
                half_inv_r = 0.5 * h / previous[1]
                estimate = (1 + half_inv_r) * denoised - half_inv_r * previous[0]
            # x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h} - 1) D_i, in the x / alpha scale.
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
            previous = (denoised, h)
        yield {"x": x, "denoised": denoised, "sigma": sigma, "sigma_next": sigma_next, "i": i}


SOLVERS = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}

# The fewest model evaluations for which a solver takes a step of its order: Heun needs one
# two-evaluation step before the final Euler step; DPM-Solver++(2M) needs one first-order step
# to have a history, then one second-order step, then the final step to sigma = 0.
MIN_EVALUATIONS = {"euler": 1, "heun": 3, "dpmpp_2m": 3}


def evaluations_for_steps(name, num_steps):
    """How many model evaluations solver `name` makes in num_steps steps (ending at sigma 0)."""
    _check_name(name)
    return 2 * num_steps - 1 if name == "heun" else num_steps


def steps_for_evaluations(name, evaluations):
    """
    The number of steps that spends at most `evaluations` model evaluations: the same number
    for the one-evaluation solvers; (evaluations + 1) // 2 for Heun, which then evaluates
    `evaluations` times when that is odd and one time less when it is even.

    :raises ValueError: when fewer evaluations than MIN_EVALUATIONS[name] are asked for.
    """
    _check_name(name)
    least = MIN_EVALUATIONS[name]
    if evaluations < least:
        why = "" if least == 1 else " (one step of its order plus the final step to sigma 0)"
        raise ValueError(
            f"sampler {name} needs at least {least} model evaluations{why}, got {evaluations}: "
            f"ask for more (--evaluations)"
        )
    return (evaluations + 1) // 2 if name == "heun" else evaluations


def sample(solver, denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    Run a solver to the end and return the final x.

    :param solver: a name in SOLVERS or a solver function.
    """
    if isinstance(solver, str):
        _check_name(solver)
        solver = SOLVERS[solver]
    for out in solver(denoiser, x, sigmas, extra_args=extra_args, progress=progress):
        x = out["x"]
    return x


def _check_name(name):
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known solvers: {', '.join(SOLVERS)}")
