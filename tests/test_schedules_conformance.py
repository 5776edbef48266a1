"""Beta schedules, their tables and timestep respacing against the reference vectors."""

import json

import numpy as np
import pytest

from conftest import load_vector
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.diffusion.schedules import diffusion_tables, respace_betas


def test_named_schedules_match_reference(conformance):
    expected = load_vector(conformance / "schedules.pt")
    assert set(expected) == {"linear_1000", "cosine_1000", "linear_4000", "cosine_4000", "linear_50", "cosine_7"}
    for key, betas in expected.items():
        name, steps = key.split("_")
        ours = gd.get_named_beta_schedule(name, int(steps))
        assert ours.dtype == np.float64
        # README: float64 tables. A libm cos an ulp off moves a cosine beta = 1 - abar ratio by
        # ~2^-52 / beta, under 1e-10 for the smallest betas here (~1e-5).
        np.testing.assert_allclose(ours, betas.numpy(), rtol=1e-10, atol=0, err_msg=key)


def test_unknown_schedule_lists_known_ones():
    with pytest.raises(ValueError, match="linear, cosine") as info:
        gd.get_named_beta_schedule("quadratic", 10)
    # Code that caught the reference's NotImplementedError still catches it.
    assert isinstance(info.value, NotImplementedError)


def test_too_short_linear_schedule_is_refused():
    # 20 steps would put beta at exactly 1 (alpha_bar = 0, infinite tables); 21 is still valid.
    with pytest.raises(ValueError, match="diffusion_steps > 20"):
        gd.get_named_beta_schedule("linear", 20)
    betas = gd.get_named_beta_schedule("linear", 21)
    assert betas.max() < 1
    assert np.isfinite(diffusion_tables(betas)["sqrt_recip_alphas_cumprod"]).all()
    # Short cosine schedules stay available (their betas are capped at 0.999).
    assert gd.get_named_beta_schedule("cosine", 5).max() <= 0.999


def _spacing(conformance):
    return json.loads((conformance / "spacing.json").read_text())


def test_space_timesteps_matches_reference(conformance):
    cases = _spacing(conformance)["cases"]
    assert len(cases) >= 10
    for case in cases:
        got = space_timesteps(case["num_timesteps"], case["section_counts"])
        assert isinstance(got, set)
        assert sorted(got) == case["result"], case


def test_space_timesteps_errors_match_reference(conformance):
    errors = _spacing(conformance)["errors"]
    assert errors
    for case in errors:
        exc = {"ValueError": ValueError}[case["raises"]]
        with pytest.raises(exc):
            space_timesteps(case["num_timesteps"], case["section_counts"])


def test_impossible_respacing_message_names_both_counts():
    with pytest.raises(ValueError) as info:
        space_timesteps(1000, "ddim3000")
    message = str(info.value)
    assert "3000" in message and "1000" in message
    # A count that exists but has no integer stride points to section counts, which can work.
    with pytest.raises(ValueError, match="use '7' .evenly spaced"):
        space_timesteps(10, "ddim7")
    assert len(space_timesteps(10, "7")) == 7
    with pytest.raises(ValueError) as info:
        space_timesteps(10, "11")
    assert "11" in str(info.value) and "10" in str(info.value)
    with pytest.raises(ValueError, match="step counts"):
        space_timesteps(100, "fast")


def test_respaced_process_keeps_alpha_bar_at_kept_steps():
    betas = gd.get_named_beta_schedule("cosine", 200)
    full = diffusion_tables(betas)["alphas_cumprod"]
    keep = space_timesteps(200, "10,7")
    new_betas, timestep_map = respace_betas(full, keep)
    assert timestep_map == sorted(keep)
    np.testing.assert_allclose(np.cumprod(1 - new_betas), full[timestep_map], rtol=1e-9)
    with pytest.raises(ValueError, match="outside"):
        respace_betas(full, {0, 200})


def test_spaced_diffusion_tables(conformance):
    # A respaced diffusion over every step is the base diffusion.
    betas = gd.get_named_beta_schedule("linear", 50)
    kwargs = dict(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    spaced = SpacedDiffusion(use_timesteps=range(50), **kwargs)
    base = gd.GaussianDiffusion(**kwargs)
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-12)
    assert spaced.timestep_map == list(range(50))


def test_loss_type_is_vb():
    assert gd.LossType.KL.is_vb() and gd.LossType.RESCALED_KL.is_vb()
    assert not gd.LossType.MSE.is_vb() and not gd.LossType.RESCALED_MSE.is_vb()
