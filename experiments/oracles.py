"""
Data whose optimal denoiser is known in closed form, wrapped as a noise-prediction "model" of a
discrete-time diffusion, for measuring samplers and editing loops against exact answers.

- A 1-D mixture of Gaussians: E[x_0 | x_0 + sigma n] is a responsibility-weighted sum of the
  components' posterior means.
- A d-dimensional Gaussian N(mu, Sigma): E[x_0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu),
  and for inpainting the conditional law of some coordinates given the others is Gaussian too.

Each model reads its noise level off the timestep it is given by interpolating log sigma of the
diffusion's table linearly between integer timesteps (as the ODE solvers' denoiser does), so a
sampler that calls it at the wrong timestep samples the wrong distribution.
"""

import math

import numpy as np
import torch

MEANS = torch.tensor([-0.6, 0.1, 0.7], dtype=torch.float64)
STDS = torch.tensor([0.08, 0.15, 0.05], dtype=torch.float64)
WEIGHTS = torch.tensor([0.45, 0.35, 0.2], dtype=torch.float64)


def log_sigma_table(alphas_cumprod):
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.log(np.sqrt((1 - abar) / abar))


def sigma_of_timestep(alphas_cumprod, t, rescaled=False):
    """Per-sample float64 noise levels [N, 1] of (fractional) timesteps t (a tensor)."""
    log_sigmas = log_sigma_table(alphas_cumprod)
    steps = len(log_sigmas)
    t = t.double().cpu().numpy()
    if rescaled:
        t = t * steps / 1000.0
    return torch.from_numpy(np.exp(np.interp(t, np.arange(steps), log_sigmas))).view(-1, 1)


# ----------------------------------------------------------------------------- 1-D mixture


def mixture_denoiser(x, sigma, means=MEANS, stds=STDS, weights=WEIGHTS):
    """E[x_0 | x_0 + sigma n] for the 1-D mixture; x is [N, 1], sigma a float or [N, 1]."""
    x = x.double()
    var = stds**2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2
    log_r = torch.log(weights) - 0.5 * torch.log(var) - (x - means) ** 2 / (2 * var)
    resp = torch.softmax(log_r, dim=1)
    return (resp * (means + stds**2 / var * (x - means))).sum(1, keepdim=True)


def mixture_model(alphas_cumprod, rescaled=False, **mixture):
    """The exact eps(x_t, t) of the 1-D mixture under a diffusion's noise levels."""

    def model(x_t, t, **kwargs):
        sigma = sigma_of_timestep(alphas_cumprod, t, rescaled)
        x = x_t.double() * torch.sqrt(1 + sigma**2)
        return ((x - mixture_denoiser(x, sigma, **mixture)) / sigma).to(x_t.dtype)

    return model


def mixture_cdf(z, means=MEANS, stds=STDS, weights=WEIGHTS):
    z = z.view(-1, 1)
    return (weights * 0.5 * (1 + torch.erf((z - means) / (stds * math.sqrt(2))))).sum(1)


def wasserstein1(samples, **mixture):
    """W1 between the empirical distribution of 1-D samples and the mixture: int |F_n - F|."""
    values = np.sort(samples.double().reshape(-1).cpu().numpy())
    grid = torch.linspace(-1.6, 1.6, 32001, dtype=torch.float64)
    empirical = np.searchsorted(values, grid.numpy(), side="right") / len(values)
    step = float(grid[1] - grid[0])
    return float(np.abs(mixture_cdf(grid, **mixture).numpy() - empirical).sum() * step)


def mixture_samples(n, generator, means=MEANS, stds=STDS, weights=WEIGHTS):
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return means[k] + stds[k] * torch.randn(n, generator=generator, dtype=torch.float64)


def monte_carlo_level(n, repeats=8, seed=1, **mixture):
    """
    How far n exact draws are from the mixture in W1: mean + 3 standard deviations over
    `repeats` draws; a sampler cannot be told apart from exact sampling below it.
    """
    gen = torch.Generator().manual_seed(seed)
    floors = [wasserstein1(mixture_samples(n, gen, **mixture), **mixture) for _ in range(repeats)]
    return float(np.mean(floors) + 3 * np.std(floors))


# ----------------------------------------------------------------------------- Gaussian


class GaussianData:
    """
    N(mean, cov) in d dimensions, laid out as images [N, 1, 1, d] (one channel, one row), with
    its exact denoiser and conditional laws.
    """

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        self.dim = len(self.mean)

    def denoise(self, x, sigma):
        """E[x_0 | x_0 + sigma n] for x [N, d] and per-sample sigma [N, 1]."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        out = torch.empty_like(x)
        for value in torch.unique(sigma):
            rows = (sigma == value).view(-1)
            gain = self.cov @ torch.linalg.inv(self.cov + value**2 * eye)
            out[rows] = self.mean + (x[rows] - self.mean) @ gain.T
        return out

    def model(self, alphas_cumprod, rescaled=False):
        """The exact eps(x_t, t) under a diffusion's noise levels, for [N, 1, 1, d] images."""

        def model(x_t, t, **kwargs):
            sigma = sigma_of_timestep(alphas_cumprod, t, rescaled)
            flat = x_t.double().reshape(len(x_t), self.dim)
            x = flat * torch.sqrt(1 + sigma**2)
            eps = (x - self.denoise(x, sigma)) / sigma
            return eps.reshape(x_t.shape).to(x_t.dtype)

        return model

    def conditional(self, keep, values):
        """
        The law of the coordinates not in `keep` given x[keep] = values.

        :param keep: a bool tensor [d].
        :return: (mean [d_u], covariance [d_u, d_u]).
        """
        k, u = keep, ~keep
        gain = self.cov[u][:, k] @ torch.linalg.inv(self.cov[k][:, k])
        mean = self.mean[u] + gain @ (torch.as_tensor(values, dtype=torch.float64) - self.mean[k])
        cov = self.cov[u][:, u] - gain @ self.cov[k][:, u]
        return mean, cov

    def sample(self, n, generator):
        chol = torch.linalg.cholesky(self.cov)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mean + z @ chol.T


def gaussian_w2(mean_a, cov_a, mean_b, cov_b):
    """The Wasserstein-2 distance between two Gaussians (Dowson & Landau 1982)."""
    root_b = _sqrtm(cov_b)
    cross = _sqrtm(root_b @ cov_a @ root_b)
    squared = (mean_a - mean_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(squared.clamp_min(0).sqrt())


def _sqrtm(matrix):
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
