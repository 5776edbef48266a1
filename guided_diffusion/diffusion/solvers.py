"""
Solvers for the probability-flow ODE of a diffusion model (and two for its reverse SDE), written
as functions of a denoiser in the variance-exploding parametrisation of Karras et al. (2022):

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
**extra_args)` takes a Python float sigma.

The ODE solvers (euler, heun, dpmpp_2m, dpmpp_3m) draw no random numbers. The SDE solvers
(euler_ancestral, dpmpp_2m_sde) draw from torch's global generator, exactly one
torch.randn_like(x) per step, right after the step's model evaluation, the last step (to sigma 0,
where no noise is added) included: the order of draws of DDIM's steps, so a fixed seed gives
fixed samples.
"""

import math

import numpy as np
import torch

from .progress import steps_with_progress

__all__ = [
    "SOLVER_TABLE",
    "Solver",
    "SOLVERS",
    "STOCHASTIC",
    "MIN_EVALUATIONS",
    "euler",
    "heun",
    "dpmpp_2m",
    "dpmpp_3m",
    "euler_ancestral",
    "dpmpp_2m_sde",
    "karras_sigmas",
    "logsnr_sigmas",
    "grid_levels",
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

    def spread(n):
        ramp = np.linspace(0.0, 1.0, n)
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        return (hi + ramp * (lo - hi)) ** rho

    return grid_levels(num_steps, sigma_min, sigma_max, spread)


def logsnr_sigmas(num_steps, sigma_min, sigma_max):
    """
    num_steps noise levels from sigma_max down to sigma_min evenly spaced in
    lambda = -log sigma (half the log signal-to-noise ratio), followed by 0: the "logSNR" grid
    of DPM-Solver (Lu et al. 2022, section 3.3).

    :return: a list of num_steps + 1 Python floats, the last 0.
    """
    return grid_levels(
        num_steps,
        sigma_min,
        sigma_max,
        lambda n: np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)),
    )


def grid_levels(num_steps, sigma_min, sigma_max, spread):
    """
    What every noise-level grid shares: the checks of its arguments, the single step (sigma_max
    alone) and the final level 0.

    :param num_steps: how many non-zero levels; at least 1.
    :param sigma_min: the last non-zero level.
    :param sigma_max: the first level.
    :param spread: spread(n) gives the grid's n >= 2 levels from sigma_max down to sigma_min.
    :return: a list of num_steps + 1 Python floats, the last 0.
    """
    if num_steps < 1:
        raise ValueError(f"need at least one step, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if num_steps == 1:
        return [float(sigma_max), 0.0]
    return [float(s) for s in spread(num_steps)] + [0.0]


def _steps(sigmas, progress, desc):
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError("sigmas needs at least two levels (the last one 0)")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] < 0:
        raise ValueError("sigmas must decrease strictly and stay >= 0")
    for i in steps_with_progress(range(len(sigmas) - 1), progress, desc):
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


def dpmpp_3m(denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    Third-order multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", eq. 9 with the data
    prediction expanded to second order in lambda = -log sigma, as in their multistep solvers).

    In the x / alpha scale the exact step from lambda_i to lambda_i + h is
        x_next = e^{-h} x + int_0^h e^{u - h} D(lambda_i + u) du,
    and with D = D_i + u D' + u^2 / 2 D'' the integral is
        phi_1 D_i + phi_2 D' + phi_3 D'',  phi_1 = 1 - e^{-h},  phi_2 = h - phi_1,
        phi_3 = h^2 / 2 - phi_2.
    D' and D'' come from the quadratic through the last three evaluations (divided differences
    on the non-uniform lambda grid). The first step is first order (no history), the second
    second order (D'' = 0), and the last one, to sigma = 0 where lambda is infinite, returns D.
    One evaluation per step.
    """
    extra_args = extra_args or {}
    history = []  # (denoised, lambda) of the previous steps, newest first
    for i, sigma, sigma_next in _steps(sigmas, progress, "dpmpp_3m"):
        denoised = denoiser(x, sigma, **extra_args)
        lam = -math.log(sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda > 0
            phi_1 = -math.expm1(-h)
            phi_2 = h - phi_1
            phi_3 = 0.5 * h * h - phi_2
            x = math.exp(-h) * x + phi_1 * denoised
            if history:
                prev, lam_prev = history[0]
                h_1 = lam - lam_prev
                slope = (denoised - prev) / h_1
                if len(history) > 1:
                    prev2, lam_prev2 = history[1]
                    h_2 = lam_prev - lam_prev2
                    curvature = (slope - (prev - prev2) / h_2) / (h_1 + h_2)
                    # The quadratic's derivatives at lambda_i: D' = d1 + c h_1, D'' = 2 c.
                    x = x + phi_2 * (slope + curvature * h_1) + phi_3 * (2.0 * curvature)
                else:
                    x = x + phi_2 * slope
        history = [(denoised, lam)] + history[:1]
        yield {"x": x, "denoised": denoised, "sigma": sigma, "sigma_next": sigma_next, "i": i}


def euler_ancestral(denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    Ancestral sampling: DDPM's posterior step (Ho et al. 2020, eq. 6-7), which is DDIM with
    eta = 1 (Song et al. 2021, eq. 16), in the x / alpha scale. From sigma to sigma_next it adds
    fresh noise of variance sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
    moves the rest of the way with an Euler step to sigma_down = sigma_next^2 / sigma
    (sigma_down^2 + sigma_up^2 = sigma_next^2):
        x_next = D + (sigma_down / sigma) (x - D) + sigma_up z.
    One evaluation and one torch.randn_like(x) per step (see the module docstring).
    """
    extra_args = extra_args or {}
    for i, sigma, sigma_next in _steps(sigmas, progress, "euler_ancestral"):
        denoised = denoiser(x, sigma, **extra_args)
        noise = torch.randn_like(x)
        if sigma_next == 0:
            x = denoised
        else:
            ratio = sigma_next / sigma
            sigma_up = sigma_next * math.sqrt(1.0 - ratio * ratio)
            x = denoised + (ratio * ratio) * (x - denoised) + sigma_up * noise
        yield {"x": x, "denoised": denoised, "sigma": sigma, "sigma_next": sigma_next, "i": i}


def dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, progress=False):
    """
    The stochastic DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", section 5, SDE-DPM-Solver++
    with the multistep second-order data prediction). For the reverse SDE in the x / alpha scale
    the step of size h = lambda_next - lambda is
        x_next = (sigma_next / sigma) e^{-h} x + int_0^h 2 e^{-2(h - u)} D(lambda + u) du
                 + sigma_next sqrt(1 - e^{-2h}) z,
    whose integral with D = D_i + u D' is (1 - e^{-2h}) D_i + (h - (1 - e^{-2h}) / 2) D', D' the
    backward difference of the last two evaluations in lambda. Its first-order version is
    euler_ancestral. The first step is first order and the last one (to sigma = 0) returns D.
    One evaluation and one torch.randn_like(x) per step (see the module docstring).
    """
    extra_args = extra_args or {}
    previous = None  # (denoised, lambda) of the step before
    for i, sigma, sigma_next in _steps(sigmas, progress, "dpmpp_2m_sde"):
        denoised = denoiser(x, sigma, **extra_args)
        noise = torch.randn_like(x)
        lam = -math.log(sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            keep = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            x = (sigma_next / sigma) * math.exp(-h) * x + keep * denoised
            if previous is not None:
                slope = (denoised - previous[0]) / (lam - previous[1])
                x = x + (h - 0.5 * keep) * slope
            x = x + (sigma_next * math.sqrt(keep)) * noise
        previous = (denoised, lam)
        yield {"x": x, "denoised": denoised, "sigma": sigma, "sigma_next": sigma_next, "i": i}


class Solver:
    """
    One row of SOLVER_TABLE: everything the library, the flags and the docs say about a solver.

    :param step: the generator function (the one signature above).
    :param summary: what it is, with its paper; --sampler's help and docs/solvers.md show it.
    :param default_grid: the sigma grid it uses when --sigma_grid is empty (denoiser.SIGMA_GRIDS),
        chosen by measurement (experiments/solver_grids.py, docs/solvers.md).
    :param min_evaluations: the fewest model evaluations for which it takes a step of its order:
        Heun needs one two-evaluation step before the final Euler step; a multistep solver of
        order k needs k - 1 lower-order steps for a history, one step of order k, then the final
        step to sigma = 0.
    :param stochastic: it draws one torch.randn_like(x) per step (an SDE solver).
    :param two_stage: each step but the last evaluates the model twice (Heun).
    """

    __slots__ = ("step", "summary", "default_grid", "min_evaluations", "stochastic", "two_stage")

    def __init__(self, step, summary, *, default_grid, min_evaluations, stochastic=False,
                 two_stage=False):
        self.step = step
        self.summary = summary
        self.default_grid = default_grid
        self.min_evaluations = min_evaluations
        self.stochastic = stochastic
        self.two_stage = two_stage


# The one table of solvers: --sampler's choices and help, docs/solvers.md's table (checked by
# tests/test_solvers.py) and the library's lookups below all come from it.
SOLVER_TABLE = {
    "euler": Solver(euler, "Euler on the probability-flow ODE (DDIM's update on any grid)",
                    default_grid="time", min_evaluations=1),
    "heun": Solver(heun, "Heun (Karras et al. 2022, Algorithm 1)",
                   default_grid="logsnr", min_evaluations=3, two_stage=True),
    "dpmpp_2m": Solver(dpmpp_2m, "DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)",
                       default_grid="logsnr", min_evaluations=3),
    "dpmpp_3m": Solver(dpmpp_3m, "third-order multistep DPM-Solver++ (exact integral of the "
                                 "quadratic through the last three data predictions in log-SNR)",
                       default_grid="logsnr", min_evaluations=4),
    "euler_ancestral": Solver(euler_ancestral, "ancestral sampling: DDPM's posterior step = DDIM "
                                               "with eta 1, on any grid",
                              default_grid="time", min_evaluations=1, stochastic=True),
    "dpmpp_2m_sde": Solver(dpmpp_2m_sde, "stochastic DPM-Solver++(2M) (SDE-DPM-Solver++ with the "
                                         "2M data prediction)",
                           default_grid="logsnr", min_evaluations=3, stochastic=True),
}

# Views of the table under the names the library and its users already read.
SOLVERS = {name: row.step for name, row in SOLVER_TABLE.items()}
STOCHASTIC = tuple(name for name, row in SOLVER_TABLE.items() if row.stochastic)
MIN_EVALUATIONS = {name: row.min_evaluations for name, row in SOLVER_TABLE.items()}


def evaluations_for_steps(name, num_steps):
    """How many model evaluations solver `name` makes in num_steps steps (ending at sigma 0)."""
    _check_name(name)
    return 2 * num_steps - 1 if SOLVER_TABLE[name].two_stage else num_steps


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
    return (evaluations + 1) // 2 if SOLVER_TABLE[name].two_stage else evaluations


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
