"""
Samplers of a GaussianDiffusion: ancestral sampling (Ho et al. 2020, Algorithm 2), DDIM
(Song et al. 2021, eq. 12) and DDIM inversion (the same deterministic map run from x_0 to x_T,
Song et al. 2021, section 5.4), each one step function plus one shared loop.

The order of random draws is part of the contract (tests compare against reference runs under a
fixed seed): a loop draws its starting noise with one randn(*shape) when none is given, then each
step draws exactly one randn_like(x) after the model call, even when the noise is not used. The
inversion loop draws nothing.
"""

from dataclasses import dataclass, fields, replace

import torch as th

from .progress import steps_with_progress


class SamplingMixin:
    """Sampling methods of GaussianDiffusion; relies on its tables and p_mean_variance."""

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """
        Sample x_{t-1} from the model at the given timestep.

        :param cond_fn: if not None, a gradient function cond_fn(x, t, **model_kwargs) of
            log p(y | x_t) (times the guidance scale) that shifts the mean.
        :return: a dict with 'sample' (x_{t-1}) and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = th.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """
        Generate samples from the model by ancestral sampling.

        :param shape: the shape of the samples, (N, C, H, W).
        :param noise: if given, the starting noise x_T; else drawn with one randn(*shape).
        :param device: where to sample; defaults to the model's device.
        :param progress: True for a progress bar of this loop, or a bar to advance by one per
            step (anything with update(n), e.g. a tqdm over a whole sampling run).
        :return: the final batch of samples.
        """
        return last_sample(
            self.p_sample_loop_progressive(
                model,
                shape,
                noise=noise,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                device=device,
                progress=progress,
            )
        )

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Like p_sample_loop, but yield each step's p_sample output, from t = T-1 down to 0."""
        yield from self._sample_loop_progressive(
            self.p_sample,
            model,
            shape,
            noise=noise,
            device=device,
            progress=progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """
        Sample x_{t-1} with DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic.

        :param cond_fn: if not None, guidance applied to the score (condition_score).
        :return: a dict with 'sample' and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Recompute eps from the (possibly clipped) x_0 prediction so the update is consistent.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = th.randn_like(x)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """
        Step x_t to x_{t+1} with the deterministic DDIM ODE (used to encode images into noise).

        Only eta = 0 defines a deterministic reverse step.
        """
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is only defined for eta = 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Generate samples with DDIM; the arguments are those of p_sample_loop plus eta."""
        return last_sample(
            self.ddim_sample_loop_progressive(
                model,
                shape,
                noise=noise,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                device=device,
                progress=progress,
                eta=eta,
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Like ddim_sample_loop, but yield each step's ddim_sample output."""
        yield from self._sample_loop_progressive(
            self.ddim_sample,
            model,
            shape,
            noise=noise,
            device=device,
            progress=progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    def ddim_inverse_step(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ):
        """
        Undo ddim_sample(eta=0) at timestep t: take x from the noise level ddim_sample(t) ends at
        (alpha_bar_prev[t], 1 for t = 0) to the level it starts from (alpha_bar[t]).

        DDIM's deterministic update (Song et al. 2021, eq. 12 with sigma = 0)
        x_out = sqrt(abar_out) x0 + sqrt(1 - abar_out) eps, with
        x0 = (x_in - sqrt(1 - abar_in) eps) / sqrt(abar_in), is taken the other way round, with
        abar_in and abar_out swapped. The exact inverse would need eps at the unknown output; it
        is taken at the known input instead (the model still sees timestep t, so the model calls
        of the inversion are those of sampling in reverse order). The error of that
        substitution vanishes as the steps get finer; for a model whose noise prediction does not
        depend on x the inversion is exact.

        The noise prediction is the one ddim_sample uses: recomputed from the x_0 prediction, so
        clip_denoised, denoised_fn and cond_fn (condition_score) change it the same way. Invert
        and decode with the same settings; then decoding undoes inversion up to the substitution
        above.

        The reference's ddim_reverse_sample (kept as is) maps x_t to x_{t+1} with eps at t;
        chaining it from t = 0 treats the clean image as x at t = 0 and ends at alpha_bar = 0,
        not at the level where ddim_sample_loop starts.

        :return: a dict with 'sample' (x at alpha_bar[t]) and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_in = self._extract("alphas_cumprod_prev", t, x.shape)
        alpha_bar_out = self._extract("alphas_cumprod", t, x.shape)
        x0 = (x - th.sqrt(1 - alpha_bar_in) * eps) / th.sqrt(alpha_bar_in)
        sample = th.sqrt(alpha_bar_out) * x0 + th.sqrt(1 - alpha_bar_out) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample_loop(
        self,
        model,
        x_start,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """
        Encode images into DDIM latents: run the deterministic DDIM sampler backwards, from x_0
        to x_T (Song et al. 2021, section 5.4). ddim_sample_loop(model, x_start.shape,
        noise=x_T) with the same diffusion (respacing), clip_denoised, denoised_fn, cond_fn and
        model_kwargs decodes x_T back to approximately x_start; the error falls as the number
        of steps grows.

        :param x_start: the images x_0, an [N x C x ...] tensor in [-1, 1].
        :param clip_denoised: as in ddim_sample_loop (see ddim_inverse_step); True by default
            like ddim_sample_loop, so that the defaults of both make a matching pair.
        :param model_kwargs: extra model inputs, e.g. {"y": labels} for a class-conditional
            model: the latents then belong to those labels.
        :param device: where to compute; defaults to x_start's device.
        :param progress: True for a progress bar of this loop, or a bar to advance by one per
            step (anything with update(n), e.g. a tqdm over a whole sampling run).
        :param eta: must be 0: with eta > 0 sampling adds fresh noise at every step, so it is
            not a deterministic map and has no inverse.
        :return: x_T, a tensor of x_start's shape.
        """
        return last_sample(
            self.ddim_reverse_sample_loop_progressive(
                model,
                x_start,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                device=device,
                progress=progress,
                eta=eta,
            )
        )

    def ddim_reverse_sample_loop_progressive(
        self,
        model,
        x_start,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """
        Like ddim_reverse_sample_loop, but yield each step's ddim_inverse_step output, from
        t = 0 up to T-1 (the timesteps of ddim_sample_loop in reverse order).

        Bad arguments (eta != 0) raise here, at the call, not at the first step.
        """
        check_invertible_eta(eta)
        if not isinstance(x_start, th.Tensor):
            raise TypeError(f"x_start must be a tensor of images, got {type(x_start).__name__}")
        return self._sample_loop_progressive(
            self.ddim_inverse_step,
            model,
            tuple(x_start.shape),
            noise=x_start if device is None else x_start.to(device),
            device=device,
            progress=progress,
            reverse=True,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def _sample_loop_progressive(
        self, step, model, shape, *, noise, device, progress, reverse=False, **step_kwargs
    ):
        """
        Run `step` from t = T-1 down to 0 (from 0 up to T-1 when reverse, for inversion),
        yielding each output; `noise` is the starting tensor (drawn when None).
        """
        img, device = loop_start(model, shape, noise=noise, device=device)
        if reverse:
            order, desc = range(self.num_timesteps), "inverting"
        else:
            order, desc = range(self.num_timesteps - 1, -1, -1), "sampling"
        yield from run_steps(
            step, model, img, order, device=device, progress=progress, desc=desc, **step_kwargs
        )


@dataclass(frozen=True)
class LoopOptions:
    """
    The options every sampling loop takes, named and defaulted as p_sample_loop's: the loops
    built on top of the diffusion's steps (inpainting, SDEdit, the ODE/SDE solvers) take them as
    plain keywords and read them through this one definition.

    :param noise: the starting tensor; else drawn with one randn(*shape).
    :param clip_denoised, denoised_fn, cond_fn, model_kwargs: passed to every step, as for
        p_sample.
    :param device: where to sample (loop_start).
    :param progress: True for a progress bar, or a bar to advance by one per step.
    """

    noise: object = None
    clip_denoised: bool = True
    denoised_fn: object = None
    cond_fn: object = None
    model_kwargs: object = None
    device: object = None
    progress: object = False

    @classmethod
    def read(cls, loop_name, keywords):
        """
        :param loop_name: the loop the keywords were given to, for the error.
        :param keywords: the caller's keywords beyond the loop's own.
        :raises TypeError: naming any keyword that is not a loop option.
        """
        known = [field.name for field in fields(cls)]
        unknown = sorted(set(keywords) - set(known))
        if unknown:
            raise TypeError(
                f"{loop_name}() got unexpected keyword(s) {', '.join(unknown)}; besides its own "
                f"it takes the sampling-loop options {', '.join(known)}"
            )
        return cls(**keywords)

    def step_kwargs(self):
        """The keywords of each step call (p_sample, ddim_sample)."""
        return {
            "clip_denoised": self.clip_denoised,
            "denoised_fn": self.denoised_fn,
            "cond_fn": self.cond_fn,
            "model_kwargs": self.model_kwargs,
        }

    def keywords(self, **changes):
        """All options as keywords for another loop, with `changes` applied."""
        changed = replace(self, **changes)
        return {field.name: getattr(changed, field.name) for field in fields(changed)}


def loop_start(model, shape, *, noise=None, device=None):
    """
    The start of every sampling loop: check the shape, pick the device and take the starting
    tensor, drawing it with one torch.randn(*shape) when noise is None.

    :param device: where to sample; defaults to noise's device, else the model's (a plain
        function counts as on the CPU).
    :return: (the starting tensor, the device).
    """
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
    if device is None:
        device = _model_device(model, noise)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
        return noise, device
    return th.randn(*shape, device=device), device


def run_steps(step, model, img, timesteps, *, device, progress=False, desc="sampling", **step_kwargs):
    """
    The one sampling loop: call step(model, img, t, **step_kwargs) at each timestep index in
    turn (t a batch-sized long tensor) and yield its output, whose "sample" is the next img.

    :param step: a step function such as GaussianDiffusion.p_sample or ddim_sample.
    :param timesteps: the sequence of timestep indices, e.g. range(T - 1, -1, -1).
    """
    batch = img.shape[0]
    for i in steps_with_progress(timesteps, progress, desc):
        t = th.full((batch,), i, device=device, dtype=th.long)
        # Guidance functions enable gradients themselves; the model never needs them here.
        with th.no_grad():
            out = step(model, img, t, **step_kwargs)
        yield out
        img = out["sample"]


def check_invertible_eta(eta):
    """
    Raise a ValueError unless eta == 0, the only DDIM sampler that can be inverted.
    """
    if eta != 0:
        raise ValueError(
            f"DDIM inversion needs --eta 0 (got {eta}): with eta > 0 every sampling step adds "
            "fresh noise, so x_T -> x_0 is not a deterministic map and cannot be inverted"
        )


def last_sample(progressive):
    """
    Drain a progressive loop: how every plain loop is made from its progressive twin, so that
    each sampler has one loop.

    :param progressive: an iterator of step outputs (dicts with "sample").
    :return: the last output's "sample".
    """
    final = None
    for final in progressive:
        pass
    return final["sample"]


def _model_device(model, noise):
    # deviation from reference: a plain function (no parameters) is accepted as the model.
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return th.device("cpu")


def _nonzero_mask(t, x):
    # No noise is added on the last step (t == 0).
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
