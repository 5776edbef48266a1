"""
Timestep samplers for training: uniform, and importance sampling by the loss's second moment
(Nichol & Dhariwal 2021, eq. 17), which reduces the variance of the L_vlb objective.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th

SAMPLER_NAMES = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion):
    """
    Create a ScheduleSampler from a library of pre-defined samplers.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion object to sample for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(
        f"unknown schedule sampler: {name!r} (known: {', '.join(SAMPLER_NAMES)})"
    )


class ScheduleSampler(ABC):
    """
    A distribution over timesteps, used to weight the training loss so that it stays an unbiased
    estimate of the uniformly weighted objective.
    """

    @abstractmethod
    def weights(self):
        """A numpy array of positive weights, one per diffusion step (they need not sum to 1)."""

    def sample(self, batch_size, device):
        """
        Importance-sample timesteps for a batch.

        :param batch_size: the number of timesteps.
        :param device: the torch device to put them on.
        :return: a tuple (timesteps, weights): int64 indices, and float32 weights 1 / (T p(t))
            that undo the non-uniform sampling.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        # non_blocking: copies from pageable host memory are safe, and unlike blocking copies
        # they do not stop the host until the device is idle.
        indices = th.from_numpy(indices_np).long().to(device, non_blocking=True)
        weights = th.from_numpy(1 / (len(p) * p[indices_np])).float().to(device, non_blocking=True)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


def single_process_all_gather(tensor):
    """The all-gather of a run with one process: a list holding just this process's tensor."""
    return [tensor]


class LossAwareSampler(ScheduleSampler):
    # deviation from reference: the reference gathers every rank's losses through torch.distributed
    # inside this class. Here the all-gather is injected (set_all_gather), so the diffusion maths
    # imports no process code; TrainLoop wires dist_util.all_gather_tensors, and a sampler used
    # outside TrainLoop gathers just its own process unless given one.
    all_gather = staticmethod(single_process_all_gather)

    def set_all_gather(self, all_gather):
        """
        Use `all_gather` to collect every rank's timesteps and losses.

        :param all_gather: a function tensor -> list of every rank's tensors in rank order
            (dist_util.all_gather_tensors in a distributed run).
        :return: self.
        """
        self.all_gather = all_gather
        return self

    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update the reweighting from this rank's losses, after gathering every rank's.

        Every rank must call this with its batch, so that all ranks keep identical weights.

        :param local_ts: an integer tensor of this rank's timesteps.
        :param local_losses: a 1-D tensor of the matching losses.
        """
        timesteps = th.cat(self.all_gather(local_ts.detach().long()))
        losses = th.cat(self.all_gather(local_losses.detach().float()))
        self.update_with_all_losses(timesteps.tolist(), losses.tolist())

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the reweighting from the losses of a whole (all-rank) batch.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Sample t with probability proportional to sqrt(E[L_t^2]) over the last history_per_term
    losses seen at t, mixed with a little uniform mass; uniform until every step has a full
    history.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        # deviation from reference: np.int was removed from numpy; a plain int64 array does the job.
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full history: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self):
        """The loss history (equal on every rank), as tensors; saved for exact resuming."""
        return {
            "loss_history": th.from_numpy(self._loss_history.copy()),
            "loss_counts": th.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        """
        Restore a history from state_dict().

        :raises ValueError: when the saved history has another shape (another number of steps or
            history length); the sampler is left as it was.
        """
        history = state["loss_history"].numpy()
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"the saved loss history has shape {history.shape}, not {self._loss_history.shape}"
            )
        self._loss_history = history.astype(np.float64).copy()
        self._loss_counts = state["loss_counts"].numpy().astype(np.int64).copy()
