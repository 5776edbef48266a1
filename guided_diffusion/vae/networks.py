"""
Variational auto-encoder (Kingma & Welling 2013, "Auto-Encoding Variational Bayes").

Two networks share one interface:

- ``arch="mlp"``: the paper's MNIST setting (Appendix C): one tanh hidden layer of ``hidden_size``
  units in the encoder and in the decoder, grayscale images flattened to ``image_size**2`` inputs.
- ``arch="conv"``: a small convolutional encoder/decoder for RGB images.

The decoder is either Bernoulli (logits per pixel) or Gaussian (a mean squashed into (0, 1) and a
per-pixel log-variance, as for the paper's Frey Face model). The model works on pixels in [0, 1];
``prepare_input`` maps the [-1, 1] NCHW batches of ``load_data`` there. With ``class_cond`` the
encoder and decoder both see a one-hot label (a conditional VAE, Sohn et al. 2015).

All losses are in nats per image (summed over pixels and latent dimensions, averaged over the
batch). The ELBO always uses a KL weight of 1; ``beta`` only reweights the KL in the training loss.
"""

import inspect
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")

# The flags that fix the network's shape: a checkpoint records them and loading compares them.
ARCH_FLAGS = (
    "arch",
    "image_size",
    "latent_size",
    "hidden_size",
    "num_channels",
    "likelihood",
    "class_cond",
    "num_classes",
)

# A floor on the Gaussian decoder's log-variance (sigma >= 0.01 on [0, 1] pixels). Constant
# pixels (the black background of digits) would otherwise drive sigma to zero and the density to
# infinity.
GAUSSIAN_MIN_LOGVAR = 2.0 * math.log(0.01)


def vae_defaults():
    """
    Defaults of the architecture flags (the paper's MNIST model with a 20-d latent): the
    keywords of create_vae with their defaults (written once, there).
    """
    return {
        name: param.default
        for name, param in inspect.signature(create_vae).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


def create_vae(
    *,
    arch="mlp",
    image_size=28,
    latent_size=20,
    hidden_size=500,
    num_channels=32,
    likelihood="bernoulli",
    class_cond=False,
    num_classes=10,
):
    """
    Build a VAE from the flags of :func:`vae_defaults`.

    :param arch: "mlp" (grayscale, flattened) or "conv" (RGB).
    :param image_size: side of the square images.
    :param latent_size: dimension of z.
    :param hidden_size: width of the MLP's hidden layers (unused by "conv").
    :param num_channels: base channel count of the convolutional network (unused by "mlp").
    :param likelihood: "bernoulli" or "gaussian" decoder.
    :param class_cond: condition encoder and decoder on a class label.
    :param num_classes: number of labels when class_cond.
    :raises ValueError: on any impossible value, naming the flag.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"--likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    _require_positive("latent_size", latent_size)
    if not isinstance(image_size, int):
        # --image_size parses height,width for the diffusion scripts; these networks are square.
        raise ValueError(f"the VAE takes square images: pass one --image_size, got {image_size}")
    _require_positive("image_size", image_size)
    if arch == "mlp":
        _require_positive("hidden_size", hidden_size)
    else:
        _require_positive("num_channels", num_channels)
    if class_cond:
        _require_positive("num_classes", num_classes)
    return VAE(
        arch=arch,
        image_size=image_size,
        latent_size=latent_size,
        hidden_size=hidden_size,
        num_channels=num_channels,
        likelihood=likelihood,
        num_classes=num_classes if class_cond else None,
    )


def _require_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value!r}")


class VAE(nn.Module):
    """
    Encoder q(z|x[,y]) = N(mu, diag(exp(logvar))), prior p(z) = N(0, I), decoder p(x|z[,y]).

    :param arch: "mlp" or "conv".
    :param image_size: side of the square images.
    :param latent_size: dimension of z.
    :param hidden_size: MLP hidden width.
    :param num_channels: conv base channels.
    :param likelihood: "bernoulli" or "gaussian".
    :param num_classes: None for an unconditional model, else the number of labels.
    """

    def __init__(
        self,
        *,
        arch,
        image_size,
        latent_size,
        hidden_size,
        num_channels,
        likelihood,
        num_classes=None,
    ):
        super().__init__()
        self.arch = arch
        self.image_size = image_size
        self.latent_size = latent_size
        self.likelihood = likelihood
        self.num_classes = num_classes
        self.channels = 1 if arch == "mlp" else 3
        # A Gaussian decoder predicts a mean and a log-variance per pixel.
        out_per_pixel = 2 if likelihood == "gaussian" else 1
        cond = num_classes or 0
        if arch == "mlp":
            self.encoder = _MLPEncoder(
                in_features=image_size * image_size + cond,
                hidden_size=hidden_size,
                latent_size=latent_size,
            )
            self.decoder = _MLPDecoder(
                latent_size=latent_size + cond,
                hidden_size=hidden_size,
                image_size=image_size,
                out_channels=out_per_pixel,
            )
        else:
            self.encoder = _ConvEncoder(
                in_channels=self.channels + cond,
                image_size=image_size,
                num_channels=num_channels,
                latent_size=latent_size,
            )
            self.decoder = _ConvDecoder(
                latent_size=latent_size + cond,
                image_size=image_size,
                num_channels=num_channels,
                out_channels=self.channels * out_per_pixel,
            )

    @property
    def class_cond(self):
        return self.num_classes is not None

    # ---- data space -------------------------------------------------------------------------

    def prepare_input(self, batch):
        """
        Map a [-1, 1] NCHW batch from load_data to the model's [0, 1] pixels (grayscale for MLP).

        :param batch: float tensor [N x C x H x W] in [-1, 1], C in {1, 3}.
        :return: float tensor [N x self.channels x H x W] in [0, 1].
        """
        if batch.dim() != 4:
            raise ValueError(f"expected an NCHW image batch, got shape {tuple(batch.shape)}")
        _, c, h, w = batch.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {h}x{w} but the VAE was built with --image_size {self.image_size}"
            )
        x = (batch.float() + 1.0) / 2.0
        if self.channels == 1 and c == 3:
            # ITU-R 601 luma, the weights PIL uses for mode "L".
            weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)
        elif self.channels == 3 and c == 1:
            x = x.expand(-1, 3, -1, -1)
        elif c != self.channels:
            raise ValueError(f"cannot feed {c}-channel images to a {self.channels}-channel VAE")
        return x.clamp(0.0, 1.0)

    # ---- networks ---------------------------------------------------------------------------

    def _one_hot(self, y, n):
        if not self.class_cond:
            if y is not None:
                raise ValueError("labels were given to a VAE built without --class_cond True")
            return None
        if y is None:
            raise ValueError("this VAE is class conditional (--class_cond True): pass labels y")
        y = y.to(dtype=torch.long)
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(y.shape)}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}); got {int(y.min())}..{int(y.max())}: "
                "raise --num_classes"
            )
        return F.one_hot(y, self.num_classes).float()

    def encode(self, x, y=None):
        """
        Parameters of q(z|x[,y]).

        :param x: [N x C x H x W] pixels in [0, 1].
        :param y: int labels [N] for a class-conditional model, else None.
        :return: (mu, logvar), each [N x latent_size].
        """
        onehot = self._one_hot(y, x.shape[0])
        return self.encoder(x, onehot)

    def decode(self, z, y=None):
        """
        Parameters of p(x|z[,y]): logits for Bernoulli, (mean, logvar) stacked on dim 1 for
        Gaussian, i.e. [N x C x H x W] or [N x 2C x H x W].
        """
        onehot = self._one_hot(y, z.shape[0])
        if onehot is not None:
            z = torch.cat([z, onehot], dim=1)
        out = self.decoder(z)
        if self.likelihood == "gaussian":
            mean_raw, logvar_raw = out.chunk(2, dim=1)
            # Sigmoid mean as in the paper's Frey Face decoder; a soft floor on the log-variance.
            logvar = GAUSSIAN_MIN_LOGVAR + F.softplus(logvar_raw - GAUSSIAN_MIN_LOGVAR)
            out = torch.cat([torch.sigmoid(mean_raw), logvar], dim=1)
        return out

    def decoder_mean(self, decoded):
        """E[x|z] in [0, 1] from the output of :meth:`decode`."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(decoded)
        return decoded[:, : self.channels]

    def log_likelihood(self, x, decoded):
        """
        log p(x|z) per image, in nats, summed over pixels.

        The Bernoulli term uses the [0, 1] grey values as targets (a cross-entropy); the Gaussian
        term is a density on [0, 1] pixels, so it can be positive and is not comparable across
        likelihoods.
        """
        if self.likelihood == "bernoulli":
            ll = -F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
        else:
            mean, logvar = decoded[:, : self.channels], decoded[:, self.channels :]
            ll = -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))
        return ll.flatten(1).sum(dim=1)

    def forward(self, x, y=None):
        """
        One reparameterised pass (L = 1 sample per image, as in the paper's experiments).

        :param x: [N x C x H x W] pixels in [0, 1] (see :meth:`prepare_input`).
        :param y: labels for a class-conditional model.
        :return: dict with mu, logvar, z and decoded (the output of :meth:`decode`).
        """
        mu, logvar = self.encode(x, y)
        # Reparameterisation trick, Kingma & Welling 2013 eq. (4) with g = mu + sigma * eps.
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return dict(mu=mu, logvar=logvar, z=z, decoded=self.decode(z, y))

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n, y=None, device=None):
        """
        Decode n draws from the prior; returns E[x|z] in [0, 1] (not binarised).

        :param n: number of images.
        :param y: labels [n] for a class-conditional model.
        :param device: where to draw z (default: the model's device).
        """
        device = device or next(self.parameters()).device
        z = torch.randn(n, self.latent_size, device=device)
        return self.decoder_mean(self.decode(z, y))

    @torch.no_grad()
    def reconstruct(self, x, y=None):
        """Decode the posterior mean of each image; [0, 1] pixels in, [0, 1] pixels out."""
        mu, _ = self.encode(x, y)
        return self.decoder_mean(self.decode(mu, y))


def gaussian_kl(mu, logvar):
    """
    KL(N(mu, exp(logvar)) || N(0, I)) per row in nats.

    Closed form from Kingma & Welling 2013, Appendix B (the first term of eq. 10).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def vae_losses(model, x, out, beta=1.0):
    """
    Per-image loss terms, in nats, from a forward pass.

    SGVB estimator, Kingma & Welling 2013 eq. (10): ELBO = -KL(q(z|x) || p(z)) + log p(x|z).

    :param model: the VAE (unwrapped; only its parameter-free likelihood is used).
    :param x: the [0, 1] pixels that were fed to the forward pass.
    :param out: the dict returned by :meth:`VAE.forward`.
    :param beta: weight of the KL term in the training loss (Higgins et al. 2017); the ELBO keeps 1.
    :return: dict of [N] tensors: loss (recon + beta * kl), recon (-log p(x|z)), kl, elbo.
    """
    recon = -model.log_likelihood(x, out["decoded"])
    kl = gaussian_kl(out["mu"], out["logvar"])
    return dict(loss=recon + beta * kl, recon=recon, kl=kl, elbo=-(recon + kl))


@torch.no_grad()
def evaluate_elbo(model, x, y=None, num_samples=1):
    """
    Mean ELBO in nats per image over a fixed batch, averaging num_samples reparameterised draws.

    :param model: the VAE.
    :param x: [0, 1] pixels.
    :param y: labels for a class-conditional model.
    """
    total = 0.0
    for _ in range(num_samples):
        total += vae_losses(model, x, model(x, y))["elbo"].mean().item()
    return total / num_samples


@torch.no_grad()
def interpolate(model, x_a, x_b, steps, y_a=None, y_b=None):
    """
    Decode a straight line between the posterior means of two images.

    :param x_a: [1 x C x H x W] start image in [0, 1].
    :param x_b: [1 x C x H x W] end image in [0, 1].
    :param steps: number of points on the line, end points included (>= 2).
    :param y_a: label of x_a (class-conditional models); the label switches halfway.
    :param y_b: label of x_b.
    :return: [steps x C x H x W] decoder means in [0, 1].
    """
    if steps < 2:
        raise ValueError(f"--interp_steps must be at least 2, got {steps}")
    mu_a, _ = model.encode(x_a, y_a)
    mu_b, _ = model.encode(x_b, y_b)
    t = torch.linspace(0.0, 1.0, steps, device=mu_a.device).view(-1, 1)
    z = (1 - t) * mu_a + t * mu_b
    y = None
    if model.class_cond:
        y = torch.where(t.view(-1) < 0.5, y_a.expand(steps), y_b.expand(steps))
    return model.decoder_mean(model.decode(z, y))


@torch.no_grad()
def encode_means(model, batches, device=None):
    """
    Posterior means for every batch of an iterable of (x_in_[-1,1], labels_or_None) pairs.

    :return: float32 tensor [N x latent_size] on the CPU.
    """
    device = device or next(model.parameters()).device
    means = []
    for batch, y in batches:
        x = model.prepare_input(batch.to(device))
        mu, _ = model.encode(x, None if y is None else y.to(device))
        means.append(mu.float().cpu())
    if not means:
        raise ValueError("no images to encode")
    return torch.cat(means)


# ---- checkpoints -------------------------------------------------------------------------------


def vae_state(model, opt, step, flags):
    """
    The object vae_train.py saves as ``vae%06d.pt``: model and optimizer state, step and the
    architecture flags (plain types only, so it loads with weights_only=True).
    """
    return dict(
        kind="vae",
        model=model.state_dict(),
        opt=None if opt is None else opt.state_dict(),
        step=int(step),
        flags={k: flags[k] for k in ARCH_FLAGS},
    )


def check_vae_checkpoint(state, flags, path="checkpoint"):
    """
    Raise ValueError unless ``state`` is a VAE checkpoint built with the same architecture flags.

    The message names every differing flag and the value to pass.
    """
    if not isinstance(state, dict) or state.get("kind") != "vae" or "flags" not in state:
        hint = ""
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            first = next(iter(state))
            hint = f" (it is a plain state dict with keys like {first!r}: another model's weights)"
        raise ValueError(
            f"{path} is not a VAE checkpoint{hint}; pass a vaeNNNNNN.pt file written by "
            "scripts/vae_train.py"
        )
    saved = state["flags"]
    diffs = [k for k in ARCH_FLAGS if k in saved and saved[k] != flags.get(k)]
    if diffs:
        parts = ", ".join(f"--{k} {saved[k]} (given {flags.get(k)})" for k in diffs)
        raise ValueError(f"{path} was trained with different architecture flags: pass {parts}")


def load_vae(state, flags, path="checkpoint"):
    """
    Build a VAE from flags and load a checkpoint's weights after checking the flags match.

    :param state: the loaded checkpoint dict.
    :param flags: dict holding at least the keys of :data:`ARCH_FLAGS`.
    :return: the model (on the CPU, eval mode not set).
    """
    check_vae_checkpoint(state, flags, path)
    model = create_vae(**{k: flags[k] for k in ARCH_FLAGS})
    model.load_state_dict(state["model"], strict=True)
    return model


# ---- networks ----------------------------------------------------------------------------------


class _MLPEncoder(nn.Module):
    """x (flattened, with an optional one-hot label) -> tanh hidden layer -> (mu, logvar)."""

    def __init__(self, *, in_features, hidden_size, latent_size):
        super().__init__()
        # The paper's MNIST encoder (Appendix C.2): one tanh hidden layer.
        self.hidden = nn.Linear(in_features, hidden_size)
        self.mu = nn.Linear(hidden_size, latent_size)
        self.logvar = nn.Linear(hidden_size, latent_size)

    def forward(self, x, onehot=None):
        h = x.flatten(1)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        h = torch.tanh(self.hidden(h))
        return self.mu(h), self.logvar(h)


class _MLPDecoder(nn.Module):
    """z (with an optional one-hot label) -> tanh hidden layer -> per-pixel parameters."""

    def __init__(self, *, latent_size, hidden_size, image_size, out_channels):
        super().__init__()
        self.image_size = image_size
        self.out_channels = out_channels
        self.hidden = nn.Linear(latent_size, hidden_size)
        self.out = nn.Linear(hidden_size, out_channels * image_size * image_size)

    def forward(self, z):
        h = torch.tanh(self.hidden(z))
        return self.out(h).view(-1, self.out_channels, self.image_size, self.image_size)


def _conv_levels(image_size):
    """Stride-2 stages: halve while the side is even and above 4 (28 -> 14 -> 7, 32 -> ... -> 4)."""
    levels, side = 0, image_size
    while side % 2 == 0 and side > 4:
        side //= 2
        levels += 1
    return levels, side


def _level_channels(num_channels, levels):
    # Double the width per stage, capped at 4x, so large images stay affordable on a CPU.
    return [num_channels * min(2**i, 4) for i in range(levels + 1)]


class _ConvEncoder(nn.Module):
    """
    3x3 stem, then 4x4 stride-2 convolutions down to a small map, then linear heads.
    A label enters as constant one-hot planes appended to the image channels.
    """

    def __init__(self, *, in_channels, image_size, num_channels, latent_size):
        super().__init__()
        levels, side = _conv_levels(image_size)
        chans = _level_channels(num_channels, levels)
        layers = [nn.Conv2d(in_channels, chans[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        flat = chans[-1] * side * side
        self.mu = nn.Linear(flat, latent_size)
        self.logvar = nn.Linear(flat, latent_size)

    def forward(self, x, onehot=None):
        if onehot is not None:
            planes = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, planes], dim=1)
        h = self.body(x).flatten(1)
        return self.mu(h), self.logvar(h)


class _ConvDecoder(nn.Module):
    """Linear to a small map, then 4x4 stride-2 transposed convolutions, then a 3x3 output conv."""

    def __init__(self, *, latent_size, image_size, num_channels, out_channels):
        super().__init__()
        levels, side = _conv_levels(image_size)
        chans = _level_channels(num_channels, levels)[::-1]
        self.side = side
        self.first_channels = chans[0]
        self.inp = nn.Linear(latent_size, chans[0] * side * side)
        layers = [nn.SiLU()]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(chans[-1], out_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z):
        h = self.inp(z).view(-1, self.first_channels, self.side, self.side)
        return self.body(h)


# ---- reading a whole image folder once -----------------------------------------------------------


def spread_indices(total, count):
    """
    ``count`` indices spread evenly over range(total) (all of them when count is 0 or too big),
    so a subset of a folder sorted by class still covers every class.
    """
    if count <= 0 or count >= total:
        return list(range(total))
    step = total / count
    return [int(i * step) for i in range(count)]


def folder_batches(paths, *, image_size, batch_size, labels=None):
    """
    One deterministic pass over image files (centre crop, no flip), in the order given.

    :param paths: image file paths.
    :param image_size: side of the square images.
    :param batch_size: images per batch.
    :param labels: one int per path, or None.
    :return: generator of (float32 NCHW tensor in [-1, 1], int64 labels tensor or None).
    """
    from ..image_datasets import ImageDataset

    dataset = ImageDataset(image_size, paths, classes=labels, random_flip=False)
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.from_numpy(np.stack([arr for arr, _ in items]))
        y = None
        if labels is not None:
            y = torch.tensor([int(extra["y"]) for _, extra in items], dtype=torch.long)
        yield x, y
