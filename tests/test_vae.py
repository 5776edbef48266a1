"""The VAE networks, loss terms, checkpoint checks and a short digits run (trained vs untrained)."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from guided_diffusion.vae import (
    create_vae,
    evaluate_elbo,
    fit_pca,
    gaussian_kl,
    interpolate,
    knn_accuracy,
    load_vae,
    transform,
    vae_defaults,
    vae_losses,
    vae_state,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def _flags(**kw):
    flags = vae_defaults()
    flags.update(kw)
    return flags


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("image_size", [8, 28])
def test_shapes_and_finite_losses(arch, likelihood, image_size):
    torch.manual_seed(0)
    model = create_vae(**_flags(arch=arch, likelihood=likelihood, image_size=image_size, latent_size=3, hidden_size=16, num_channels=8))
    x = model.prepare_input(torch.rand(5, 3, image_size, image_size) * 2 - 1)
    assert x.shape == (5, 1 if arch == "mlp" else 3, image_size, image_size)
    out = model(x)
    assert out["mu"].shape == out["z"].shape == (5, 3)
    terms = vae_losses(model, x, out, beta=0.5)
    for value in terms.values():
        assert value.shape == (5,) and torch.isfinite(value).all()
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.5 * terms["kl"])
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))
    sample = model.sample(4)
    assert sample.shape == (4,) + x.shape[1:] and sample.min() >= 0 and sample.max() <= 1


def test_prepare_input_uses_luma_for_grayscale():
    model = create_vae(**_flags(image_size=2, hidden_size=4, latent_size=2))
    batch = torch.zeros(1, 3, 2, 2)
    batch[:, 0] = 1.0  # pure red: [0, 1] red channel is 1, the others 0.5
    expected = 0.299 * 1.0 + 0.587 * 0.5 + 0.114 * 0.5
    torch.testing.assert_close(model.prepare_input(batch), torch.full((1, 1, 2, 2), expected))
    with pytest.raises(ValueError, match="--image_size 2"):
        model.prepare_input(torch.zeros(1, 3, 4, 4))


def test_kl_and_likelihoods_match_torch_distributions():
    torch.manual_seed(1)
    mu, logvar = torch.randn(6, 4), torch.randn(6, 4)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)

    bern = create_vae(**_flags(image_size=3, hidden_size=4, latent_size=2))
    logits = torch.randn(2, 1, 3, 3)
    x = torch.randint(0, 2, (2, 1, 3, 3)).float()
    torch.testing.assert_close(bern.log_likelihood(x, logits), Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1))

    gauss = create_vae(**_flags(image_size=3, hidden_size=4, latent_size=2, likelihood="gaussian"))
    decoded = gauss.decode(torch.randn(2, 2))
    mean, logvar_x = decoded[:, :1], decoded[:, 1:]
    x = torch.rand(2, 1, 3, 3)
    ref = Normal(mean, (0.5 * logvar_x).exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gauss.log_likelihood(x, decoded), ref)
    assert (logvar_x >= 2 * math.log(0.01) - 1e-6).all()


def test_reparameterisation_draws_from_posterior_and_passes_gradients():
    torch.manual_seed(2)
    model = create_vae(**_flags(image_size=4, hidden_size=8, latent_size=2))
    x = torch.rand(1, 1, 4, 4).expand(4000, -1, -1, -1)
    out = model(x)
    mu, std = out["mu"][0], (0.5 * out["logvar"][0]).exp()
    z = out["z"].detach()
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=4 * std.max().item() / 60, rtol=0)
    torch.testing.assert_close(z.std(0), std.detach(), rtol=0.06, atol=0)
    vae_losses(model, x[:8], model(x[:8]))["loss"].mean().backward()
    assert model.encoder.mu.weight.grad.abs().sum() > 0
    assert model.encoder.logvar.weight.grad.abs().sum() > 0


def test_class_conditioning_changes_decoder_and_validates_labels():
    torch.manual_seed(3)
    model = create_vae(**_flags(image_size=4, hidden_size=8, latent_size=2, class_cond=True, num_classes=3))
    z = torch.randn(1, 2)
    a = model.decode(z, torch.tensor([0]))
    b = model.decode(z, torch.tensor([2]))
    assert not torch.allclose(a, b)
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="pass labels"):
        model(x)
    with pytest.raises(ValueError, match="--num_classes"):
        model(x, torch.tensor([0, 3]))
    plain = create_vae(**_flags(image_size=4, hidden_size=8, latent_size=2))
    with pytest.raises(ValueError, match="class_cond"):
        plain(x, torch.tensor([0, 1]))
    path = interpolate(model, x[:1], x[1:], 5, torch.tensor([0]), torch.tensor([2]))
    assert path.shape == (5, 1, 4, 4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(latent_size=0), "--latent_size must be a positive integer, got 0"),
        (dict(arch="resnet"), "--arch must be one of"),
        (dict(likelihood="poisson"), "--likelihood must be one of"),
        (dict(hidden_size=-1), "--hidden_size"),
    ],
)
def test_bad_flags_give_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        create_vae(**_flags(**bad))


def test_checkpoint_for_other_architecture_names_the_flag():
    flags = _flags(image_size=8, hidden_size=16, latent_size=2)
    model = create_vae(**flags)
    state = vae_state(model, torch.optim.Adam(model.parameters()), 7, flags)
    loaded = load_vae(state, flags)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match=r"pass --latent_size 2 \(given 20\)"):
        load_vae(state, dict(flags, latent_size=20))
    with pytest.raises(ValueError, match=r"--arch mlp \(given conv\)"):
        load_vae(state, dict(flags, arch="conv"))
    # Another model's plain state dict (a diffusion UNet, a classifier, ...).
    with pytest.raises(ValueError, match="not a VAE checkpoint.*plain state dict"):
        load_vae(torch.nn.Linear(2, 2).state_dict(), flags)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(d.target)


def _knn_on_2d_pca(model, x, y):
    with torch.no_grad():
        mu, _ = model.encode(x)
    return knn_accuracy(transform(fit_pca(mu), mu)[:, :2], y, k=5)


def test_training_on_digits_improves_elbo_and_latent_clusters():
    x, y = _digits()  # 1797 8x8 digits, grey values in [0, 1]
    torch.manual_seed(0)
    model = create_vae(**_flags(image_size=8, hidden_size=200, latent_size=2))
    untrained_knn = _knn_on_2d_pca(model, x, y)
    torch.manual_seed(10)
    elbo_start = evaluate_elbo(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = x[torch.randint(0, len(x), (100,), generator=gen)]
        loss = vae_losses(model, batch, model(batch))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(10)
    elbo_end = evaluate_elbo(model, x)
    trained_knn = _knn_on_2d_pca(model, x, y)
    # Measured: ELBO about -46 -> -26 nats, kNN about 0.34 -> 0.62 (chance 0.10).
    assert elbo_end > elbo_start + 10
    assert trained_knn > untrained_knn + 0.15
    assert trained_knn > 0.45
    # Reconstructions resemble their own input more than other digits.
    recon = model.reconstruct(x[:200])
    own = ((recon - x[:200]) ** 2).flatten(1).sum(1)
    other = ((recon - x[:200].roll(1, dims=0)) ** 2).flatten(1).sum(1)
    assert (own < other).float().mean() > 0.7


def test_defaults_are_the_constructor_defaults_and_every_recorded_flag():
    from guided_diffusion.vae import ARCH_FLAGS

    defaults = vae_defaults()
    # One place for the values: create_vae's keywords; the checkpoint records exactly these.
    assert set(defaults) == set(ARCH_FLAGS)
    assert defaults == dict(arch="mlp", image_size=28, latent_size=20, hidden_size=500,
                            num_channels=32, likelihood="bernoulli", class_cond=False, num_classes=10)
    assert create_vae().latent_size == defaults["latent_size"]
