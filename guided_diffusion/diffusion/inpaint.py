"""
Inpainting with an unconditionally trained diffusion model: RePaint (Lugmayr et al. 2022).

At every reverse step the pixels to keep are replaced by the known image noised to the level the
step ends at (Algorithm 1, lines 4-6), and the other pixels come from the model's own step. On its
own that "replacement" makes the filled-in region agree poorly with what is kept, so RePaint
resamples: after a stretch of `jump_length` reverse steps the sample is noised forward again by as
many steps (q(x_{t+j} | x_t)) and the stretch is run again, `resamplings` times in all (their
section 4.2, "resampling" and "jumps"). Every reverse step is the diffusion's own p_sample or
ddim_sample, so classifier guidance (cond_fn), classifier-free guidance (a guided model function),
class labels, clipping and respacing work as in plain sampling.

Random draws, in order: the starting noise x_T, one torch.randn(*shape) unless `noise` is given;
then per reverse step: one torch.randn_like(x) to noise the sample forward when the schedule
jumps back up before that step, the step's own draw (one randn_like, as p_sample and ddim_sample
draw), and one torch.randn_like(x) for the known image's forward noise (drawn at the last step
too, where it is multiplied by 0).
"""

import math

import torch as th

from .sampling import LoopOptions, last_sample, loop_start, run_steps

__all__ = ["inpaint_loop", "inpaint_loop_progressive", "repaint_schedule"]

INPAINT_SAMPLERS = ("ddpm", "ddim")


def repaint_schedule(num_timesteps, jump_length=1, resamplings=1):
    """
    The timestep indices of RePaint's reverse steps, in the order they run.

    The T steps are cut into blocks of jump_length steps from the top (T-1 down; the last block
    may be shorter), and each block is run `resamplings` times: between two runs the sample is
    noised back up to the level the block starts from. With jump_length 1 every step is run
    `resamplings` times (Algorithm 1 with U = resamplings), the last block included.

    :return: a list of timestep indices (ints).
    """
    # deviation from the paper: Algorithm 1 does not resample its last step (t = 1); here the
    # last block is resampled like every other, so a run always costs T * resamplings steps.
    for name, value in (("jump_length", jump_length), ("resamplings", resamplings)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    order = []
    top = num_timesteps - 1
    while top >= 0:
        bottom = max(top - jump_length + 1, 0)
        order.extend(list(range(top, bottom - 1, -1)) * resamplings)
        top = bottom - 1
    return order


def inpaint_loop(diffusion, model, shape, **kwargs):
    """
    Inpaint a batch: sample the pixels where `mask` is False given the known image where it is
    True. The arguments are those of inpaint_loop_progressive.

    :return: the final batch of samples; where the mask is True it equals `known` exactly.
    """
    return last_sample(inpaint_loop_progressive(diffusion, model, shape, **kwargs))


def inpaint_loop_progressive(
    diffusion,
    model,
    shape,
    *,
    known,
    mask,
    sampler="ddpm",
    jump_length=1,
    resamplings=1,
    eta=0.0,
    **loop_options,
):
    """
    Like inpaint_loop, but yield each reverse step's output ("sample" with the known region put
    back, "pred_xstart" of the step).

    :param diffusion: a GaussianDiffusion, respaced or not: the steps are its steps.
    :param model: the model, as for p_sample_loop (a guided model function works).
    :param shape: the shape of the samples, (N, C, H, W).
    :param known: the images to keep from, a float tensor of `shape` in [-1, 1].
    :param mask: where to keep them: a bool tensor (True = keep) broadcastable to `shape`,
        e.g. [N, 1, H, W] or [1, 1, H, W].
    :param sampler: "ddpm" (p_sample steps) or "ddim" (ddim_sample steps with `eta`).
    :param jump_length, resamplings: RePaint's resampling (repaint_schedule); 1 and 1 is plain
        replacement.
    :param eta: DDIM's eta (sampler "ddim" only).
    :param loop_options: noise (the starting x_T), clip_denoised, denoised_fn, cond_fn,
        model_kwargs, device and progress, as for p_sample_loop (sampling.LoopOptions).
    """
    options = LoopOptions.read("inpaint_loop", loop_options)
    if sampler not in INPAINT_SAMPLERS:
        raise ValueError(
            f"inpainting runs the diffusion's own steps: sampler {sampler!r} is not one of "
            f"{', '.join(INPAINT_SAMPLERS)}"
        )
    shape = tuple(shape)
    if tuple(known.shape) != shape:
        raise ValueError(f"known images of shape {tuple(known.shape)} != requested shape {shape}")
    if mask.dtype != th.bool:
        raise TypeError(f"mask must be a bool tensor (True = keep), got {mask.dtype}")
    try:
        th.broadcast_shapes(tuple(mask.shape), shape)
    except RuntimeError:
        raise ValueError(
            f"a mask of shape {tuple(mask.shape)} does not fit images of shape {shape}"
        ) from None
    schedule = repaint_schedule(diffusion.num_timesteps, jump_length, resamplings)
    x, device = loop_start(model, shape, noise=options.noise, device=options.device)
    known = known.to(device)
    mask = mask.to(device)
    if sampler == "ddpm":
        step_fn, step_kwargs = diffusion.p_sample, {}
    else:
        step_fn, step_kwargs = diffusion.ddim_sample, {"eta": eta}
    step = _RePaintStep(diffusion, step_fn, schedule, known, mask)
    yield from run_steps(
        step,
        model,
        x,
        schedule,
        device=device,
        progress=options.progress,
        desc="inpainting",
        **options.step_kwargs(),
        **step_kwargs,
    )


class _RePaintStep:
    """
    One reverse step of RePaint, called by the one sampling loop (sampling.run_steps) with the
    timesteps of `schedule` in order. It walks the same schedule in lockstep, so the step index
    is a host integer (reading it from the timestep tensor would synchronise with the device),
    and every coefficient is a host float of the diffusion's float64 tables.
    """

    def __init__(self, diffusion, step_fn, schedule, known, mask):
        self.step_fn = step_fn
        self.schedule = iter(schedule)
        self.known = known
        self.mask = mask
        # alpha_bar at the level reached after the step at index i is alphas_cumprod_prev[i];
        # the sample starts at the level of index T-1.
        self.abar = [float(a) for a in diffusion.alphas_cumprod]
        self.abar_prev = [float(a) for a in diffusion.alphas_cumprod_prev]
        self.level = len(self.abar) - 1  # the index whose noise level x is at

    def _alpha_bar_of_level(self, level):
        return 1.0 if level < 0 else self.abar[level]

    def __call__(self, model, x, t, **step_kwargs):
        index = next(self.schedule)
        if index > self.level:
            # Jump back up: x_index ~ q(x_index | x_level), alpha_bar ratio of the two levels
            # (Lugmayr et al. 2022, eq. 8-9 applied over the jump).
            ratio = self.abar[index] / self._alpha_bar_of_level(self.level)
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * th.randn_like(x)
        out = self.step_fn(model, x, t, **step_kwargs)
        # The known pixels, noised to the level this step ends at (Algorithm 1, line 5).
        abar = self.abar_prev[index]
        known = math.sqrt(abar) * self.known + math.sqrt(1.0 - abar) * th.randn_like(x)
        out = dict(out)
        out["sample"] = th.where(self.mask, known, out["sample"])
        self.level = index - 1
        return out
