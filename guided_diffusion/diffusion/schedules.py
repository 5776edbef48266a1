"""
Noise schedules, the per-step tables derived from them, and timestep respacing.

Everything here is a pure function of its arguments and works in float64 numpy, so the tables
are bit-for-bit those of the reference; extract_into_tensor casts to float32 only at lookup time.
"""

import math

import numpy as np
import torch as th

from ..errors import UnknownScheduleError

KNOWN_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    Get a pre-defined beta schedule for the given name.

    The linear schedule of Ho et al. (2020) is rescaled by 1000 / T so that any number of steps
    traverses the same total noise; the cosine schedule is eq. 17 of Nichol & Dhariwal (2021).

    :param schedule_name: "linear" or "cosine".
    :param num_diffusion_timesteps: the number of steps T.
    :return: a float64 numpy array of T betas.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be at least 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        if num_diffusion_timesteps <= 20:
            # The last beta is 20 / T: at T <= 20 it reaches 1, alpha_bar becomes 0 and every
            # table that divides by it is infinite (the reference fails later, with NaN samples).
            raise ValueError(
                f"the linear schedule needs diffusion_steps > 20 (got {num_diffusion_timesteps}: "
                "its last beta would be >= 1); use more steps, or --noise_schedule cosine"
            )
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(
            scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64
        )
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise UnknownScheduleError(
        f"unknown --noise_schedule {schedule_name!r}; known schedules: {', '.join(KNOWN_SCHEDULES)}"
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    Each beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at max_beta to avoid the
    singularity of the cosine schedule at t = 1 (Nichol & Dhariwal 2021, section 3.2).

    :param num_diffusion_timesteps: the number of betas to produce.
    :param alpha_bar: a function of t in [0, 1] giving the cumulative product of (1 - beta).
    :param max_beta: the largest beta allowed.
    :return: a float64 numpy array of betas.
    """
    steps = num_diffusion_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
        dtype=np.float64,
    )


def diffusion_tables(betas):
    """
    All per-step float64 tables of the forward process and its posterior q(x_{t-1} | x_t, x_0).

    :param betas: a 1-D array of betas in (0, 1].
    :return: a dict of float64 arrays, each of length T.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) == 0:
        raise ValueError("betas must be a non-empty 1-D array")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must lie in (0, 1]")

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)

    # Posterior q(x_{t-1} | x_t, x_0): Ho et al. (2020) eq. 6-7.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        alphas_cumprod_next=alphas_cumprod_next,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at t = 0, so its log is clipped by reusing step 1.
        posterior_log_variance_clipped=np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
        ),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )


def space_timesteps(num_timesteps, section_counts):
    """
    Choose which of the original steps a respaced (shorter) process keeps.

    With a string "ddimN", the steps are range(0, T, stride) for the smallest integer stride that
    gives exactly N steps, as in the DDIM paper. Otherwise T is cut into len(section_counts) equal
    sections (the first T % k one step longer) and each section is walked with a fractional
    stride, rounding to the nearest step, so both of its ends are kept.

    :param num_timesteps: the number of steps T of the original process.
    :param section_counts: a list of ints, or a comma-separated string of them, or "ddimN".
    :return: a set of the kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_steps(num_timesteps, section_counts)
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {section_counts!r} is not 'ddimN' or comma-separated "
                "step counts (e.g. '250' or '10,15,20')"
            ) from None
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("timestep_respacing needs at least one section count")

    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise ValueError(
                f"timestep_respacing asks for {count} steps in section {i + 1} of "
                f"{len(section_counts)}, but that section only has {size} of the "
                f"{num_timesteps} diffusion steps"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # The position is accumulated by repeated addition and then round()ed (half to even),
        # exactly as the reference does: stride * j can round differently on a .5 boundary, which
        # would change the kept steps and so the samples.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def _ddim_steps(num_timesteps, spec):
    try:
        wanted = int(spec[len("ddim"):])
    except ValueError:
        raise ValueError(f"timestep_respacing {spec!r}: expected 'ddim' followed by a step count") from None
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == wanted:
            return set(range(0, num_timesteps, stride))
    # deviation from reference: the reference message names the original step count as if it
    # were the requested one; say both, and only suggest section counts when they can work.
    if not 1 <= wanted <= num_timesteps:
        raise ValueError(
            f"timestep_respacing {spec!r}: cannot pick {wanted} of the {num_timesteps} diffusion "
            f"steps; ask for between 1 and {num_timesteps}"
        )
    raise ValueError(
        f"timestep_respacing {spec!r}: no integer stride picks exactly {wanted} of the "
        f"{num_timesteps} diffusion steps; use '{wanted}' (evenly spaced steps) instead, or "
        "another ddim count"
    )


def respace_betas(alphas_cumprod, use_timesteps):
    """
    Betas of a process that visits only ``use_timesteps`` but has the same alpha_bar there.

    :param alphas_cumprod: the original process's cumulative alpha products (float64).
    :param use_timesteps: the original step indices to keep.
    :return: (float64 betas of the respaced process, sorted list of the kept original indices).
    """
    keep = set(use_timesteps)
    total = len(alphas_cumprod)
    outside = sorted(t for t in keep if not 0 <= t < total)
    if outside:
        raise ValueError(f"timesteps {outside[:5]} are outside the {total} diffusion steps")
    if not keep:
        raise ValueError("a respaced diffusion needs at least one timestep")

    betas, timestep_map = [], []
    previous = 1.0
    for index, alpha_bar in enumerate(alphas_cumprod):
        if index in keep:
            betas.append(1 - alpha_bar / previous)
            previous = alpha_bar
            timestep_map.append(index)
    return np.array(betas, dtype=np.float64), timestep_map


def extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    Look up a float64 numpy table at a batch of indices and broadcast it to broadcast_shape.

    The lookup happens in float64 and only the result is cast to float32, as in the reference,
    so the tables keep their precision. The table is copied to the indices' device at every
    call, as in the reference; GaussianDiffusion keeps its own tables on each device instead
    (GaussianDiffusion._tables_on).

    :param arr: the 1-D numpy array.
    :param timesteps: a tensor of indices into the array.
    :param broadcast_shape: a shape [N x ...] whose leading dimension matches timesteps.
    :return: a float32 tensor of broadcast_shape.
    """
    values = th.as_tensor(arr, device=timesteps.device)[timesteps].float()
    values = values.reshape(values.shape + (1,) * (len(broadcast_shape) - values.dim()))
    return values.expand(broadcast_shape)
