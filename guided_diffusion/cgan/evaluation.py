"""
The conditional GAN's evaluation: the Parzen-window log-likelihood estimate of the paper's
Table 1, and the accuracy of a classifier trained on real images when applied to generated
samples of each requested class.

Both work on images as float tensors [N, C, H, W] in [0, 1] (C = 1 for grayscale data such as
digits, where the paper's Parzen estimate lives in [0, 1]^784 for MNIST).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "parzen_log_likelihood",
    "select_parzen_sigma",
    "parzen_estimate",
    "default_sigmas",
    "SampleClassifier",
    "train_classifier",
    "predict_classes",
    "class_accuracy",
    "to_eval_space",
    "is_grayscale",
    "evaluate_samples",
]


def default_sigmas(start=-1.0, end=0.0, steps=10):
    """
    The kernel widths tried on the validation split: 10**start ... 10**end, log-spaced. The
    defaults are those of the GAN papers' Parzen code (ten widths from 0.1 to 1).

    :return: float64 numpy array of sigmas.
    """
    if steps < 1:
        raise ValueError(f"--sigma_steps must be at least 1, got {steps}")
    return np.logspace(start, end, num=steps)


def _flat64(x):
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))).to(torch.float64)


@torch.no_grad()
def parzen_log_likelihood(samples, points, sigmas, *, batch_size=100):
    """
    Log density of each point under a Gaussian Parzen window (kernel density estimate) centred on
    the M samples mu_j in D dimensions:
        log p(x) = log mean_j N(x; mu_j, sigma^2 I)
                 = logsumexp_j(-|x - mu_j|^2 / (2 sigma^2)) - log M - (D/2) log(2 pi sigma^2).

    :param samples: [M, ...] generated samples (the kernel centres), flattened to D values.
    :param points: [N, ...] points to score, same D.
    :param sigmas: one kernel width or a sequence of them (distances are computed once for all).
    :param batch_size: points scored per matrix product (bounds memory to batch_size * M).
    :return: float64 numpy array [len(sigmas), N] (or [N] for a single sigma).
    """
    scalar = np.ndim(sigmas) == 0
    sigmas = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
    if np.any(sigmas <= 0):
        raise ValueError(f"Parzen kernel widths must be positive, got {sigmas}")
    mu = _flat64(samples)
    x = _flat64(points)
    if mu.shape[1] != x.shape[1]:
        raise ValueError(
            f"samples have {mu.shape[1]} values each but the data has {x.shape[1]}: "
            "evaluate with the image size and channels the model was trained on"
        )
    num, dim = mu.shape
    mu_sq = (mu * mu).sum(1)
    sig = torch.from_numpy(sigmas)
    norm = math.log(num) + 0.5 * dim * torch.log(2 * math.pi * sig * sig)
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        # |x - mu|^2 expanded; float64 keeps the cancellation error far below a kernel width.
        dist = ((xb * xb).sum(1, keepdim=True) + mu_sq[None] - 2.0 * xb @ mu.T).clamp_min_(0.0)
        scaled = -dist[None] / (2.0 * sig[:, None, None] ** 2)
        out.append(torch.logsumexp(scaled, dim=2) - norm[:, None])
    result = torch.cat(out, dim=1).numpy()
    return result[0] if scalar else result


def select_parzen_sigma(samples, valid, sigmas, *, batch_size=100):
    """
    The kernel width with the highest mean log-likelihood on a validation set.

    :return: (best sigma, numpy array of the mean validation log-likelihood of each sigma).
    """
    sigmas = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
    means = parzen_log_likelihood(samples, valid, sigmas, batch_size=batch_size).mean(axis=1)
    return float(sigmas[int(np.argmax(means))]), means


def parzen_estimate(samples, valid, test, sigmas, *, batch_size=100):
    """
    The paper's Table 1 protocol: fit a Gaussian Parzen window to the samples, pick its width on
    the validation images, report the mean log-likelihood of the test images and its standard
    error (standard deviation / sqrt(number of test images)).

    :return: dict with "mean", "stderr", "sigma" and "valid_curve" (mean validation
        log-likelihood per sigma, as a list of (sigma, value) pairs).
    """
    sigma, curve = select_parzen_sigma(samples, valid, sigmas, batch_size=batch_size)
    ll = parzen_log_likelihood(samples, test, sigma, batch_size=batch_size)
    return dict(
        mean=float(ll.mean()),
        stderr=float(ll.std() / math.sqrt(len(ll))),
        sigma=sigma,
        valid_curve=[(float(s), float(v)) for s, v in zip(np.atleast_1d(sigmas), curve)],
    )


class SampleClassifier(nn.Module):
    """
    A small CNN that judges which class a (real or generated) image shows: two 3x3 convolutions
    (16 and 32 channels), 2x2 max pooling, pooling to 4x4, a 64-unit hidden layer. Works for
    images from 8 pixels up.

    :param in_channels: 1 (grayscale) or 3 (RGB).
    :param num_classes: number of classes.
    """

    def __init__(self, *, in_channels, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        """
        :param x: float [N, C, H, W] in [0, 1].
        :return: class logits [N, num_classes].
        """
        return self.head(self.features(x * 2.0 - 1.0))


def train_classifier(images, labels, *, num_classes, steps=1000, batch_size=64, lr=1e-3, seed=0):
    """
    Train a SampleClassifier on real images. Random one-pixel shifts make it judge the digit
    rather than its exact placement, which generated images do not reproduce perfectly.

    :param images: float [N, C, H, W] in [0, 1].
    :param labels: int64 [N].
    :param num_classes: number of classes.
    :param steps: Adam steps.
    :param batch_size: images per step.
    :param lr: Adam's learning rate.
    :param seed: seeds a private generator, so the global torch RNG is left alone.
    :return: the classifier in eval mode.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SampleClassifier(in_channels=images.shape[1], num_classes=num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
            x = _random_shift(images[idx], gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _random_shift(x, gen):
    # Pad by one pixel (with the background value of the corner) and crop a random window.
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


@torch.no_grad()
def predict_classes(classifier, images, *, batch_size=500):
    """
    :param classifier: a trained SampleClassifier.
    :param images: float [N, C, H, W] in [0, 1].
    :return: int64 tensor [N] of predicted classes.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    starts = range(0, len(images), batch_size)
    return torch.cat([classifier(images[i : i + batch_size]).argmax(1) for i in starts])


def class_accuracy(classifier, images, labels, *, num_classes):
    """
    :return: (overall accuracy, list of per-class accuracies; NaN for a class with no images).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    correct = (predict_classes(classifier, images) == labels).float()
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(float(correct[mask].mean()) if mask.any() else float("nan"))
    return float(correct.mean()), per_class


def is_grayscale(images_uint8):
    """
    :param images_uint8: uint8 [N, H, W, C].
    :return: True when C is 1 or all channels are equal (e.g. samples of the MLP generator).
    """
    images = np.asarray(images_uint8)
    if images.shape[-1] == 1:
        return True
    return bool(np.all(images == images[..., :1]))


def to_eval_space(images_uint8, *, grayscale):
    """
    :param images_uint8: uint8 [N, H, W, C].
    :param grayscale: keep one channel (ITU-R 601 luma when there are three).
    :return: float32 tensor [N, C', H, W] in [0, 1].
    """
    x = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
    if grayscale and x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x


def evaluate_samples(
    samples,
    sample_labels,
    *,
    train,
    valid,
    test,
    num_classes,
    sigmas=None,
    classifier=None,
    classifier_steps=1000,
    batch_size=100,
    seed=0,
):
    """
    Run both evaluations on generated samples.

    :param samples: float [N, C, H, W] in [0, 1] (see to_eval_space).
    :param sample_labels: the class each sample was generated for.
    :param train: (images, labels) of real training images, to train the classifier.
    :param valid: (images, labels) of real held-out images, to choose the Parzen width.
    :param test: (images, labels) of real held-out images, to score.
    :param num_classes: number of classes.
    :param sigmas: kernel widths to try (default_sigmas() when None).
    :param classifier: a trained SampleClassifier to reuse, or None to train one.
    :param classifier_steps: training steps of a new classifier.
    :param batch_size: Parzen batch size.
    :param seed: classifier seed.
    :return: (dict of figures, the classifier).
    """
    if classifier is None:
        classifier = train_classifier(
            train[0], train[1], num_classes=num_classes, steps=classifier_steps, seed=seed
        )
    real_acc, _ = class_accuracy(classifier, test[0], test[1], num_classes=num_classes)
    acc, per_class = class_accuracy(classifier, samples, sample_labels, num_classes=num_classes)
    parzen = parzen_estimate(
        samples, valid[0], test[0], default_sigmas() if sigmas is None else sigmas,
        batch_size=batch_size,
    )
    figures = dict(
        num_samples=int(len(samples)),
        parzen_mean=parzen["mean"],
        parzen_stderr=parzen["stderr"],
        parzen_sigma=parzen["sigma"],
        parzen_valid_curve=parzen["valid_curve"],
        classifier_real_test_accuracy=real_acc,
        sample_accuracy=acc,
        sample_accuracy_per_class=per_class,
    )
    return figures, classifier
