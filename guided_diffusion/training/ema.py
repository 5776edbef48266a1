"""
The decay of the weights' exponential moving average, with an optional warm-up (shared by the
diffusion and classifier tasks and the cGAN).
"""

__all__ = ["ema_decay", "check_ema_warmup"]


def ema_decay(rate, step, warmup_power=0.0, inv_gamma=1.0):
    """
    The EMA decay used at the update after optimizer step index `step` (0 for the first).

    Without warm-up (warmup_power 0, the reference) it is `rate` at every step. With warm-up it
    follows k-diffusion's inverse-gamma form (Karras et al. 2022 use the same idea)

        decay = min(rate, 1 - (1 + step / inv_gamma) ** -warmup_power)

    which starts at 0 (the EMA is the weights themselves), so a short run's EMA is not dominated
    by the random initialisation: with rate 0.9999 and no warm-up, that initialisation still
    weighs 0.9999**n, i.e. 37% after 10k steps and 1% only after 46k.

    :param rate: the target decay (--ema_rate).
    :param step: a Python int (no device value: the update stays free of host synchronisation).
    :param warmup_power: the power (k-diffusion suggests 2/3 for short runs, 3/4 for long ones);
        0 disables the warm-up.
    :param inv_gamma: the inverse multiplicative factor of the step (1 in k-diffusion).
    :return: a float in [0, rate].
    """
    if warmup_power <= 0:
        return rate
    return min(rate, 1.0 - (1.0 + step / inv_gamma) ** -warmup_power)


def check_ema_warmup(warmup_power, inv_gamma):
    """:raises ValueError: for a negative power or a non-positive inv_gamma."""
    if not warmup_power >= 0:
        raise ValueError(f"--ema_warmup_power must be >= 0 (0 = no warm-up), got {warmup_power}")
    if not inv_gamma > 0:
        raise ValueError(f"--ema_inv_gamma must be > 0, got {inv_gamma}")
