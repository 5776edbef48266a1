"""DDIM inversion (ddim_reverse_sample_loop), slerp and the reconstruction/consistency metrics.

Oracles: the closed-form probability-flow map of Gaussian data (for x_0 ~ N(mu, s^2 I) the
optimal noise prediction is linear in x_t and the deterministic DDIM flow sends x_0 to
sqrt(abar) mu + sqrt(abar s^2 + 1 - abar) (x_0 - mu) / s), exact invertibility when the noise
prediction does not depend on x, the slerp formula evaluated independently in numpy, and a small
UNet trained for a few seconds inside the test."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.diffusion.inversion import (
    consistency_distances,
    ddim_round_trip,
    mean_pixel_distance,
    psnr,
    reconstruction_mse,
    slerp,
    slerp_pairs,
)
from guided_diffusion.script_util import diffusion_for_steps
from guided_diffusion.cli.flags import parse_step_counts
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
from guided_diffusion.image_datasets import read_image_folder
from guided_diffusion.sampling.files import uint8_to_model_input
from guided_diffusion.script_util import create_gaussian_diffusion, create_model

MU, S = 0.3, 0.5


pytestmark = pytest.mark.usefixtures("single_thread")


def alphas_cumprod(schedule, steps=1000):
    return np.cumprod(1.0 - get_named_beta_schedule(schedule, steps))


def gaussian_denoiser(abar_table):
    """eps*(x_t, t) for x_0 ~ N(MU, S^2 I), indexed by the original timestep the model sees."""
    abar_table = torch.tensor(abar_table)

    def model(x, t):
        a = abar_table[t].view(-1, *([1] * (x.dim() - 1)))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * S * S + 1 - a)).float()

    return model


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_gaussian_data_reconstruction_and_latents_converge_as_steps_grow(schedule):
    torch.manual_seed(0)
    x0 = MU + S * torch.randn(8, 3, 4, 4)
    abar = alphas_cumprod(schedule)
    model = gaussian_denoiser(abar)
    recon_errors, latent_errors = [], []
    for steps in (10, 20, 50, 100, 200):
        diffusion = create_gaussian_diffusion(noise_schedule=schedule, timestep_respacing=f"ddim{steps}")
        x_T, recon = ddim_round_trip(diffusion, model, x0, clip_denoised=False)
        # The exact flow ends where ddim_sample_loop starts: the last kept timestep.
        a_T = abar[max(diffusion.use_timesteps)]
        exact = math.sqrt(a_T) * MU + math.sqrt(a_T * S * S + 1 - a_T) * (x0 - MU) / S
        recon_errors.append(rms(recon, x0))
        latent_errors.append(rms(x_T, exact))
        # Discretisation error of a first-order ODE solver: O(1 / steps).
        assert recon_errors[-1] < 2.5 / steps, (steps, recon_errors)
        assert latent_errors[-1] < 1.0 / math.sqrt(steps), (steps, latent_errors)
    assert recon_errors == sorted(recon_errors, reverse=True), recon_errors
    assert latent_errors == sorted(latent_errors, reverse=True), latent_errors


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_inversion_beats_chaining_the_reference_reverse_step(schedule):
    # The reference's ddim_reverse_sample maps x_t to x_{t+1}; chained from t = 0 it treats the
    # image as x at t = 0 and ends at alpha_bar = 0 rather than where decoding starts.
    torch.manual_seed(0)
    x0 = MU + S * torch.randn(8, 3, 4, 4)
    model = gaussian_denoiser(alphas_cumprod(schedule))
    for steps in (10, 20, 50, 100):
        diffusion = create_gaussian_diffusion(noise_schedule=schedule, timestep_respacing=f"ddim{steps}")
        chained = x0
        for i in range(diffusion.num_timesteps):
            t = torch.full((len(x0),), i)
            chained = diffusion.ddim_reverse_sample(model, chained, t, clip_denoised=False)["sample"]
        ours = diffusion.ddim_reverse_sample_loop(model, x0, clip_denoised=False)

        def error(x_T):
            decoded = diffusion.ddim_sample_loop(model, x0.shape, noise=x_T, clip_denoised=False)
            return (decoded - x0).pow(2).mean().item()

        assert error(ours) < 0.8 * error(chained), (steps, error(ours), error(chained))


@pytest.mark.parametrize("respacing", ["", "ddim7", "5,3"])
def test_inversion_is_exact_when_the_noise_prediction_ignores_x(respacing):
    # eps(x_t, t) = g(t) * pattern: evaluating it at the step's input instead of its output
    # changes nothing, so decoding must undo inversion to float precision. This pins the noise
    # levels of every inversion step to those of ddim_sample.
    torch.manual_seed(1)
    pattern = torch.randn(2, 3, 4, 4)

    def model(x, t):
        return pattern * torch.cos(t.float() / 40).view(-1, 1, 1, 1)

    diffusion = create_gaussian_diffusion(steps=40, noise_schedule="linear", timestep_respacing=respacing)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    x_T, recon = ddim_round_trip(diffusion, model, x0, clip_denoised=False)
    # Only float32 rounding remains, amplified by decoding's division by sqrt(alpha_bar) at x_T.
    atol = 1e-6 / math.sqrt(diffusion.alphas_cumprod[-1])
    torch.testing.assert_close(recon, x0, atol=atol, rtol=0)
    assert rms(x_T, x0) > 0.3  # it did move


def test_guided_inversion_is_undone_by_guided_decoding():
    torch.manual_seed(2)
    pattern, shift = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def model(x, t):
        return pattern * (t.float() / 50).view(-1, 1, 1, 1)

    def cond_fn(x, t):
        return shift

    diffusion = create_gaussian_diffusion(steps=50, timestep_respacing="ddim10")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    plain = diffusion.ddim_reverse_sample_loop(model, x0, clip_denoised=False)
    guided = diffusion.ddim_reverse_sample_loop(model, x0, clip_denoised=False, cond_fn=cond_fn)
    assert rms(plain, guided) > 0.1
    recon = diffusion.ddim_sample_loop(model, x0.shape, noise=guided, clip_denoised=False, cond_fn=cond_fn)
    torch.testing.assert_close(recon, x0, atol=1e-6 / math.sqrt(diffusion.alphas_cumprod[-1]), rtol=0)


@pytest.mark.parametrize("respacing,rescale", [("ddim10", False), ("10,5", True), ("", False)])
def test_reverse_loop_visits_the_forward_timesteps_in_reverse(respacing, rescale):
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return 0.1 * x

    diffusion = create_gaussian_diffusion(
        steps=100, timestep_respacing=respacing, rescale_timesteps=rescale
    )
    x0 = torch.zeros(3, 3, 2, 2)
    diffusion.ddim_sample_loop(model, x0.shape, noise=x0)
    forward, seen[:] = list(seen), []
    diffusion.ddim_reverse_sample_loop(model, x0)
    backward = list(seen)

    kept = sorted(diffusion.use_timesteps)
    scale = 1000.0 / 100 if rescale else 1
    assert [ts[0] for ts in backward] == pytest.approx([k * scale for k in kept])
    assert backward == forward[::-1]
    assert all(len(set(ts)) == 1 and len(ts) == 3 for ts in backward)


def test_class_conditional_inversion_uses_the_labels():
    torch.manual_seed(3)
    unet = create_model(8, 32, 1, channel_mult="1,2", class_cond=True, num_classes=4,
                        attention_resolutions="", num_head_channels=16).eval()
    with torch.no_grad():  # zero-initialised output layers would hide the label: fill them
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    seen = []

    def model(x, t, y=None):
        seen.append(y.clone())
        return unet(x, t, y=y)

    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="ddim5")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    labels = torch.tensor([1, 3])
    x_T = diffusion.ddim_reverse_sample_loop(model, x0, model_kwargs={"y": labels})
    assert len(seen) == 5 and all(torch.equal(y, labels) for y in seen)
    other = diffusion.ddim_reverse_sample_loop(model, x0, model_kwargs={"y": torch.tensor([0, 2])})
    assert rms(x_T, other) > 1e-3


def test_eta_other_than_zero_is_refused_at_the_call():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    x0 = torch.zeros(1, 3, 2, 2)
    for call in (diffusion.ddim_reverse_sample_loop, diffusion.ddim_reverse_sample_loop_progressive):
        with pytest.raises(ValueError, match="not a deterministic map and cannot be inverted"):
            call(lambda x, t: x, x0, eta=0.5)


def test_progressive_inversion_yields_each_step_and_draws_no_random_numbers():
    diffusion = create_gaussian_diffusion(steps=30, timestep_respacing="ddim6")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1

    def model(x, t):
        return 0.3 * x

    state = torch.get_rng_state()
    steps = list(diffusion.ddim_reverse_sample_loop_progressive(model, x0))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(steps) == 6 and set(steps[0]) == {"sample", "pred_xstart"}
    torch.testing.assert_close(steps[-1]["sample"], diffusion.ddim_reverse_sample_loop(model, x0))


@pytest.fixture(scope="module")
def trained_unet(tmp_path_factory):
    """A small UNet trained on 8x8 digits for a few seconds (EPSILON, fixed variances)."""
    folder = write_digits(str(tmp_path_factory.mktemp("digits")), image_size=8, limit=64)
    images, _ = read_image_folder(folder, 8)
    data = uint8_to_model_input(images)
    torch.manual_seed(0)
    model = create_model(8, 32, 1, channel_mult="1,2", attention_resolutions="", num_head_channels=16)
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        batch = data[torch.randint(0, len(data), (16,))]
        t = torch.randint(0, diffusion.num_timesteps, (16,))
        loss = diffusion.training_losses(model, batch, t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), data


def test_trained_model_reconstruction_improves_with_steps(trained_unet):
    model, data = trained_unet
    flags = dict(diffusion_steps=100, learn_sigma=False, noise_schedule="cosine", use_kl=False,
                 predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
    x0 = data[:8]
    errors = []
    for steps in (5, 20, 100):
        diffusion = diffusion_for_steps(flags, steps)
        with torch.no_grad():
            _, recon = ddim_round_trip(diffusion, model, x0)
        errors.append(reconstruction_mse(x0, recon).mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert psnr(errors[2]) > 30, errors
    assert errors[0] > 2 * errors[2], errors


# ----------------------------------------------------------------------------- slerp


def test_slerp_endpoints_are_the_inputs():
    torch.manual_seed(4)
    a, b = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-6, rtol=0)
    row = slerp_pairs(a, b, 5)
    assert row.shape == (15, 2, 5, 5)
    torch.testing.assert_close(row[0], a[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(row[4], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(row[10], a[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(row[7], slerp(a[1:2], b[1:2], 0.5)[0])


def test_slerp_norms_and_angles_follow_the_formula():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 3, 6, 6))
    b = rng.normal(size=(4, 3, 6, 6)) * np.array([1.0, 2.0, 0.5, 3.0]).reshape(4, 1, 1, 1)
    fa, fb = a.reshape(4, -1), b.reshape(4, -1)
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    theta = np.arccos((fa * fb).sum(1) / (na * nb))
    for alpha in (0.1, 0.25, 0.5, 0.9):
        out = slerp(torch.tensor(a), torch.tensor(b), alpha).numpy().reshape(4, -1)
        w0, w1 = np.sin((1 - alpha) * theta) / np.sin(theta), np.sin(alpha * theta) / np.sin(theta)
        expected = np.sqrt(w0**2 * na**2 + w1**2 * nb**2 + 2 * w0 * w1 * na * nb * np.cos(theta))
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), expected, rtol=1e-10)
        # The path lies in the plane of a and b, alpha * theta away from a when norms are equal.
        unit = slerp(torch.tensor(fa / na[:, None]), torch.tensor(fb / nb[:, None]), alpha).numpy()
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-10)
        np.testing.assert_allclose(np.arccos((unit * fa / na[:, None]).sum(1)), alpha * theta, rtol=1e-8)
    # Gaussian latents keep their norm along slerp but not along a straight line.
    z0, z1 = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    mid = slerp(z0, z1, 0.5)
    assert abs(mid.norm() / z0.norm() - 1) < 0.1
    assert ((z0 + z1) / 2).norm() / z0.norm() < 0.8


def test_slerp_of_parallel_vectors_is_linear_and_zero_vectors_are_refused():
    a = torch.ones(1, 4)
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)
    with pytest.raises(ValueError, match="zero vector"):
        slerp(torch.zeros(1, 4), a, 0.5)
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, torch.ones(1, 5), 0.5)


# ----------------------------------------------------------------------------- metrics


def test_reconstruction_metrics():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.2  # 0.1 on the [0, 1] scale
    np.testing.assert_allclose(reconstruction_mse(x, y).numpy(), [0.01, 0.0], atol=1e-9)
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(0.0) == math.inf
    # Outputs beyond [-1, 1] count as saved (clamped).
    np.testing.assert_allclose(reconstruction_mse(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.0)).numpy(), [0.0])


def test_consistency_distances_compare_with_the_finest_decoding():
    fine = np.zeros((2, 2, 2, 3), np.uint8)
    coarse = fine.copy()
    coarse[0, 0, 0, 0] = 120  # one of 12 values of image 0 off by 120
    result = consistency_distances({100: fine, 10: coarse, 50: fine})
    assert list(result) == [10, 50, 100]
    assert result[100] == {"mean_abs_pixel_distance": 0.0, "mse": 0.0}
    assert result[10]["mean_abs_pixel_distance"] == pytest.approx(120 / 12 / 2)
    assert result[10]["mse"] == pytest.approx((120 / 255) ** 2 / 24)
    np.testing.assert_allclose(mean_pixel_distance(coarse, fine), [10.0, 0.0])


def test_parse_step_counts():
    assert parse_step_counts("20,10, 50,10") == [10, 20, 50]
    assert parse_step_counts("ddim25") == [25]
    for bad in ("", "0", "ten", "10,-5"):
        with pytest.raises(ValueError):
            parse_step_counts(bad)
