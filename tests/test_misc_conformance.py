"""
Likelihood helpers, timestep embeddings and timestep samplers against the reference vectors.

Float32 +, -, * and / are correctly rounded everywhere, so the same inputs give the same results;
what moves between machines are exp, log, pow, sin, cos and tanh, whose scalar (libm) and vector
(SLEEF) versions are each within an ulp or two of the exact value: two of them can differ by
2 ulp. The tolerances below carry that through each formula.
"""

import math

import numpy as np
import pytest
import torch

from conftest import load_vector
from guided_diffusion import losses
from guided_diffusion.nn import timestep_embedding
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

# The README's single-call tolerance.
TOL = dict(rtol=1e-4, atol=1e-4)
EPS32 = 2.0**-23  # float32 machine epsilon: one ulp of 1


@pytest.fixture(scope="module")
def misc(conformance):
    return load_vector(conformance / "misc.pt")


def _bin_log_probability_bound(x, out):
    """
    How far two correct float32 evaluations of discretized_gaussian_log_likelihood may differ,
    per element, for the reference's result `out` = log p at images `x`.

    Each CDF is 0.5 * (1 + tanh(u)) with u from exp(-log_scales) and pow(z, 3): those three
    functions, 2 ulp apart between implementations, move u by ~1.3e-6 relative and a CDF by at
    most ~4 ulp(1) < 2^-20. The bin probability p is one CDF at the edge bins (x = -1 or 1) and a
    difference of two inside, so it moves by E = 2^-20 or 2^-19; log p then moves by up to
    log(p + E) - log(max(p - E, 1e-12)) (1e-12 is the clamp). That is ~2E / p: 6e-5 for the
    likeliest bins here (p ~ 0.06), but several nats for the far-tail bins (p down to 1e-8).
    """
    p = out.double().exp()
    edge = (x < -0.999) | (x > 0.999)
    err = torch.where(edge, 2.0**-20, 2.0**-19).double()
    return torch.log(p + err) - torch.log((p - err).clamp(min=1e-12))


@pytest.mark.parametrize(
    "name", ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"]
)
def test_loss_helpers(misc, name):
    case = misc[name]
    expected = case["out"]
    if name == "discretized_gaussian_log_likelihood":
        x, means, log_scales = case["inputs"]
        out = losses.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
        assert out.dtype == expected.dtype and out.shape == expected.shape
        allowed = TOL["atol"] + TOL["rtol"] * expected.double().abs()
        allowed = allowed + _bin_log_probability_bound(x, expected)
        excess = (out.double() - expected.double()).abs() - allowed
        assert (excess <= 0).all(), f"off by {excess.max().item():.3g} beyond tolerance"
    else:
        out = getattr(losses, name)(*case["inputs"])
        # normal_kl: exp terms within 2^-22 relative; here they are at most ~175, so <= 4.2e-5.
        # approx_standard_normal_cdf: as above, <= 2^-20. Both inside the single-call tolerance.
        torch.testing.assert_close(out, expected, **TOL)


def test_normal_kl_accepts_numbers():
    mean = torch.zeros(3)
    assert torch.allclose(losses.normal_kl(mean, 0.0, mean, 0.0), torch.zeros(3))
    with pytest.raises(TypeError):
        losses.normal_kl(0.0, 0.0, 0.0, 0.0)


def _ulp32(x):
    """The spacing of float32 numbers at |x|, as float64."""
    x = x.float().abs()
    return (torch.nextafter(x, torch.tensor(math.inf)) - x).double()


def _embedding_bound(t, dim, max_period):
    """
    How far two correct float32 evaluations of timestep_embedding(t, dim, max_period) may differ,
    per element.

    The exponents -ln(max_period) * i / half round identically everywhere (half is a power of two
    for every width tested, so the reference's order of operations gives the same floats). Their
    exp, 2 ulp apart between implementations, gives frequencies within 2 * EPS32 relative; the
    float32 angle t * freq then differs by up to |t * freq| * 2 * EPS32 plus one ulp where its
    rounding goes the other way: 1.2e-3 at t = 3999 (ulp(3999) = 2^-12). cos and sin have slope
    at most 1 and add 2 ulp of values <= 1 (2 * EPS32). The zero padding of odd widths is exact.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    angles = t.double()[:, None] * freqs[None]
    bound = angles.abs() * 2 * EPS32 + _ulp32(angles) + 2 * EPS32
    bound = torch.cat([bound, bound], dim=1)
    if dim % 2:
        bound = torch.cat([bound, torch.zeros_like(bound[:, :1])], dim=1)
    return bound


@pytest.mark.parametrize(
    "key, dim, max_period",
    [("dim128", 128, 10000), ("dim33", 33, 10000), ("dim64_maxperiod100", 64, 100)],
)
def test_timestep_embedding(misc, key, dim, max_period):
    case = misc["timestep_embedding"]
    t, expected = case["t"], case[key]
    ours = timestep_embedding(t, dim, max_period=max_period)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    diff = (ours.double() - expected.double()).abs()
    bound = _embedding_bound(t, dim, max_period)
    worst = (diff - bound).flatten().argmax()
    assert (diff <= bound).all(), (
        f"{key}: element {worst.item()} is off by {diff.flatten()[worst].item():.3g}, "
        f"bound {bound.flatten()[worst].item():.3g}"
    )


class _FakeDiffusion:
    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps


def test_loss_second_moment_resampler(misc):
    case = misc["loss_second_moment"]
    sampler = LossSecondMomentResampler(
        _FakeDiffusion(case["num_timesteps"]),
        history_per_term=case["history_per_term"],
        uniform_prob=case["uniform_prob"],
    )
    # Before warm-up the weights are uniform.
    assert np.array_equal(sampler.weights(), np.ones(case["num_timesteps"]))
    for ts, batch_losses in zip(case["updates_ts"], case["updates_losses"]):
        # The non-distributed path of update_with_local_losses gathers just this rank.
        sampler.update_with_local_losses(ts, batch_losses)
    # update_with_local_losses passes the losses through float32 (2^-24 relative each); the
    # float64 second moments and their normalisation then move by at most 2 * 2^-24 < 2^-22.
    np.testing.assert_allclose(sampler.weights(), case["weights"].numpy(), rtol=2.0**-22, atol=0)
    np.random.seed(case["np_seed"])
    indices, weights = sampler.sample(len(case["sample_indices"]), "cpu")
    assert torch.equal(indices, case["sample_indices"])
    # 1 / (T p) in float64 from those weights (2^-23), rounded to float32: at most 2^-22 relative.
    torch.testing.assert_close(weights, case["sample_weights"], rtol=2.0**-22, atol=0)


def test_uniform_sampler(misc):
    case = misc["uniform"]
    # The vectors were drawn for the same 20-step diffusion as the second-moment case.
    sampler = create_named_schedule_sampler("uniform", _FakeDiffusion(misc["loss_second_moment"]["num_timesteps"]))
    assert isinstance(sampler, UniformSampler)
    np.random.seed(case["np_seed"])
    indices, weights = sampler.sample(len(case["sample_indices"]), "cpu")
    assert torch.equal(indices, case["sample_indices"])
    # 1 / (T p) of uniform float64 probabilities, rounded to float32: one rounding, 2^-24.
    torch.testing.assert_close(weights, case["sample_weights"], rtol=2.0**-24, atol=0)


def test_unknown_sampler_is_named():
    with pytest.raises(NotImplementedError, match="loss-second-moment"):
        create_named_schedule_sampler("importance", _FakeDiffusion(10))
