"""
The ODE solvers (samplers.py) on discrete-time models (solver_sampling.py).

The main oracle is data whose optimal denoiser is known in closed form: a mixture of Gaussians,
for which E[x_0 | x_0 + sigma * n] is a responsibility-weighted sum of per-component posterior
means. The "model" below is that exact noise prediction; it reads the noise level off the
timestep it is given by its own interpolation of the diffusion's table, so a solver that calls
it at the wrong timestep samples the wrong distribution.
"""

import math

import numpy as np
import pytest
import torch

from guided_diffusion import samplers
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from guided_diffusion.solver_sampling import (
    DiscreteDenoiser,
    SAMPLER_NAMES,
    make_sample_fn,
    resolve_sampler,
    solver_sample_loop,
    solver_sample_loop_progressive,
)

MEANS = torch.tensor([-0.6, 0.1, 0.7], dtype=torch.float64)
STDS = torch.tensor([0.08, 0.15, 0.05], dtype=torch.float64)
WEIGHTS = torch.tensor([0.45, 0.35, 0.2], dtype=torch.float64)
EVALUATIONS = (5, 10, 20, 50)
N = 20000


pytestmark = pytest.mark.usefixtures("single_thread")


def log_sigma_table(diffusion):
    abar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    return np.log(np.sqrt((1 - abar) / abar))


def mixture_model(full_diffusion, rescaled=False):
    """
    The exact eps(x_t, t) of the 1-D mixture under full_diffusion's noise levels. Timesteps
    between two integers get the noise level whose log is interpolated linearly between them.
    """
    log_sigmas = log_sigma_table(full_diffusion)
    steps = len(log_sigmas)

    def model(x_t, t, **kwargs):
        t = t.double().numpy()
        if rescaled:
            t = t * steps / 1000.0
        sigma = torch.from_numpy(np.exp(np.interp(t, np.arange(steps), log_sigmas))).view(-1, 1)
        x = x_t.double() * torch.sqrt(1 + sigma**2)
        var = STDS**2 + sigma**2
        log_r = torch.log(WEIGHTS) - 0.5 * torch.log(var) - (x - MEANS) ** 2 / (2 * var)
        resp = torch.softmax(log_r, dim=1)
        denoised = (resp * (MEANS + STDS**2 / var * (x - MEANS))).sum(1, keepdim=True)
        return ((x - denoised) / sigma).float()

    return model


def mixture_cdf(z):
    z = z.view(-1, 1)
    return (WEIGHTS * 0.5 * (1 + torch.erf((z - MEANS) / (STDS * math.sqrt(2))))).sum(1)


def wasserstein1(samples):
    """W1 between the empirical distribution of 1-D samples and the mixture: int |F_n - F|."""
    values = np.sort(samples.double().reshape(-1).numpy())
    grid = torch.linspace(-1.6, 1.6, 32001, dtype=torch.float64)
    empirical = np.searchsorted(values, grid.numpy(), side="right") / len(values)
    return float(np.abs(mixture_cdf(grid).numpy() - empirical).sum() * float(grid[1] - grid[0]))


def direct_samples(n, generator):
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MEANS[k] + STDS[k] * torch.randn(n, generator=generator, dtype=torch.float64)


@pytest.fixture(scope="module")
def mixture_runs():
    """Samples of every solver and of DDIM at each budget, from the same starting noise."""
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = mixture_model(full)
    noise = torch.randn(N, 1, generator=torch.Generator().manual_seed(0))
    runs = {"exact": solver_sample_loop(
        full, model, (N, 1), sampler="dpmpp_2m", evaluations=400, noise=noise, clip_denoised=False
    )}
    for evaluations in EVALUATIONS:
        respaced = create_gaussian_diffusion(
            steps=1000, noise_schedule="linear", timestep_respacing=str(evaluations)
        )
        runs["ddim", evaluations] = respaced.ddim_sample_loop(
            model, (N, 1), noise=noise, clip_denoised=False
        )
        for name in samplers.SOLVERS:
            runs[name, evaluations] = solver_sample_loop(
                full, model, (N, 1), sampler=name, evaluations=evaluations, noise=noise,
                clip_denoised=False,
            )
    gen = torch.Generator().manual_seed(1)
    floors = [wasserstein1(direct_samples(N, gen)) for _ in range(8)]
    return runs, float(np.mean(floors) + 3 * np.std(floors))


def test_each_solver_approaches_the_data_distribution(mixture_runs):
    runs, floor = mixture_runs
    # The target itself: the finely solved ODE is as close to the mixture as N direct draws.
    assert wasserstein1(runs["exact"]) < floor
    table = []
    for name in ("ddim", *samplers.SOLVERS):
        distances = [wasserstein1(runs[name, e]) for e in EVALUATIONS]
        path_errors = [float((runs[name, e] - runs["exact"]).pow(2).mean().sqrt())
                       for e in EVALUATIONS]
        table.append(f"{name}: W1 {np.round(distances, 4)} rms to exact ODE {np.round(path_errors, 4)}")
        assert all(a > b for a, b in zip(distances, distances[1:])), table[-1]
        if name != "ddim":  # DDIM starts at the model's largest noise level, the solvers at 80
            assert all(a > b for a, b in zip(path_errors, path_errors[1:])), table[-1]
    print("\n".join(table))
    # The second-order solvers reach the Monte Carlo level of N draws at 50 evaluations.
    for name in ("heun", "dpmpp_2m"):
        assert wasserstein1(runs[name, 50]) < floor


def test_dpmpp_2m_beats_ddim_at_10_evaluations(mixture_runs):
    runs, floor = mixture_runs
    ddim, dpmpp = wasserstein1(runs["ddim", 10]), wasserstein1(runs["dpmpp_2m", 10])
    print(f"\nW1 to the mixture at 10 evaluations: ddim {ddim:.4f}, dpmpp_2m {dpmpp:.4f}, "
          f"Monte Carlo level {floor:.4f}")
    # The margin is measured against the run's own sampling noise, not a fixed constant.
    assert ddim - dpmpp > floor


def test_euler_on_the_ddim_timesteps_is_ddim_with_classifier_guidance():
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    respaced = create_gaussian_diffusion(steps=1000, noise_schedule="linear", timestep_respacing="8")
    model = mixture_model(full)
    calls = []

    def cond_fn(x, t, **kwargs):  # the gradient of log N(y = 0.3; x_t, 1), times 2
        calls.append(t.clone())
        return 2.0 * (0.3 - x)

    kept = sorted(respaced.timestep_map)
    table = np.exp(log_sigma_table(full))
    sigmas = [float(table[t]) for t in reversed(kept)] + [0.0]
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(3))
    ddim = respaced.ddim_sample_loop(model, (64, 1), noise=noise, cond_fn=cond_fn)
    ddim_times = torch.cat(calls)
    calls.clear()
    euler = solver_sample_loop(full, model, (64, 1), sampler="euler", sigmas=sigmas, noise=noise,
                               cond_fn=cond_fn)
    # The solver called the guidance at the DDIM timesteps (as floats).
    torch.testing.assert_close(torch.cat(calls), ddim_times.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(euler, ddim, rtol=0, atol=2e-5)


def test_unet_with_learned_sigmas_and_rescaled_timesteps():
    """A real network: variance channels are ignored, timesteps go in rescaled to [0, 1000)."""
    torch.manual_seed(0)
    model = create_model(8, 32, 1, channel_mult="1,2", learn_sigma=True, attention_resolutions="4",
                         num_head_channels=16)
    torch.nn.init.normal_(model.out[2].weight, std=0.05)
    model.eval()
    full = create_gaussian_diffusion(steps=200, learn_sigma=True, noise_schedule="cosine",
                                     rescale_timesteps=True)
    respaced = create_gaussian_diffusion(steps=200, learn_sigma=True, noise_schedule="cosine",
                                         rescale_timesteps=True, timestep_respacing="ddim5")
    table = np.exp(log_sigma_table(full))
    sigmas = [float(table[t]) for t in sorted(respaced.timestep_map, reverse=True)] + [0.0]
    noise = torch.randn(2, 3, 8, 8)
    ddim = respaced.ddim_sample_loop(model, noise.shape, noise=noise)
    euler = solver_sample_loop(full, model, noise.shape, sampler="euler", sigmas=sigmas, noise=noise)
    torch.testing.assert_close(euler, ddim, rtol=0, atol=1e-4)

    # The variance channels do not reach the solvers: changing them changes nothing.
    def garbage_variance(x, t):
        out = model(x, t)
        return torch.cat([out[:, :3], torch.randn_like(out[:, 3:]) * 100], dim=1)

    torch.manual_seed(5)
    a = solver_sample_loop(full, model, noise.shape, sampler="dpmpp_2m", evaluations=6, noise=noise)
    b = solver_sample_loop(full, garbage_variance, noise.shape, sampler="dpmpp_2m", evaluations=6,
                           noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fractional_timesteps_interpolate_log_sigma():
    full = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    denoiser = DiscreteDenoiser(full, lambda x, t: x)
    table = np.exp(log_sigma_table(full))
    assert denoiser.sigma_to_t(float(table[37])) == pytest.approx(37, abs=1e-9)
    # The geometric mean of two neighbouring levels sits halfway between their timesteps.
    assert denoiser.sigma_to_t(math.sqrt(table[37] * table[38])) == pytest.approx(37.5, abs=1e-9)
    assert denoiser.sigma_to_t(table[0] / 10) == 0.0
    assert denoiser.sigma_to_t(table[-1] * 10) == 99.0

    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    rescaled = create_gaussian_diffusion(steps=100, noise_schedule="cosine", rescale_timesteps=True)
    DiscreteDenoiser(rescaled, model, clip_denoised=False)(torch.ones(3, 1), float(table[50]))
    assert seen[0].dtype == torch.float32 and torch.allclose(seen[0], torch.full((3,), 500.0))


def test_evaluation_budgets_and_heun_accounting():
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    for name, budget, expected in [("euler", 7, 7), ("dpmpp_2m", 7, 7), ("heun", 7, 7),
                                   ("heun", 10, 9), ("dpmpp_2m", 3, 3), ("heun", 3, 3)]:
        denoiser = DiscreteDenoiser(full, mixture_model(full), clip_denoised=False)
        steps = samplers.steps_for_evaluations(name, budget)
        sigmas = samplers.karras_sigmas(steps, 0.01, 80.0)
        samplers.sample(name, denoiser, torch.randn(4, 1) * 80, sigmas)
        assert denoiser.evaluations == expected == samplers.evaluations_for_steps(name, steps)


def test_seed_contract_one_randn_and_nothing_else():
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = mixture_model(full)
    for name in samplers.SOLVERS:
        torch.manual_seed(11)
        out = solver_sample_loop(full, model, (5, 1), sampler=name, evaluations=5)
        after = torch.randn(3)
        torch.manual_seed(11)
        noise = torch.randn(5, 1)
        expected_after = torch.randn(3)
        assert torch.equal(after, expected_after)  # exactly one randn(*shape) was drawn
        assert torch.equal(out, solver_sample_loop(full, model, (5, 1), sampler=name,
                                                   evaluations=5, noise=noise))


def test_progressive_loop_yields_each_step_and_progress_bar(capsys):
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    steps = list(solver_sample_loop_progressive(
        full, mixture_model(full), (4, 1), sampler="dpmpp_2m", evaluations=6, progress=True))
    assert len(steps) == 6 and steps[-1]["sigma_next"] == 0.0
    assert [s["sigma"] for s in steps] == sorted((s["sigma"] for s in steps), reverse=True)
    assert "dpmpp_2m" in capsys.readouterr().err


def test_bad_requests_are_one_line_errors():
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = mixture_model(full)
    with pytest.raises(ValueError, match="heun needs at least 3 model evaluations"):
        solver_sample_loop(full, model, (2, 1), sampler="heun", evaluations=2)
    with pytest.raises(ValueError, match="dpmpp_2m needs at least 3"):
        samplers.steps_for_evaluations("dpmpp_2m", 2)
    with pytest.raises(ValueError, match="known solvers: euler, heun, dpmpp_2m"):
        solver_sample_loop(full, model, (2, 1), sampler="rk4", evaluations=10)
    respaced = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    with pytest.raises(ValueError, match="over all of its training steps"):
        solver_sample_loop(respaced, model, (2, 1), sampler="heun", evaluations=10)
    previous_x = create_gaussian_diffusion(steps=1000)
    previous_x.model_mean_type = previous_x.model_mean_type.PREVIOUS_X
    with pytest.raises(ValueError, match="use --sampler ddpm or ddim"):
        solver_sample_loop(previous_x, model, (2, 1), sampler="heun", evaluations=10)
    with pytest.raises(ValueError, match="decrease"):
        samplers.sample("euler", lambda x, s: x, torch.zeros(1), [1.0, 2.0, 0.0])


def test_sampler_flag_resolution_and_make_sample_fn():
    assert resolve_sampler("", False) == "ddpm"
    assert resolve_sampler("", True) == "ddim"
    assert resolve_sampler("ddim", True) == "ddim"
    assert resolve_sampler("heun", False) == "heun"
    with pytest.raises(ValueError, match="known samplers: " + ", ".join(SAMPLER_NAMES)):
        resolve_sampler("plms", False)
    with pytest.raises(ValueError, match="--use_ddim True asks for ddim but --sampler is heun"):
        resolve_sampler("heun", True)

    flags = dict(diffusion_steps=1000, learn_sigma=False, noise_schedule="linear", use_kl=False,
                 predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
    respaced = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim7")
    assert make_sample_fn("ddim", respaced, flags) == respaced.ddim_sample_loop
    assert make_sample_fn("ddpm", respaced, flags) == respaced.p_sample_loop
    fn = make_sample_fn("dpmpp_2m", respaced, flags)
    assert fn.keywords == {"sampler": "dpmpp_2m", "evaluations": 7}
    assert fn.args[0].num_timesteps == 1000
    with pytest.raises(ValueError, match="heun needs at least 3"):
        make_sample_fn("heun", create_gaussian_diffusion(steps=1000, timestep_respacing="2"), flags)
