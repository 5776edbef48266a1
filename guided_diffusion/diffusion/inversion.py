"""
DDIM as its paper uses it (Song et al. 2021, "Denoising Diffusion Implicit Models"): with eta = 0
the sampler is a deterministic map from x_T to x_0, so

- the same x_T gives nearly the same image whatever the number of steps (section 5.2,
  "consistency"): consistency_distances;
- interpolating x_T along a great circle interpolates images (section 5.3; the slerp of its
  appendix D): slerp, slerp_pairs;
- running the map backwards encodes an image into x_T and decoding reconstructs it, the better
  the more steps (section 5.4, Table 2): ddim_round_trip, reconstruction_mse, psnr.

Everything here is a pure function of tensors (no files, no global state); the scripts
ddim_invert.py, ddim_interpolate.py and ddim_consistency.py read and write the files.
"""

import math

import numpy as np
import torch as th


# Below this sin(theta) two latents are treated as parallel and interpolated linearly: the slerp
# weights sin(a * theta) / sin(theta) lose all precision there, and their limit is linear.
_PARALLEL_SIN = 1e-6


def slerp(x0, x1, alpha):
    """
    Spherical linear interpolation between two batches of latents (Song et al. 2021, appendix D):

        x(alpha) = sin((1 - alpha) theta) / sin(theta) * x0 + sin(alpha theta) / sin(theta) * x1,

    with theta = arccos(<x0, x1> / (|x0| |x1|)) the angle between each pair of samples, each
    sample flattened to one vector. For Gaussian latents of dimension d both ends have norm about
    sqrt(d), and so does every point between, unlike linear interpolation, whose midpoint is
    shorter by about 1/sqrt(2) and so leaves the region the model was trained on. Computed in
    float64; nearly parallel pairs are interpolated linearly (the limit of the formula).

    :param x0: the latents at alpha = 0, a tensor [N x ...].
    :param x1: the latents at alpha = 1, of x0's shape.
    :param alpha: a number, or a tensor of N numbers (one per pair); 0 gives x0 and 1 gives x1.
    :return: a tensor of x0's shape and dtype.
    :raises ValueError: on different shapes, or a pair with a zero vector (no angle).
    """
    if x0.shape != x1.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    a = x0.reshape(len(x0), -1).double()
    b = x1.reshape(len(x1), -1).to(a)
    alpha = th.as_tensor(alpha, dtype=th.float64, device=a.device).reshape(-1, 1)
    if alpha.shape[0] not in (1, len(a)):
        raise ValueError(f"alpha must be one number or one per pair ({len(a)}), got {alpha.shape[0]}")
    norms = a.norm(dim=1) * b.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("slerp is undefined for a zero vector: it has no direction")
    cos_theta = ((a * b).sum(dim=1) / norms).clamp(-1.0, 1.0).unsqueeze(1)
    theta = th.arccos(cos_theta)
    sin_theta = th.sin(theta)
    parallel = sin_theta < _PARALLEL_SIN
    safe_sin = th.where(parallel, th.ones_like(sin_theta), sin_theta)
    w0 = th.where(parallel, 1 - alpha, th.sin((1 - alpha) * theta) / safe_sin)
    w1 = th.where(parallel, alpha.expand_as(theta), th.sin(alpha * theta) / safe_sin)
    return (w0 * a + w1 * b).reshape(x0.shape).to(x0.dtype)


def slerp_pairs(starts, ends, num):
    """
    Points evenly spaced in alpha (0 to 1, ends included) on the slerp path of each pair.

    :param starts: latents [P x ...], the first end of each pair.
    :param ends: latents [P x ...], the other end.
    :param num: points per pair, at least 2.
    :return: a tensor [P * num x ...]: pair 0's num points in order, then pair 1's, ...
    """
    if num < 2:
        raise ValueError(f"an interpolation needs at least 2 points (its two ends), got {num}")
    alphas = th.linspace(0.0, 1.0, num, dtype=th.float64)
    rows = [
        slerp(starts[p : p + 1].expand(num, *starts.shape[1:]), ends[p : p + 1].expand(num, *ends.shape[1:]), alphas)
        for p in range(len(starts))
    ]
    return th.cat(rows, dim=0)


def ddim_round_trip(diffusion, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
    """
    Encode images into DDIM latents and decode them again with the same diffusion and settings.

    :param diffusion: a (respaced) GaussianDiffusion; its number of steps sets the accuracy.
    :param model: the noise-prediction model (a module or a plain function).
    :param x_start: images [N x C x H x W] in [-1, 1].
    :param clip_denoised: used by both directions (see ddim_inverse_step).
    :param model_kwargs: e.g. {"y": labels} for a class-conditional model.
    :param progress: show progress bars.
    :return: (x_T, reconstruction), both of x_start's shape; the reconstruction is not clamped.
    """
    x_T = diffusion.ddim_reverse_sample_loop(
        model, x_start, clip_denoised=clip_denoised, model_kwargs=model_kwargs, progress=progress
    )
    reconstruction = diffusion.ddim_sample_loop(
        model, tuple(x_start.shape), noise=x_T, clip_denoised=clip_denoised,
        model_kwargs=model_kwargs, progress=progress,
    )
    return x_T, reconstruction


def round_trip_in_batches(diffusion, model, x_start, labels=None, batch_size=16, clip_denoised=True,
                          progress=False, device=None):
    """
    ddim_round_trip over many images, batch_size at a time.

    :param labels: None, or int64 class labels (one per image) passed to the model as y.
    :param device: where to compute (default: x_start's device); results come back on the CPU.
    :return: (x_T, reconstruction), float32 CPU tensors of x_start's shape.
    """
    latents, reconstructions = [], []
    for batch, kwargs in _batches(x_start, labels, batch_size, device):
        x_T, reconstruction = ddim_round_trip(
            diffusion, model, batch, clip_denoised=clip_denoised, model_kwargs=kwargs, progress=progress
        )
        latents.append(x_T.float().cpu())
        reconstructions.append(reconstruction.float().cpu())
    return th.cat(latents), th.cat(reconstructions)


def decode_in_batches(diffusion, model, x_T, labels=None, batch_size=16, clip_denoised=True,
                      progress=False, device=None):
    """
    Decode latents with ddim_sample_loop(noise=x_T), batch_size at a time (draws no random numbers).

    :param labels: None, or int64 class labels (one per latent) passed to the model as y.
    :param device: where to compute (default: x_T's device); results come back on the CPU.
    :return: float32 CPU images [N x C x H x W], about in [-1, 1] (not clamped).
    """
    images = []
    for batch, kwargs in _batches(x_T, labels, batch_size, device):
        images.append(
            diffusion.ddim_sample_loop(
                model, tuple(batch.shape), noise=batch, clip_denoised=clip_denoised,
                model_kwargs=kwargs, progress=progress,
            ).float().cpu()
        )
    return th.cat(images)


def _batches(x, labels, batch_size, device):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"{len(labels)} labels for {len(x)} images")
    device = x.device if device is None else device
    for start in range(0, len(x), batch_size):
        kwargs = {}
        if labels is not None:
            kwargs["y"] = th.as_tensor(labels[start : start + batch_size]).to(device)
        yield x[start : start + batch_size].to(device), kwargs


def reconstruction_mse(original, reconstruction):
    """
    Per-image mean squared error with pixels scaled to [0, 1] (the DDIM paper's Table 2 unit).

    :param original: images [N x ...] in [-1, 1].
    :param reconstruction: images of the same shape in [-1, 1] (clamped here, as when saved).
    :return: a float64 tensor of N errors.
    """
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} and {tuple(reconstruction.shape)}")
    diff = (reconstruction.double().clamp(-1, 1) - original.double()) / 2
    return diff.pow(2).reshape(len(diff), -1).mean(dim=1)


def psnr(mse, peak=1.0):
    """
    Peak signal-to-noise ratio in dB, 10 log10(peak^2 / mse); infinite for a zero error.

    :param mse: a mean squared error (a number), in units where the pixel range is `peak`.
    """
    mse = float(mse)
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def mean_pixel_distance(images, reference):
    """
    Mean absolute difference per image, in 0..255 pixel values.

    :param images: uint8 arrays or tensors [N x H x W x C].
    :param reference: the same shape.
    :return: a float64 numpy array of N distances.
    """
    a = _as_numpy(images).astype(np.float64)
    b = _as_numpy(reference).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return np.abs(a - b).reshape(len(a), -1).mean(axis=1)


def consistency_distances(images_by_steps):
    """
    How far the decodings of one x_T with fewer steps are from the one with the most steps.

    :param images_by_steps: {step count: uint8 images [N x H x W x C]}, all decoded from the
        same latents.
    :return: {step count: {"mean_abs_pixel_distance": mean over images of the mean absolute
        difference in 0..255 to the finest decoding, "mse": mean squared error with pixels in
        [0, 1]}}, the finest step count included (zero).
    """
    if not images_by_steps:
        raise ValueError("no decodings to compare")
    finest = max(images_by_steps)
    reference = _as_numpy(images_by_steps[finest]).astype(np.float64)
    result = {}
    for steps in sorted(images_by_steps):
        images = _as_numpy(images_by_steps[steps]).astype(np.float64)
        result[steps] = {
            "mean_abs_pixel_distance": float(mean_pixel_distance(images, reference).mean()),
            "mse": float((((images - reference) / 255.0) ** 2).mean()),
        }
    return result


def _as_numpy(images):
    if isinstance(images, th.Tensor):
        return images.detach().cpu().numpy()
    return np.asarray(images)
