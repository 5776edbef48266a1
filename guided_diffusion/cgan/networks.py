"""
Conditional generative adversarial nets (Mirza & Osindero 2014, "Conditional Generative
Adversarial Nets", arXiv:1411.1784).

Both networks see the class label y. The paper's value function (its equation 2) is

    min_G max_D  E_x[log D(x | y)] + E_z[log(1 - D(G(z | y) | y))].

This module holds the networks, their factories (in the style of script_util), the losses and the
paper's optimiser. Training lives in ``training`` (CGANTrainLoop, checkpoints, sampling) and the
paper's evaluation in ``evaluation`` (Parzen-window log-likelihood, classifier accuracy); the
package exports them all, so ``from guided_diffusion.cgan import CGANTrainLoop`` works.

Two architectures share one interface:

- ``mlp``: the paper's MNIST networks. Images are grayscale vectors of image_size**2 pixels in
  [0, 1]; the generator ends in a sigmoid.
- ``conv``: a DCGAN-style pair for RGB images of 16 to 64 pixels in [-1, 1], with a label
  embedding in both networks.

Every generator has ``to_images(output)`` that maps its raw output to a float NCHW RGB tensor in
[-1, 1] (the convention of the diffusion scripts), and every discriminator returns logits (the
sigmoid is folded into the loss for numerical stability).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("mlp", "conv")
OPTIMIZERS = ("adam", "sgd")

# Flags that change the shape of the networks; a checkpoint only loads when they all match.
MODEL_FLAG_KEYS = ("arch", "image_size", "num_classes", "z_dim", "conv_channels")

# The paper trained on 28x28 MNIST with the networks below (section 4.1).
PAPER_Z_DIM = 100


def cgan_defaults():
    """
    Defaults for the cGAN networks; the MLP values are the paper's MNIST settings.

    :return: a dict of flag name -> default value.
    """
    return dict(
        arch="mlp",
        image_size=28,
        num_classes=10,
        z_dim=PAPER_Z_DIM,
        conv_channels=64,
        dropout=0.5,
    )


def create_cgan(*, arch, image_size, num_classes, z_dim, conv_channels, dropout):
    """
    Build a generator and a discriminator.

    :param arch: "mlp" (the paper's networks) or "conv" (DCGAN-style, RGB).
    :param image_size: side of the square images in pixels.
    :param num_classes: number of classes y can take.
    :param z_dim: dimension of the uniform noise z.
    :param conv_channels: width of the widest layer of the conv discriminator / narrowest of the
        conv generator; ignored by the MLP.
    :param dropout: dropout probability in both networks (the paper uses 0.5).
    :return: (generator, discriminator).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: use one of {', '.join(ARCHS)}")
    if not isinstance(image_size, int):
        # --image_size parses height,width for the diffusion scripts; these networks are square.
        raise ValueError(f"the cGAN makes square images: pass one --image_size, got {image_size}")
    if num_classes < 1:
        raise ValueError(f"--num_classes must be at least 1, got {num_classes}")
    if z_dim < 1:
        raise ValueError(f"--z_dim must be at least 1, got {z_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
    if arch == "mlp":
        if image_size < 1:
            raise ValueError(f"--image_size must be positive, got {image_size}")
        generator = MLPGenerator(
            image_size=image_size, num_classes=num_classes, z_dim=z_dim, dropout=dropout
        )
        discriminator = MLPDiscriminator(
            image_size=image_size, num_classes=num_classes, dropout=dropout
        )
    else:
        _check_conv_size(image_size)
        if conv_channels < 1:
            raise ValueError(f"--conv_channels must be at least 1, got {conv_channels}")
        generator = ConvGenerator(
            image_size=image_size,
            num_classes=num_classes,
            z_dim=z_dim,
            channels=conv_channels,
        )
        discriminator = ConvDiscriminator(
            image_size=image_size,
            num_classes=num_classes,
            channels=conv_channels,
            dropout=dropout,
        )
    return generator, discriminator


def _check_conv_size(image_size):
    if image_size not in (16, 32, 64):
        raise ValueError(
            f"--arch conv supports --image_size 16, 32 or 64, got {image_size} "
            "(use --arch mlp for other sizes)"
        )


def sample_noise(num, z_dim, device=None):
    """
    Draw the generator's noise: uniform in the unit hypercube, as in the paper (section 4.1).

    :param num: number of vectors.
    :param z_dim: their dimension.
    :param device: torch device of the result.
    :return: a float tensor of shape [num, z_dim].
    """
    return torch.rand(num, z_dim, device=device)


def real_to_model_space(arch, images):
    """
    Convert a batch of real images from the data loader's convention (float NCHW RGB in [-1, 1])
    to the space the discriminator of ``arch`` expects.

    :param arch: "mlp" or "conv".
    :param images: float tensor [N, C, H, W] in [-1, 1], C in {1, 3}.
    :return: for "mlp", [N, H*W] grayscale in [0, 1]; for "conv", the RGB images unchanged.
    """
    if arch == "mlp":
        gray = rgb_to_gray(images)
        return ((gray + 1.0) / 2.0).flatten(1)
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images


def rgb_to_gray(images):
    """
    ITU-R 601 luma (what PIL's "L" mode uses), keeping a channel axis.

    :param images: float tensor [N, C, H, W] with C in {1, 3}.
    :return: float tensor [N, 1, H, W].
    """
    if images.shape[1] == 1:
        return images
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 image channels, got {images.shape[1]}")
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def discriminator_loss(real_logits, fake_logits):
    """
    The discriminator's side of the paper's equation 2, as a loss to minimise:
    -log D(x|y) - log(1 - D(G(z|y)|y)), averaged over the batch.

    :param real_logits: discriminator logits on real pairs (x, y).
    :param fake_logits: discriminator logits on generated pairs (G(z|y), y).
    :return: a scalar tensor.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


# deviation from reference: the paper states the minimax value function; like the GAN code it
# built on, we train the generator on -log D(G(z|y)|y) instead of log(1 - D(G(z|y)|y)).
def generator_loss(fake_logits):
    """
    The generator's loss -log D(G(z|y)|y): the non-saturating form Goodfellow et al. (2014)
    recommend over minimising log(1 - D), which gives no gradient early in training.

    :param fake_logits: discriminator logits on generated pairs.
    :return: a scalar tensor.
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def one_hot(labels, num_classes):
    """
    :param labels: int64 tensor [N] of class indices.
    :param num_classes: number of classes.
    :return: float tensor [N, num_classes].
    """
    _check_labels(labels, num_classes)
    return F.one_hot(labels.long(), num_classes).float()


def _check_labels(labels, num_classes):
    # one_hot and embedding lookups fail with opaque index errors; say what is wrong instead.
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"class labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"class labels must be in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]: check --num_classes"
        )


class Maxout(nn.Module):
    """
    A maxout layer (Goodfellow et al. 2013): an affine map to units * pieces values, then the
    maximum over each unit's consecutive group of pieces.

    :param in_features: input width.
    :param units: number of outputs.
    :param pieces: number of linear pieces per output.
    """

    def __init__(self, *, in_features, units, pieces):
        super().__init__()
        self.units = units
        self.pieces = pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x):
        return self.linear(x).view(x.shape[0], self.units, self.pieces).amax(dim=-1)


class MLPGenerator(nn.Module):
    """
    The paper's MNIST generator (section 4.1): z -> 200 ReLU and one-hot y -> 1000 ReLU, joined
    -> 1200 ReLU -> sigmoid pixels.

    :param image_size: side of the (grayscale) images; the output has image_size**2 pixels.
    :param num_classes: number of classes.
    :param z_dim: noise dimension (100 in the paper).
    :param dropout: dropout probability on the joint hidden layer.
    """

    def __init__(self, *, image_size, num_classes, z_dim, dropout):
        super().__init__()
        self.image_size = image_size
        self.num_classes = num_classes
        self.z_dim = z_dim
        self.z_layer = nn.Linear(z_dim, 200)
        self.y_layer = nn.Linear(num_classes, 1000)
        self.joint = nn.Linear(1200, 1200)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(1200, image_size * image_size)
        # deviation from reference: pylearn2's GAN configurations (which the paper built on) drew
        # weights uniformly from +-0.05; with that (and with torch's default) the output barely
        # depends on z and y at first and training collapsed onto one image in our runs. He
        # initialisation keeps the ReLU layers' signal scale, so both inputs matter from step 0.
        for layer in (self.z_layer, self.y_layer, self.joint, self.out):
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, z, y):
        """
        :param z: float tensor [N, z_dim].
        :param y: int64 class labels [N].
        :return: float tensor [N, image_size**2] of pixel intensities in (0, 1).
        """
        hz = F.relu(self.z_layer(z))
        hy = F.relu(self.y_layer(one_hot(y, self.num_classes)))
        h = self.dropout(F.relu(self.joint(torch.cat([hz, hy], dim=1))))
        return torch.sigmoid(self.out(h))

    def to_images(self, output):
        """
        :param output: the forward pass's [N, image_size**2] output in [0, 1].
        :return: float NCHW RGB (three equal channels) in [-1, 1].
        """
        side = self.image_size
        gray = output.view(-1, 1, side, side) * 2.0 - 1.0
        return gray.expand(-1, 3, -1, -1)


class MLPDiscriminator(nn.Module):
    """
    The paper's MNIST discriminator (section 4.1): x -> maxout 240 units x 5 pieces,
    y -> maxout 50 x 5, joined -> maxout 240 x 4 -> one sigmoid unit (returned as a logit).

    :param image_size: side of the grayscale images it judges (image_size**2 inputs).
    :param num_classes: number of classes.
    :param dropout: dropout probability on each hidden layer's output.
    """

    def __init__(self, *, image_size, num_classes, dropout):
        super().__init__()
        self.num_classes = num_classes
        self.x_layer = Maxout(in_features=image_size * image_size, units=240, pieces=5)
        self.y_layer = Maxout(in_features=num_classes, units=50, pieces=5)
        # deviation from reference: pylearn2's maxout layers could carry max-norm constraints on
        # their weight columns; we train them unconstrained.
        self.joint = Maxout(in_features=290, units=240, pieces=4)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(240, 1)
        # deviation from reference: pylearn2 used uniform +-0.005 weights here; torch's default
        # initialisation trained more reliably with the initialisation of the generator above.

    def forward(self, x, y):
        """
        :param x: float tensor [N, image_size**2] in [0, 1].
        :param y: int64 class labels [N].
        :return: logits [N].
        """
        hx = self.dropout(self.x_layer(x))
        hy = self.dropout(self.y_layer(one_hot(y, self.num_classes)))
        h = self.dropout(self.joint(torch.cat([hx, hy], dim=1)))
        return self.out(h).squeeze(1)


class ConvGenerator(nn.Module):
    """
    DCGAN-style generator (Radford et al. 2016) conditioned by concatenating a learned label
    embedding to z: project to a 4x4 map, then transposed convolutions doubling the size up to
    image_size, batch norm and ReLU in between, tanh RGB output.

    :param image_size: 16, 32 or 64.
    :param num_classes: number of classes.
    :param z_dim: noise dimension.
    :param channels: channels of the last hidden map; each coarser map has twice as many.
    :param embed_dim: size of the label embedding.
    """

    def __init__(self, *, image_size, num_classes, z_dim, channels, embed_dim=50):
        super().__init__()
        _check_conv_size(image_size)
        self.image_size = image_size
        self.num_classes = num_classes
        self.z_dim = z_dim
        num_up = int(math.log2(image_size // 4))
        self.top_channels = channels * 2 ** (num_up - 1)
        self.label_emb = nn.Embedding(num_classes, embed_dim)
        self.project = nn.Linear(z_dim + embed_dim, self.top_channels * 16)
        self.project_norm = nn.BatchNorm2d(self.top_channels)
        layers = []
        ch = self.top_channels
        for _ in range(num_up - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(),
            ]
            ch //= 2
        layers.append(nn.ConvTranspose2d(ch, 3, 4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z, y):
        """
        :param z: float tensor [N, z_dim].
        :param y: int64 class labels [N].
        :return: float NCHW RGB in [-1, 1].
        """
        _check_labels(y, self.num_classes)
        h = self.project(torch.cat([z, self.label_emb(y)], dim=1))
        h = F.relu(self.project_norm(h.view(-1, self.top_channels, 4, 4)))
        return torch.tanh(self.body(h))

    def to_images(self, output):
        """
        :param output: the forward pass's output.
        :return: the same float NCHW RGB tensor in [-1, 1].
        """
        return output


class ConvDiscriminator(nn.Module):
    """
    DCGAN-style discriminator conditioned twice: a learned per-class image-sized map is stacked
    onto the RGB input, and a label embedding joins the features before the final logit.

    :param image_size: 16, 32 or 64.
    :param num_classes: number of classes.
    :param channels: channels of the first convolution; each later one doubles them.
    :param dropout: dropout probability before the final layer.
    :param embed_dim: size of the label embedding at the final layer.
    """

    def __init__(self, *, image_size, num_classes, channels, dropout, embed_dim=50):
        super().__init__()
        _check_conv_size(image_size)
        self.image_size = image_size
        self.num_classes = num_classes
        self.label_map = nn.Embedding(num_classes, image_size * image_size)
        layers = [nn.Conv2d(4, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch, size = channels, image_size // 2
        while size > 4:
            layers += [
                nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch, size = ch * 2, size // 2
        self.body = nn.Sequential(*layers)
        self.label_emb = nn.Embedding(num_classes, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(ch * 16 + embed_dim, 1)
        _dcgan_init(self)

    def forward(self, x, y):
        """
        :param x: float NCHW RGB in [-1, 1].
        :param y: int64 class labels [N].
        :return: logits [N].
        """
        _check_labels(y, self.num_classes)
        side = self.image_size
        if x.shape[1:] != (3, side, side):
            raise ValueError(
                f"expected images of shape [N, 3, {side}, {side}], got {list(x.shape)}"
            )
        label_map = self.label_map(y).view(-1, 1, side, side)
        h = self.body(torch.cat([x, label_map], dim=1)).flatten(1)
        h = self.dropout(torch.cat([h, self.label_emb(y)], dim=1))
        return self.out(h).squeeze(1)


def _dcgan_init(module):
    # DCGAN: all weights from N(0, 0.02); batch-norm scales from N(1, 0.02).
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class PaperMomentumSGD(torch.optim.Optimizer):
    """
    SGD with classical momentum in pylearn2's form, which the paper's experiments used:
    v <- momentum * v - lr * grad;  p <- p + v. (torch.optim.SGD keeps v <- momentum * v + grad
    and steps by lr * v, which differs whenever lr changes between steps, as it does every step
    under the paper's decay.)

    :param params: parameters or parameter groups.
    :param lr: initial learning rate.
    :param momentum: initial momentum.
    """

    def __init__(self, params, *, lr, momentum):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                # deviation from reference: not torch's SGD rule, see the class docstring.
                v.mul_(group["momentum"]).add_(p.grad, alpha=-group["lr"])
                p.add_(v)
        return loss


def paper_sgd_schedule(step, *, lr, lr_decay, min_lr, momentum, final_momentum, saturate_steps):
    """
    The paper's schedule (section 4.1): the learning rate is divided by lr_decay after every
    step down to min_lr; momentum rises linearly from its initial to its final value over
    saturate_steps steps.

    :param step: number of steps taken so far.
    :param lr: initial learning rate (0.1 in the paper).
    :param lr_decay: per-step decay factor (1.00004).
    :param min_lr: floor of the learning rate (1e-6).
    :param momentum: initial momentum (0.5).
    :param final_momentum: final momentum (0.7).
    :param saturate_steps: steps until the final momentum is reached.
    :return: (learning rate, momentum) to use for the next step.
    """
    # In log space because lr_decay ** step overflows a float after some 18 million steps.
    step_lr = max(lr * math.exp(-step * math.log(lr_decay)), min_lr)
    frac = 1.0 if saturate_steps <= 0 else min(step / saturate_steps, 1.0)
    return step_lr, momentum + frac * (final_momentum - momentum)
