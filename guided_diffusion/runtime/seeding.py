"""
Seeds per rank: training and sampling seed with seed + rank, so ranks never draw the same noise,
timesteps or samples, and one process with seed S repeats a reference run seeded with S.
"""

import random

import numpy as np
import torch

from .. import dist_util


def seed_sampling(seed):
    """
    Seed torch's global RNG with seed + rank, so that one process with seed S draws exactly what
    a reference run seeded with torch.manual_seed(S) at that point draws, and ranks never repeat
    each other's samples. Call it after the models are loaded, right before sampling.
    """
    torch.manual_seed(seed + dist_util.get_rank())


def seed_training(seed):
    """
    Seed torch, numpy and random with seed + rank: timesteps (numpy), noise (torch) and data
    order then differ across ranks and repeat across runs.
    """
    value = seed + dist_util.get_rank()
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
