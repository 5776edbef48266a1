"""The loss-aware timestep sampler with its all-gather injected (resample.py imports no process code)."""

import numpy as np
import pytest
import torch

from guided_diffusion import dist_util
from guided_diffusion.resample import LossSecondMomentResampler, single_process_all_gather


class _Diffusion:
    num_timesteps = 6


def _two_rank_batches(rounds=8, seed=0):
    rng = np.random.RandomState(seed)
    for _ in range(rounds):
        yield [(torch.from_numpy(rng.randint(0, 6, 3)), torch.from_numpy(rng.rand(3) * 5))
               for _ in range(2)]


def test_injected_all_gather_keeps_ranks_identical_and_sees_every_rank():
    ranks = [LossSecondMomentResampler(_Diffusion(), history_per_term=2) for _ in range(2)]
    lone = LossSecondMomentResampler(_Diffusion(), history_per_term=2)
    every = LossSecondMomentResampler(_Diffusion(), history_per_term=2)
    for batches in _two_rank_batches():
        for rank, sampler in enumerate(ranks):
            # What a real all-gather returns on `rank`: every rank's tensor in rank order.
            sampler.set_all_gather(lambda t, rank=rank, b=batches: [
                (b[r][0] if t.dtype == torch.int64 else b[r][1].float()) if r != rank else t
                for r in range(2)])
            sampler.update_with_local_losses(*batches[rank])
        lone.update_with_local_losses(*batches[0])  # default: this process only
        every.update_with_all_losses(
            torch.cat([b[0] for b in batches]).tolist(),
            torch.cat([b[1].float() for b in batches]).tolist())
    assert every._warmed_up() and not np.allclose(lone.weights(), every.weights())
    np.testing.assert_array_equal(ranks[0].weights(), ranks[1].weights())
    np.testing.assert_allclose(ranks[0].weights(), every.weights(), rtol=1e-12)
    assert LossSecondMomentResampler.all_gather is single_process_all_gather
    t = torch.arange(3)
    assert single_process_all_gather(t)[0] is t and len(single_process_all_gather(t)) == 1


def test_train_loop_wires_the_distributed_all_gather(tmp_path):
    from guided_diffusion.script_util import create_gaussian_diffusion
    from test_train_util import make_loop

    diffusion = create_gaussian_diffusion(steps=100)
    loop = make_loop(tmp_path, diffusion=diffusion,
                     schedule_sampler=LossSecondMomentResampler(diffusion))
    assert loop.schedule_sampler.all_gather is dist_util.all_gather_tensors


def test_history_of_another_shape_is_refused_and_the_training_loop_warns(tmp_path):
    from guided_diffusion.script_util import create_gaussian_diffusion
    from test_train_util import make_loop

    sampler = LossSecondMomentResampler(_Diffusion(), history_per_term=2)
    other = LossSecondMomentResampler(_Diffusion(), history_per_term=3)
    other.update_with_all_losses([0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(6, 3\), not \(6, 2\)"):
        sampler.load_state_dict(other.state_dict())
    assert sampler._loss_counts.sum() == 0

    diffusion = create_gaussian_diffusion(steps=100)
    first = make_loop(tmp_path, diffusion=diffusion, max_steps=1,
                      schedule_sampler=LossSecondMomentResampler(diffusion, history_per_term=3))
    first.run_loop()
    resumed = make_loop(tmp_path, diffusion=diffusion, max_steps=1, resume_checkpoint="auto",
                        schedule_sampler=LossSecondMomentResampler(diffusion, history_per_term=2))
    resumed.run_loop()
    assert int(resumed.schedule_sampler.state_dict()["loss_counts"].sum()) == 4  # afresh + 1 step
    log = (tmp_path / "log.txt").read_text()
    assert "not (100, 2): the LossSecondMomentResampler starts afresh" in log
