"""Likelihood helpers, timestep embeddings and timestep samplers against the reference vectors."""

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

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def misc(conformance):
    return load_vector(conformance / "misc.pt")


@pytest.mark.parametrize(
    "name", ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"]
)
def test_loss_helpers(misc, name):
    case = misc[name]
    if name == "discretized_gaussian_log_likelihood":
        x, means, log_scales = case["inputs"]
        out = losses.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    else:
        out = getattr(losses, name)(*case["inputs"])
    torch.testing.assert_close(out, case["out"], **TOL)


def test_normal_kl_accepts_numbers():
    mean = torch.zeros(3)
    assert torch.allclose(losses.normal_kl(mean, 0.0, mean, 0.0), torch.zeros(3))
    with pytest.raises(TypeError):
        losses.normal_kl(0.0, 0.0, 0.0, 0.0)


def test_timestep_embedding(misc):
    case = misc["timestep_embedding"]
    t = case["t"]
    torch.testing.assert_close(timestep_embedding(t, 128), case["dim128"], **TOL)
    torch.testing.assert_close(timestep_embedding(t, 33), case["dim33"], **TOL)
    torch.testing.assert_close(timestep_embedding(t, 64, max_period=100), case["dim64_maxperiod100"], **TOL)


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
    np.testing.assert_allclose(sampler.weights(), case["weights"].numpy(), rtol=1e-6)
    np.random.seed(case["np_seed"])
    indices, weights = sampler.sample(len(case["sample_indices"]), "cpu")
    assert torch.equal(indices, case["sample_indices"])
    torch.testing.assert_close(weights, case["sample_weights"], **TOL)


def test_uniform_sampler(misc):
    case = misc["uniform"]
    # The vectors were drawn for the same 20-step diffusion as the second-moment case.
    sampler = create_named_schedule_sampler("uniform", _FakeDiffusion(misc["loss_second_moment"]["num_timesteps"]))
    assert isinstance(sampler, UniformSampler)
    np.random.seed(case["np_seed"])
    indices, weights = sampler.sample(len(case["sample_indices"]), "cpu")
    assert torch.equal(indices, case["sample_indices"])
    torch.testing.assert_close(weights, case["sample_weights"], **TOL)


def test_unknown_sampler_is_named():
    with pytest.raises(NotImplementedError, match="loss-second-moment"):
        create_named_schedule_sampler("importance", _FakeDiffusion(10))
