"""
Logging the per-example loss terms of a batch: each term's mean and its mean per quarter of the
diffusion steps (train_util.log_loss_dict, the reference's name, lives here so that the training
helpers can use it without importing train_util).
"""

import torch

from .. import logger

__all__ = ["log_loss_dict"]


def log_loss_dict(diffusion, ts, losses):
    """
    Log the mean of each loss term, and its mean per quarter of the diffusion steps as
    <key>_q0 .. <key>_q3 (q0: the least noisy quarter).

    deviation from reference: the values stay tensors on their device until the logger dumps
    them (the reference copied every loss to the host at every microbatch); a quarter no timestep
    of the batch fell into is not logged, as before.

    :param diffusion: gives num_timesteps.
    :param ts: the timesteps of the batch.
    :param losses: {name: per-example loss tensor}.
    """
    if not losses:
        return
    values = torch.stack([v.detach().float() for v in losses.values()])
    # int(4 * t / T) for integer t in [0, T), the reference's quarter index.
    quarter = torch.div(4 * ts.to(values.device), diffusion.num_timesteps, rounding_mode="floor")
    quarter = quarter.long().clamp(0, 3)
    counts = torch.zeros(4, device=values.device).index_add_(0, quarter, torch.ones_like(values[0]))
    sums = torch.zeros(len(losses), 4, device=values.device).index_add_(1, quarter, values)
    means = sums / counts.clamp(min=1)
    for i, key in enumerate(losses):
        logger.logkv_mean(key, values[i].mean())
        for q in range(4):
            logger.logkv_mean(f"{key}_q{q}", means[i, q], count=counts[q])


