"""
The GPU paths, on a CUDA GPU: fp16 and bf16 training steps, the networks against the reference
vectors, DDP over NCCL, ranks that would share a GPU, classifier-guided sampling, the scripts, and
the evaluator's network. Every test here carries the `cuda` marker and is skipped with the reason
where no GPU is visible. Run them with:

    python -m pytest -q -m cuda tests

Comparisons with CPU results or the reference vectors run with TF32 off (see ieee_fp32): both
sides then compute in IEEE float32 and differ only in the order of summation inside the kernels.
"""

import contextlib
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _launch import child_env, mpiexec_prefix, torchrun_prefix
from conftest import conformance_dir, load_vector
from guided_diffusion import logger
from guided_diffusion.diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion, create_model
from test_networks import _perturb

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference vectors' own tolerance (conformance README, test_models_conformance.py). With TF32
# off the GPU computes in IEEE float32 like the CPU and differs by summation order only. Measured
# on CPU: our outputs are within 6e-6 of the vectors, and moving every weight by 1e-6 relative
# moves them by at most 3e-5, so 1e-4 holds for rounding-level differences. With TF32 on,
# convolution and matmul inputs keep 10 mantissa bits (~5e-4 relative each): not inside it.
FP32_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _tf32_off():
    # torch >= 2.9 has per-backend fp32_precision settings and refuses to mix them with the
    # legacy allow_tf32 flags, so use whichever this torch has.
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        knobs = [(torch.backends, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision"),
                 (torch.backends.cudnn, "fp32_precision"),
                 (torch.backends.cudnn.conv, "fp32_precision"),
                 (torch.backends.cudnn.rnn, "fp32_precision")]
        value = "ieee"
    else:
        knobs = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
        value = False
    saved = [getattr(owner, name) for owner, name in knobs]
    for owner, name in knobs:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), old in zip(knobs, saved):
            setattr(owner, name, old)


@pytest.fixture
def ieee_fp32():
    """TF32 off for matmuls and cuDNN convolutions during the test (restored afterwards)."""
    with _tf32_off():
        yield


def _on(device, value):
    return value.to(device) if torch.is_tensor(value) else value


# ----------------------------------------------------------------------------- networks


def _vector_names():
    path = conformance_dir()
    if path is None:
        return ["(conformance folder missing)"]
    return sorted(p.stem for p in (path / "models").glob("*.pt"))


@pytest.fixture(params=_vector_names())
def vector(request, conformance):
    return load_vector(conformance / "models" / f"{request.param}.pt")


def _reference_network(vector, use_fp16=False):
    from test_models_conformance import _build

    flag = "classifier_use_fp16" if vector["kind"] == "classifier" else "use_fp16"
    model = _build(vector, **{flag: use_fp16})
    model.load_state_dict(vector["state_dict"], strict=True)
    return model.eval()


def test_forward_matches_reference_vectors(vector, ieee_fp32):
    model = _reference_network(vector).to(CUDA)
    kwargs = {k: _on(CUDA, v) for k, v in vector["kwargs"].items()}
    with torch.no_grad():
        for time_key, out_key in [("t", "out"), ("t_float", "out_float_t")]:
            out = model(vector["x"].to(CUDA), vector[time_key].to(CUDA), **kwargs)
            assert out.device == CUDA
            torch.testing.assert_close(out.cpu(), vector[out_key], **FP32_TOLERANCE,
                                       msg=lambda m: f"{out_key} on CUDA: {m}")


def test_fp16_torso_and_bf16_autocast_forwards_stay_near_the_vectors(vector):
    # Half precision keeps 11 (fp16) or 8 (bf16) mantissa bits: the bounds relative to the
    # largest output are those of the CPU tests in test_networks.py.
    expected = vector["out"]
    scale = expected.abs().max()
    kwargs = {k: _on(CUDA, v) for k, v in vector["kwargs"].items()}
    x, t = vector["x"].to(CUDA), vector["t"].to(CUDA)

    half = _reference_network(vector, use_fp16=True).to(CUDA)
    half.convert_to_fp16()
    with torch.no_grad():
        out = half(x, t, **kwargs)
    assert out.dtype == torch.float32
    assert (out.cpu() - expected).abs().max() <= 2e-2 * scale

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model = _reference_network(vector).to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, **kwargs)
    assert out.dtype == torch.bfloat16
    assert (out.float().cpu() - expected).abs().max() <= 5e-2 * scale


# ----------------------------------------------------------------------------- training


def _torso_conv(model):
    return model.input_blocks[1][0].in_layers[2]  # a ResBlock's first convolution


def test_fp16_training_steps_scale_the_loss_and_keep_fp32_master_weights(tmp_path):
    from test_train_util import ScaledDiffusion, make_loop, tiny_model

    torch.manual_seed(0)
    model = tiny_model(use_fp16=True).to(CUDA)
    # The second call's loss overflows once scaled (its gradients exceed the fp16 range).
    diffusion = ScaledDiffusion(create_gaussian_diffusion(steps=100), [1.0, 1e30, 1.0])
    loop = make_loop(tmp_path, model=model, diffusion=diffusion, use_fp16=True,
                     fp16_scale_growth=0.25)
    trainer = loop.mp_trainer
    conv = _torso_conv(model)
    assert conv.weight.dtype == torch.float16 and conv.weight.device == CUDA
    assert model.out[-1].weight.dtype == torch.float32  # the output layer stays float32
    assert all(p.dtype == torch.float32 and p.device == CUDA for p in trainer.master_params)
    inputs = []
    hook = conv.register_forward_hook(lambda m, args, out: inputs.append(args[0].dtype))
    try:
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        assert inputs and set(inputs) == {torch.float16}  # the torso computed in fp16
        assert trainer.lg_loss_scale == pytest.approx(20.25)
        # The step went to the fp32 master copy, then into the fp16 model.
        state = trainer.master_params_to_state_dict(trainer.master_params)
        key = next(n for n, p in model.named_parameters() if p is conv.weight)
        assert state[key].dtype == torch.float32
        assert torch.equal(conv.weight.detach(), state[key].half())

        ema = [p.clone() for p in loop.ema_params[0]]
        master = [p.detach().clone() for p in trainer.master_params]
        loop.run_step(batch, cond)  # overflow: skipped, scale halved, nothing moves
        assert trainer.lg_loss_scale == pytest.approx(19.25)
        assert all(torch.equal(a, b) for a, b in zip(master, trainer.master_params))
        assert all(torch.equal(a, b) for a, b in zip(ema, loop.ema_params[0]))

        loop.run_step(batch, cond)
        assert trainer.lg_loss_scale == pytest.approx(19.5)
        assert any(not torch.equal(a, b) for a, b in zip(master, trainer.master_params))
        assert all(torch.isfinite(p).all() for p in trainer.master_params)
    finally:
        hook.remove()


def test_bf16_training_step_is_close_to_fp32(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    from test_train_util import FixedNoiseDiffusion, FixedSampler, make_loop, tiny_model

    batch = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    results = {}
    for use_bf16 in (False, True):
        torch.manual_seed(0)
        model = _perturb(tiny_model()).to(CUDA)
        loop = make_loop(tmp_path / str(use_bf16), model=model, use_bf16=use_bf16)
        # The same timesteps and noise for both runs: only the precision differs.
        loop.schedule_sampler = FixedSampler(30)
        loop.diffusion = FixedNoiseDiffusion(loop.diffusion)
        dtypes = []
        hook = _torso_conv(model).register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
        try:
            before = [p.detach().clone() for p in model.parameters()]
            loop.run_step(batch, {})
        finally:
            hook.remove()
        kvs = dict(logger.getkvs())
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, fp32 weights
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        results[use_bf16] = (set(dtypes), kvs["loss"], grads)
    assert results[False][0] == {torch.float32} and results[True][0] == {torch.bfloat16}
    fp32_loss, bf16_loss = results[False][1], results[True][1]
    assert abs(bf16_loss - fp32_loss) <= 5e-2 * abs(fp32_loss)
    cosine = torch.nn.functional.cosine_similarity(results[False][2], results[True][2], dim=0)
    assert cosine > 0.9


# ----------------------------------------------------------------------------- distribution


def _run_worker(cmd, tmp_path, **env):
    from test_dist_util import run

    return run(cmd, tmp_path, cpu=False, **env)


def test_nccl_ddp_with_one_rank(tmp_path):
    from test_dist_util import check_group_destroyed_at_exit, expected_final_params, results

    # setup_dist leaves a one-rank job alone; the worker starts a one-rank NCCL group itself.
    _run_worker(torchrun_prefix(1), tmp_path, INIT_GROUP_BACKEND="nccl")
    (out,) = results(tmp_path, 1)
    assert (out["backend"], out["device"], out["wrapped"]) == ("nccl", "cuda:0",
                                                               "DistributedDataParallel")
    assert out["gathered"] == [[10.0, 10.0]] and out["gathered_uneven"] == [[[0.0]]]
    assert out["init"] == out["init_before_sync"]
    want = expected_final_params(out["init"], [out["batches"]])
    torch.testing.assert_close(torch.tensor(out["final"]), torch.tensor(want), rtol=0, atol=1e-5)
    check_group_destroyed_at_exit(tmp_path, 1)


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_nccl_ddp_with_two_ranks_on_two_gpus(tmp_path, launcher):
    from test_dist_util import check_group_destroyed_at_exit, check_two_ranks, results

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    cmd = torchrun_prefix(2) if launcher == "torchrun" else [*mpiexec_prefix(2), sys.executable]
    _run_worker(cmd, tmp_path)
    check_two_ranks(results(tmp_path, 2), backend="nccl", devices=("cuda:0", "cuda:1"), atol=1e-5)
    check_group_destroyed_at_exit(tmp_path, 2)


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_two_ranks_on_one_gpu_stop_with_one_line(tmp_path, launcher):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    only_one = visible.split(",")[0] if visible else "0"
    cmd = torchrun_prefix(2) if launcher == "torchrun" else [*mpiexec_prefix(2), sys.executable]
    proc = subprocess.run(
        [*cmd, os.path.join(REPO, "scripts", "image_train.py"), "--data_dir", str(tmp_path),
         "--log_dir", str(tmp_path / "log")],
        env=child_env(CUDA_VISIBLE_DEVICES=only_one), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    # Each rank prints the one line (run_main); NCCL never started, so it never complained.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors and all("2 ranks on this node would share 1 GPU" in line for line in errors)
    assert "Duplicate GPU" not in proc.stderr and "ncclInvalidUsage" not in proc.stderr


# ----------------------------------------------------------------------------- sampling


def _guided_setup():
    torch.manual_seed(0)
    model = _perturb(create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8",
                                  num_head_channels=16, learn_sigma=True, class_cond=True,
                                  num_classes=10)).eval()
    classifier = _perturb(create_classifier(16, False, 32, 1, "8", True, True, "attention",
                                            num_classes=10, classifier_channel_mult="1,2"),
                          seed=1, scale=0.2).eval()
    diffusion = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim5")
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return model, classifier, diffusion, noise, torch.tensor([0, 3, 5, 9])


def test_classifier_guided_ddim_on_cuda_matches_cpu(ieee_fp32):
    model, classifier, diffusion, noise, y = _guided_setup()
    outputs = {}
    for device, scale in [(torch.device("cpu"), 1.0), (CUDA, 1.0), (CUDA, 0.0)]:
        cond_fn = make_classifier_cond_fn(copy.deepcopy(classifier).to(device), scale)
        outputs[device.type, scale] = diffusion.ddim_sample_loop(
            copy.deepcopy(model).to(device), noise.shape, noise=noise.to(device),
            cond_fn=cond_fn, model_kwargs={"y": y.to(device)}, device=device,
        )
    guided = outputs["cuda", 1.0]
    assert guided.device == CUDA
    # DDIM with eta = 0 is deterministic given the noise, so both devices follow one trajectory.
    # It amplifies rounding (x_0 predicted near t = T is divided by sqrt(alpha_bar) ~ 1e-2): on
    # CPU, weights moved by 1e-6 relative move these samples by ~3e-4, hence 1e-2 here, while
    # the guidance itself moves them by more than 1.
    torch.testing.assert_close(guided.cpu(), outputs["cpu", 1.0], rtol=0, atol=1e-2)
    assert (guided - outputs["cuda", 0.0]).abs().max() > 0.5


def test_scripts_train_and_sample_on_one_gpu(tmp_path):
    # Training in fp16 (model and classifier), sampling with bf16 autocast and guidance, as a
    # researcher runs them on one GPU.
    from guided_diffusion.data.digits import write_digits
    from test_scripts import CLASSIFIER, MODEL, NUM_CLASSES

    data = write_digits(str(tmp_path / "digits"), image_size=16, limit=40)

    def script(name, *args):
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "scripts", name + ".py"), *map(str, args)],
            env=child_env(), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    script("image_train", "--data_dir", data, *MODEL, "--batch_size", 4, "--max_steps", 2,
           "--use_fp16", True, "--log_dir", tmp_path / "train")
    script("classifier_train", "--data_dir", data, "--image_size", 16, *CLASSIFIER,
           "--num_classes", NUM_CLASSES, "--diffusion_steps", 100, "--batch_size", 4,
           "--iterations", 2, "--classifier_use_fp16", True, "--log_dir", tmp_path / "clf")
    bf16 = ["--use_bf16", True] if torch.cuda.is_bf16_supported() else []
    script("classifier_sample", "--model_path", tmp_path / "train" / "model000002.pt", *MODEL,
           *CLASSIFIER, "--classifier_path", tmp_path / "clf" / "model000002.pt",
           "--classifier_scale", 1.0, "--num_samples", 3, "--batch_size", 2,
           "--timestep_respacing", "ddim3", "--use_ddim", True, "--log_dir", tmp_path / "out",
           "--progress", False, *bf16)
    with np.load(tmp_path / "out" / "samples_3x16x16x3.npz") as npz:
        assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].shape == (3,) and npz["arr_1"].max() < NUM_CLASSES


# ----------------------------------------------------------------------------- evaluator


def test_inception_features_on_cuda_match_cpu(ieee_fp32):
    from guided_diffusion.evaluation.evaluator import Evaluator
    from test_inception import he_initialised_model

    model = he_initialised_model()
    images = np.random.default_rng(3).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    features = {}
    for device in ("cpu", "cuda"):
        evaluator = Evaluator(model=copy.deepcopy(model).to(device), device=device, batch_size=2,
                              progress=False)
        pool, spatial = evaluator.compute_activations([images[:2], images[2:]])
        logits = evaluator.model.logits(torch.from_numpy(pool).to(device)).cpu()
        features[device] = [torch.from_numpy(pool), torch.from_numpy(spatial), logits]
    for cpu, gpu in zip(features["cpu"], features["cuda"]):
        # 94 convolutions deep: on CPU, weights moved by 1e-6 relative move these features by
        # ~1e-5 of their range; 1e-3 of it leaves room for the kernels' summation order.
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))


def test_precision_recall_on_cuda_gives_the_exact_answers(ieee_fp32):
    from guided_diffusion.evaluation.metrics import ManifoldEstimator, precision_recall
    from test_evaluator import grid

    # Integer coordinates: every distance is exact in float32 (with TF32 off), so the GPU must
    # reproduce the known answers exactly.
    ref = grid(20)
    samples = np.concatenate([grid(20), grid(20, offset=1000.0)])
    estimator = ManifoldEstimator(device="cuda", row_batch_size=7, col_batch_size=5)
    assert precision_recall(ref, samples, estimator=estimator) == (0.5, 1.0)
    assert precision_recall(samples, ref, estimator=estimator) == (1.0, 0.5)


def test_evaluator_cli_on_cuda(tmp_path):
    from test_evaluator import save_random_inception

    weights = tmp_path / "inception.pth"
    save_random_inception(weights)
    batch = tmp_path / "batch.npz"
    np.savez(batch, arr_0=np.random.default_rng(10).integers(0, 256, size=(5, 32, 32, 3),
                                                             dtype=np.uint8))
    proc = subprocess.run(
        [sys.executable, "evaluations/evaluator.py", str(batch), str(batch),
         "--inception_path", str(weights), "--batch_size", "2", "--device", "cuda"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert float(values["FID"]) == pytest.approx(0.0, abs=1e-6)
    assert float(values["sFID"]) == pytest.approx(0.0, abs=1e-6)
    assert float(values["Precision"]) == 1.0 and float(values["Recall"]) == 1.0
