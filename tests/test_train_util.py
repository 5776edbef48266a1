"""TrainLoop semantics on CPU: AdamW + lr decay, EMA after taken steps only, fp16 loss scale,
logging, checkpoints and resuming, non-finite losses, and DDP gradient averaging over two CPU ranks.
(TrainLoop computes on dist_util.dev(); these tests pin it to the CPU, where their models live.
The same loop on a GPU is tested in test_cuda.py.)"""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from _launch import child_env, mpiexec_prefix
from guided_diffusion import logger
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from guided_diffusion.train_util import (
    NonFiniteLossError,
    TrainLoop,
    find_resume_checkpoint,
    log_loss_dict,
    parse_resume_step_from_filename,
)

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")


def tiny_model(use_fp16=False):
    return create_model(
        16, 32, 1, channel_mult="1,2", attention_resolutions="8", num_head_channels=16,
        use_fp16=use_fp16,
    )


def endless_data(seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(batch, 3, 16, 16, generator=gen) * 2 - 1, {}


class ScaledDiffusion:
    """Wraps a diffusion and multiplies its losses by factors[call] (to force overflows/NaNs)."""

    def __init__(self, diffusion, factors):
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_timesteps
        self.factors = list(factors)
        self.calls = 0

    def training_losses(self, model, x, t, model_kwargs=None):
        losses = self.diffusion.training_losses(model, x, t, model_kwargs=model_kwargs)
        factor = self.factors[min(self.calls, len(self.factors) - 1)]
        self.calls += 1
        return {k: v * factor for k, v in losses.items()}


def make_loop(log_dir, model=None, diffusion=None, **kwargs):
    logger.configure(dir=str(log_dir), format_strs=["csv", "log"])
    torch.manual_seed(0)
    model = model or tiny_model()
    diffusion = diffusion or create_gaussian_diffusion(steps=100)
    options = dict(
        model=model, diffusion=diffusion, data=endless_data(), batch_size=4, microbatch=-1,
        lr=1e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=100, resume_checkpoint="",
    )
    options.update(kwargs)
    return TrainLoop(**options)


def test_parse_resume_step_from_filename():
    assert parse_resume_step_from_filename("logs/model001234.pt") == 1234
    assert parse_resume_step_from_filename("/a/models/model000010.pt") == 10
    assert parse_resume_step_from_filename("checkpoint.pt") == 0
    assert parse_resume_step_from_filename("model_final.pt") == 0


def test_log_loss_dict_quartiles(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])

    class D:
        num_timesteps = 100

    ts = torch.tensor([0, 24, 25, 99])
    log_loss_dict(D, ts, {"loss": torch.tensor([1.0, 3.0, 10.0, 20.0])})
    kvs = logger.getkvs()
    assert kvs["loss"] == pytest.approx(8.5)
    assert kvs["loss_q0"] == pytest.approx(2.0)  # t = 0 and 24 fall in the first quarter
    assert kvs["loss_q1"] == pytest.approx(10.0)
    assert kvs["loss_q3"] == pytest.approx(20.0)
    assert "loss_q2" not in kvs


def test_lr_decay_ema_logging_and_checkpoints(tmp_path):
    loop = make_loop(tmp_path, lr_anneal_steps=4, save_interval=3)
    start = [p.detach().clone() for p in loop.model.parameters()]
    ema_before = [[p.clone() for p in params] for params in loop.ema_params]
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)
    # One step: EMA_rate = rate * old + (1 - rate) * new weights.
    for rate, params, before in zip([0.9, 0.99], loop.ema_params, ema_before):
        for p, b, live in zip(params, before, loop.model.parameters()):
            torch.testing.assert_close(p, rate * b + (1 - rate) * live.detach())
    assert any(not torch.equal(a, b) for a, b in zip(start, loop.model.parameters()))
    # After step index 0 the lr is lr * (1 - 0/4); it then falls linearly.
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    kvs = logger.getkvs()
    for key in ("loss", "mse", "grad_norm", "param_norm", "step", "samples"):
        assert key in kvs
    assert kvs["samples"] == 4
    loop.step += 1
    loop.run_loop()
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 4))
    names = sorted(os.listdir(tmp_path))
    for step in (3, 4):
        for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", f"ema_0.9_{step:06d}.pt",
                     f"ema_0.99_{step:06d}.pt"):
            assert name in names
    state = torch.load(tmp_path / "model000004.pt", weights_only=True)
    assert set(state) == set(loop.model.state_dict())
    rows = open(tmp_path / "progress.csv").read().splitlines()
    assert len(rows) == 1 + 3 and rows[0].split(",").count("loss") == 1


def test_resume_restores_model_ema_optimizer_and_step(tmp_path):
    first = make_loop(tmp_path, max_steps=3, save_interval=2)
    first.run_loop()  # saves at step 2 and at the end (3)
    saved_model = {k: v.clone() for k, v in first.model.state_dict().items()}
    saved_ema = first.mp_trainer.master_params_to_state_dict(first.ema_params[1])
    saved_opt = first.opt.state_dict()

    for resume in (str(tmp_path / "model000003.pt"), "auto"):
        loop = make_loop(tmp_path, resume_checkpoint=resume)
        assert loop.resume_step == 3
        for k, v in loop.model.state_dict().items():
            torch.testing.assert_close(v, saved_model[k])
        ema = loop.mp_trainer.master_params_to_state_dict(loop.ema_params[1])
        for k in saved_ema:
            torch.testing.assert_close(ema[k], saved_ema[k])
        restored = loop.opt.state_dict()["state"]
        for key, value in saved_opt["state"].items():
            torch.testing.assert_close(restored[key]["exp_avg"], value["exp_avg"])
            assert float(restored[key]["step"]) == 3
    loop.max_steps = 2
    loop.save_interval = 5
    loop.run_loop()
    assert os.path.exists(tmp_path / "model000005.pt")
    assert find_resume_checkpoint() == str(tmp_path / "model000005.pt")


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_paths_fail(tmp_path):
    loop = make_loop(tmp_path, resume_checkpoint="auto")
    assert loop.resume_step == 0
    with pytest.raises(FileNotFoundError, match="model000007.pt"):
        make_loop(tmp_path, resume_checkpoint=str(tmp_path / "model000007.pt"))
    loop.max_steps = 1
    loop.run_loop()
    with pytest.raises(ValueError, match="modelNNNNNN.pt"):
        make_loop(tmp_path, resume_checkpoint=str(tmp_path / "opt000001.pt"))
    # A checkpoint of another architecture names the flag.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "model000001.pt", other / "model000001.pt")
    with pytest.raises(ValueError, match="--class_cond False"):
        make_loop(
            other,
            model=create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8",
                               num_head_channels=16, class_cond=True, num_classes=3),
            resume_checkpoint=str(other / "model000001.pt"),
        )


def test_microbatches_sum_their_mean_losses_as_the_reference(tmp_path):
    grads = []
    batch = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    for microbatch in (-1, 1):
        loop = make_loop(tmp_path, microbatch=microbatch)
        # Fixed timesteps and example-dependent noise make both passes see the same objective.
        loop.schedule_sampler = FixedSampler(5)
        loop.diffusion = FixedNoiseDiffusion(loop.diffusion)
        loop.forward_backward(batch, {})
        grads.append(torch.cat([p.grad.flatten() for p in loop.model.parameters()]))
    # Each microbatch back-propagates its own mean loss, so four microbatches of one image give
    # four times the gradient of one batch of four (the reference's accumulation).
    torch.testing.assert_close(grads[1], 4 * grads[0], rtol=1e-4, atol=1e-6)


class FixedSampler:
    def __init__(self, t):
        self.t = t

    def sample(self, batch_size, device):
        t = torch.full((batch_size,), self.t, dtype=torch.long, device=device)
        return t, torch.ones(batch_size, device=device)


class FixedNoiseDiffusion:
    """Noise depends only on the example's content, so microbatching cannot change it."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_timesteps

    def training_losses(self, model, x, t, model_kwargs=None):
        noise = torch.sin(x * 7.0)
        return self.diffusion.training_losses(model, x, t, model_kwargs=model_kwargs, noise=noise)


def test_non_finite_loss_stops_after_last_good_checkpoint(tmp_path):
    base = create_gaussian_diffusion(steps=100)
    diffusion = ScaledDiffusion(base, [1.0, 1.0, float("nan")])
    loop = make_loop(tmp_path, diffusion=diffusion, save_interval=2)
    with pytest.raises(NonFiniteLossError) as info:
        loop.run_loop()
    message = str(info.value)
    assert "model000002.pt" in message and "not finite" in message
    assert not os.path.exists(tmp_path / "model000003.pt")
    # The weights were not touched by the broken step.
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_fp16_loss_scale_skips_overflows_and_grows(tmp_path):
    base = create_gaussian_diffusion(steps=100)
    # Second call overflows (the scaled gradients exceed the fp16 range); the rest are normal.
    diffusion = ScaledDiffusion(base, [1.0, 1e30, 1.0])
    loop = make_loop(tmp_path, model=tiny_model(use_fp16=True), diffusion=diffusion,
                     use_fp16=True, fp16_scale_growth=0.25)
    assert loop.mp_trainer.lg_loss_scale == 20.0
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)
    assert loop.mp_trainer.lg_loss_scale == pytest.approx(20.25)
    ema = [p.clone() for p in loop.ema_params[0]]
    master = [p.detach().clone() for p in loop.mp_trainer.master_params]
    loop.run_step(batch, cond)  # overflow: skipped, scale halved, EMA untouched
    assert loop.mp_trainer.lg_loss_scale == pytest.approx(19.25)
    for a, b in zip(ema, loop.ema_params[0]):
        assert torch.equal(a, b)
    for a, b in zip(master, loop.mp_trainer.master_params):
        assert torch.equal(a, b)
    loop.run_step(batch, cond)
    assert loop.mp_trainer.lg_loss_scale == pytest.approx(19.5)
    assert any(not torch.equal(a, b) for a, b in zip(ema, loop.ema_params[0]))
    assert "lg_loss_scale" in logger.getkvs() or os.path.exists(tmp_path / "progress.csv")


@pytest.mark.parametrize(
    # The log check follows the 6th step (the first of the second interval); the save check
    # follows the 4th step.
    "log_interval,save_interval,stop,steps_run", [(5, 100, 6, 6), (100, 4, 4, 4)]
)
def test_fp16_persistent_nan_stops_at_the_next_check(
    tmp_path, log_interval, save_interval, stop, steps_run
):
    diffusion = ScaledDiffusion(create_gaussian_diffusion(steps=100), [float("nan")])
    loop = make_loop(tmp_path, model=tiny_model(use_fp16=True), diffusion=diffusion,
                     use_fp16=True, log_interval=log_interval, save_interval=save_interval)
    loop.mp_trainer.lg_loss_scale = 2.0  # as if 18 overflows had already happened
    with pytest.raises(NonFiniteLossError, match="loss scale"):
        loop.run_loop()
    # Scale 2 -> 1 -> 0 -> -1: below 1 after the third skipped step. The steps never wait for the
    # device, so the loop notices at its next check: a log interval, or before a save (which
    # therefore never writes the broken state).
    assert loop.step == stop
    assert loop.mp_trainer.lg_loss_scale == pytest.approx(2.0 - steps_run)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".pt")]


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from guided_diffusion import dist_util, logger
    from guided_diffusion.script_util import create_gaussian_diffusion, create_model
    from guided_diffusion.train_util import TrainLoop
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=sys.argv[1], format_strs=[])
    torch.manual_seed(100 + rank)  # different initial weights: sync_params must fix them
    model = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8",
                         num_head_channels=16)
    def data():
        gen = torch.Generator().manual_seed(rank)  # different data on each rank
        while True:
            yield torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, {}
    loop = TrainLoop(model=model, diffusion=create_gaussian_diffusion(steps=100), data=data(),
                     batch_size=2, microbatch=1, lr=1e-2, ema_rate="0.9", log_interval=100,
                     save_interval=100, resume_checkpoint="", max_steps=3)
    losses = []
    for _ in range(3):
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        losses.append(logger.getkvs()["loss"])
        logger.dumpkvs()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ema = torch.cat([p.flatten() for p in loop.ema_params[0]])
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = dist_util.all_gather_tensors(torch.stack([flat.sum(), flat.norm(), ema.norm(),
                                                         grads.norm()]))
    local_loss = dist_util.all_gather_tensors(torch.tensor(losses))
    if rank == 0:
        torch.save({"stats": torch.stack(gathered), "losses": torch.stack(local_loss),
                    "params": flat}, sys.argv[1] + "/ddp.pt")
    """
)


def test_ddp_two_ranks_keep_identical_parameters(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run(
        [*mpiexec_prefix(2), sys.executable, str(script), str(tmp_path)],
        env=child_env(cpu=True), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = torch.load(tmp_path / "ddp.pt", weights_only=True)
    stats, losses = out["stats"], out["losses"]
    # The ranks saw different data (their local losses differ) ...
    assert not torch.allclose(losses[0], losses[1])
    # ... yet hold the same weights, EMA and averaged gradients after three steps.
    torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=0)
    assert math.isfinite(float(stats[0, 1]))


def test_annealed_learning_rate_after_resume_follows_the_new_lr(tmp_path):
    first = make_loop(tmp_path, lr=1e-3, lr_anneal_steps=8, max_steps=3, save_interval=3)
    first.run_loop()
    resumed = make_loop(tmp_path, lr=5e-4, lr_anneal_steps=8, max_steps=2,
                        resume_checkpoint="auto")
    rates = []
    real_step = resumed.opt.step

    def step(*args, **kwargs):
        rates.append(resumed.opt.param_groups[0]["lr"])
        return real_step(*args, **kwargs)

    resumed.opt.step = step
    resumed.run_loop()
    # The rates an uninterrupted run with lr 5e-4 takes its 4th and 5th steps with: the
    # reference sets, after the step of index k, lr * (1 - k / lr_anneal_steps).
    assert rates == [5e-4 * (1 - 2 / 8), 5e-4 * (1 - 3 / 8)]
    logger.get_current().close()
    log = (tmp_path / "log.txt").read_text()
    assert ("resuming with changed settings: --save_interval 3 -> 100, --lr 0.001 -> 0.0005"
            in log)
