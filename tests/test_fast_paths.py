"""The fast paths: attention on fused kernels, no host synchronisation in a forward, a training
step or a sampling step, cached diffusion tables, torch.compile, and bf16 with float32 masters."""

import contextlib

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from guided_diffusion import logger, script_util
from guided_diffusion.runtime import perf as perf_util
from guided_diffusion.resample import UniformSampler
from guided_diffusion.diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.diffusion.schedules import extract_into_tensor
from guided_diffusion.train_util import TrainLoop
from guided_diffusion.unet import QKVAttention, QKVAttentionLegacy


def tiny_unet(**overrides):
    flags = dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="16,8", num_head_channels=16, class_cond=True, num_classes=5,
        learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
    )
    flags.update(overrides)
    torch.manual_seed(0)
    model = script_util.create_model(**flags)
    # Non-zero output layers, so that every block influences the output and the gradients.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def unet_inputs(batch=2, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, 5, (batch,), generator=gen)
    return x, t, y


def _loss_and_grads(model, run):
    model.zero_grad()
    out = run()
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()]


# ---------------------------------------------------------------- fused attention


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_attention_runs_on_the_fused_kernel_forward_and_backward(new_order, dtype):
    model = tiny_unet(use_new_attention_order=new_order)
    if dtype == torch.bfloat16:
        model.convert_to_bf16()
    x, t, y = unet_inputs()
    # With the math kernel excluded, any attention call the fused kernel cannot take raises
    # "No available kernel" (3-D inputs, non-contiguous channels, ...).
    with sdpa_kernel([b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                  SDPBackend.CUDNN_ATTENTION)]):
        fused_out, fused_grads = _loss_and_grads(model, lambda: model(x, t, y=y))
    with sdpa_kernel([SDPBackend.MATH]):
        math_out, math_grads = _loss_and_grads(model, lambda: model(x, t, y=y))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(fused_out, math_out, **tol)
    for a, b in zip(fused_grads, math_grads):
        torch.testing.assert_close(a, b, **{k: v * 10 for k, v in tol.items()})


def test_classifier_attention_pool_runs_on_the_fused_kernel():
    torch.manual_seed(0)
    classifier = script_util.create_classifier(
        image_size=16, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention", num_classes=5,
        classifier_channel_mult="1,2",
    )
    x, t, _ = unet_inputs()
    x.requires_grad_(True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        logits = classifier(x, t)
        (grad,) = torch.autograd.grad(logits.log_softmax(-1)[:, 0].sum(), x)
    assert logits.shape == (2, 5) and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("module", [QKVAttentionLegacy, QKVAttention])
def test_attention_modules_match_the_reference_formula(module):
    heads, ch, length = 3, 8, 7
    qkv = torch.randn(2, 3 * heads * ch, length)
    out = module(heads)(qkv)
    # The reference's maths, written out: per head, softmax(q^T k / sqrt(C)) applied to v.
    if module is QKVAttentionLegacy:
        q, k, v = qkv.reshape(2 * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(2 * heads, ch, length) for part in qkv.chunk(3, dim=1))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / ch**0.5, dim=-1)
    expected = torch.einsum("bts,bcs->bct", weights, v).reshape(2, heads * ch, length)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- no host synchronisation


def tiny_classifier():
    torch.manual_seed(0)
    return script_util.create_classifier(
        image_size=16, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention", num_classes=5,
        classifier_channel_mult="1,2",
    )


def make_train_loop(tmp_path, model, device, **kwargs):
    logger.configure(dir=str(tmp_path), format_strs=[])
    diffusion = script_util.create_gaussian_diffusion(steps=100, learn_sigma=True)

    def data():
        gen = torch.Generator().manual_seed(0)
        while True:
            yield (torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1,
                   {"y": torch.randint(0, 5, (4,), generator=gen)})

    options = dict(
        model=model.to(device), diffusion=diffusion, data=data(), batch_size=4, microbatch=2,
        lr=1e-3, ema_rate="0.9,0.99", log_interval=10**6, save_interval=10**6, resume_checkpoint="",
    )
    options.update(kwargs)
    return TrainLoop(**options)


def run_every_step_kind(tmp_path, device, check=contextlib.nullcontext, **train_kwargs):
    """A model forward, two training steps and guided/unguided sampling steps, each inside check()."""
    # As in the reference, an fp16 model is built with use_fp16 (its torso computes in float16).
    model = tiny_unet(use_fp16=bool(train_kwargs.get("use_fp16")))
    loop = make_train_loop(tmp_path, model, device, **train_kwargs)
    sampling = script_util.create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="ddim10", rescale_timesteps=True
    )
    cond_fn = make_classifier_cond_fn(tiny_classifier().to(device).eval(), 1.0)
    x, t, y = (v.to(device) for v in unet_inputs())
    t10 = torch.full((2,), 9, device=device)

    def sample_steps():
        with torch.no_grad():
            sampling.ddim_sample(model, x, t10, model_kwargs={"y": y})
            sampling.p_sample(model, x, t10, model_kwargs={"y": y}, cond_fn=cond_fn)
            sampling.ddim_sample(model, x, t10, model_kwargs={"y": y}, cond_fn=cond_fn)

    # One warm-up of each (first calls may initialise libraries and fill the device caches).
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)
    sample_steps()
    with check():
        with torch.no_grad():
            model(x, t, y=y)
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        model.train()
        sample_steps()
    return loop


class _HostReadError(AssertionError):
    pass


@contextlib.contextmanager
def trap_host_reads():
    """
    Make every way Python code reads tensor values on the host raise: .item(), .tolist(),
    .numpy(), .cpu(), bool(), int(), float() and index conversion. On a GPU each of these waits
    for the device; on this CPU it finds the same Python-level synchronisations.
    """
    names = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
             "__array__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def trap(name):
        def raising(*args, **kwargs):
            raise _HostReadError(f"host read of a tensor: Tensor.{name}")
        return raising

    for name in names:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_forward_training_and_sampling_steps_never_read_tensors_on_the_host(tmp_path, precision):
    kwargs = {"fp16": dict(use_fp16=True), "bf16": dict(use_bf16=True)}.get(precision, {})
    run_every_step_kind(tmp_path, "cpu", check=trap_host_reads, **kwargs)
    # The logged values were kept as tensors and arrive at the dump.
    row = logger.dumpkvs()
    for key in ("loss", "mse", "vb", "grad_norm", "param_norm", "step", "samples"):
        assert key in row and np.isfinite(row[key]), key
    assert any(key.startswith("loss_q") for key in row)
    assert ("lg_loss_scale" in row) == (precision == "fp16")


def test_the_trap_catches_a_host_read():
    with trap_host_reads(), pytest.raises(_HostReadError):
        bool(torch.ones(()) > 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_steps_run_under_sync_debug_mode_error(tmp_path, precision):
    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    kwargs = {"fp16": dict(use_fp16=True), "bf16": dict(use_bf16=True)}.get(precision, {})
    run_every_step_kind(tmp_path, "cuda", check=sync_errors, **kwargs)


def test_tables_and_timestep_map_are_copied_to_a_device_once():
    diffusion = script_util.create_gaussian_diffusion(steps=100, timestep_respacing="ddim10")
    t = torch.tensor([0, 9])
    first = diffusion._tables_on(t.device)
    assert diffusion._tables_on(t.device) is first
    assert first["alphas_cumprod"].dtype == torch.float64  # looked up in float64, then cast
    values = diffusion._extract("alphas_cumprod", t, (2, 1, 1, 1))
    expected = torch.from_numpy(diffusion.alphas_cumprod[[0, 9]]).float().view(2, 1, 1, 1)
    assert values.dtype == torch.float32 and torch.equal(values, expected)
    # Each diffusion owns its copies: no state is shared between instances.
    other = script_util.create_gaussian_diffusion(steps=100, timestep_respacing="ddim10")
    assert other._tables_on(t.device) is not first
    # The reference's helper takes any table, a temporary included, and reads the same values.
    derived = extract_into_tensor(1.0 - diffusion.alphas_cumprod, t, (2, 1, 1, 1))
    assert torch.equal(derived, diffusion._extract("one_minus_alphas_cumprod", t, (2, 1, 1, 1)))
    seen = []
    wrapped = diffusion._wrap_model(lambda x, ts: seen.append(ts) or x)
    wrapped(torch.zeros(2), t)
    wrapped(torch.zeros(2), t)
    (table,) = diffusion._timestep_map_tensors.values()
    assert torch.equal(seen[0], torch.tensor(diffusion.timestep_map)[t])
    assert len(diffusion._timestep_map_tensors) == 1 and table.device == t.device


# ---------------------------------------------------------------- torch.compile


def test_compiled_forward_is_one_graph_and_matches_eager(tmp_path, monkeypatch):
    # The smallest class-conditional UNet with attention: compiling takes tens of seconds on CPU.
    # A cache of its own: inductor's shared cache in the temp folder can hold kernels another
    # process built for another vector unit (ATEN_CPU_CAPABILITY), which gave NaN here.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny_unet(image_size=8, channel_mult="1", attention_resolutions="1",
                      resblock_updown=False).eval()
    x, t, y = unet_inputs(size=8)
    with torch.no_grad():
        eager = model(x, t, y=y)
    reason = perf_util.compile_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    # fullgraph=True: any graph break (a host read such as int(y.max()), ...) is an error.
    perf_util.compile_model(model, fullgraph=True)
    with torch.no_grad():
        compiled = model(x, t, y=y)
    assert perf_util.is_compiled(model), "compilation failed and fell back to eager"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    # Parameters and checkpoints are untouched by compiling.
    assert all(not k.startswith("_orig_mod") for k in model.state_dict())


def test_compile_failure_falls_back_to_eager_with_one_line(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    model = tiny_unet(image_size=8, channel_mult="1", attention_resolutions="1").eval()
    x, t, y = unet_inputs(size=8)
    with torch.no_grad():
        eager = model(x, t, y=y)

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no code generator here")

    perf_util.compile_model(model, backend=broken_backend)
    with torch.no_grad():
        out = model(x, t, y=y)
        again = model(x, t, y=y)
    assert torch.equal(out, eager) and torch.equal(again, eager)
    assert not perf_util.is_compiled(model)
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert sum("torch.compile failed" in line and "running eagerly" in line for line in log) == 1
    # User errors still surface as themselves.
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, y=torch.tensor([0, 7]))
    # --compile False leaves the model alone.
    plain = tiny_unet()
    assert perf_util.compile_model(plain, enabled=False) is plain and "forward" not in vars(plain)


# ---------------------------------------------------------------- bf16 with float32 masters


def test_bf16_training_keeps_float32_masters_and_learns(tmp_path):
    model = tiny_unet()
    loop = make_train_loop(tmp_path, model, "cpu", use_bf16=True, microbatch=-1, lr=2e-3)
    trainer = loop.mp_trainer
    assert {p.dtype for p in trainer.master_params} == {torch.float32}
    convs = [m for m in model.input_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c.weight.dtype for c in convs} == {torch.bfloat16} and model.dtype == torch.bfloat16
    assert model.time_embed[0].weight.dtype == torch.float32  # embeddings stay float32

    # A fixed batch, timesteps and noise: the training objective on it must go down.
    batch, cond = next(loop.data)
    t = torch.tensor([10, 30, 60, 90])
    noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(3))

    diffusion = loop.diffusion

    def objective():
        with torch.no_grad():
            return diffusion.training_losses(model, batch, t, model_kwargs=cond,
                                             noise=noise)["loss"].mean().item()

    class Fixed(UniformSampler):
        def sample(self, batch_size, device):
            return t, torch.ones(batch_size)

    loop.schedule_sampler = Fixed(loop.diffusion)
    loop.diffusion = _FixedNoise(loop.diffusion, noise)
    start = objective()
    masters_before = [m.detach().clone() for m in trainer.master_params]
    for _ in range(4):
        loop.run_step(batch, cond)
    assert objective() < 0.8 * start
    assert {p.dtype for p in trainer.master_params} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(masters_before, trainer.master_params))
    # The bf16 weights are the float32 masters rounded, and checkpoints hold float32 values.
    state = trainer.master_params_to_state_dict(trainer.master_params)
    torch.testing.assert_close(convs[0].weight.detach(),
                               state["input_blocks.0.0.weight"].bfloat16(), rtol=0, atol=0)
    assert all(v.dtype == torch.float32 for v in state.values())
    loop.save()
    saved = torch.load(tmp_path / "model000000.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved.values())


class _FixedNoise:
    def __init__(self, diffusion, noise):
        self.diffusion, self.noise = diffusion, noise
        self.num_timesteps = diffusion.num_timesteps

    def training_losses(self, model, x, t, model_kwargs=None):
        return self.diffusion.training_losses(model, x, t, model_kwargs=model_kwargs,
                                              noise=self.noise[: len(x)])


# ---------------------------------------------------------------- script flags


def test_compile_and_bf16_flags_reach_the_networks(tmp_path, monkeypatch):
    from guided_diffusion.data.digits import write_digits
    from test_scripts import run_inprocess as run

    compiled = []

    def recording_compile(fn, **kwargs):
        compiled.append(fn.__qualname__)
        return fn  # eager: this test is about the wiring, test_compiled_forward_* about compiling

    monkeypatch.setattr(torch, "compile", recording_compile)
    data = write_digits(str(tmp_path / "digits"), image_size=16, limit=8)
    model_flags = ["--image_size", 16, "--num_channels", 32, "--num_res_blocks", 1,
                   "--channel_mult", "1,2", "--attention_resolutions", 8, "--num_head_channels", 16,
                   "--diffusion_steps", 100, "--class_cond", True, "--num_classes", 10]
    fast = ["--compile", True, "--use_bf16", True, "--tf32", False]
    assert run("image_train", ["--data_dir", data, *model_flags, *fast, "--batch_size", 2,
                               "--max_steps", 1, "--log_dir", tmp_path / "train"]) == 0
    assert compiled == ["UNetModel.forward"]
    state = torch.load(tmp_path / "train" / "model000001.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())

    assert run("image_sample", ["--model_path", tmp_path / "train" / "model000001.pt",
                                *model_flags, *fast, "--num_samples", 2, "--batch_size", 2,
                                "--timestep_respacing", 2, "--log_dir", tmp_path / "samples",
                                "--progress", False]) == 0
    assert compiled == ["UNetModel.forward"] * 2
    with np.load(tmp_path / "samples" / "samples_2x16x16x3.npz") as npz:
        assert npz["arr_0"].shape == (2, 16, 16, 3)
    # Both precisions at once are refused with one line.
    assert run("image_sample", ["--model_path", tmp_path / "train" / "model000001.pt",
                                *model_flags, "--use_fp16", True, "--use_bf16", True]) == 2


# ---------------------------------------------------------------- channels_last


def test_channels_last_model_matches_and_trains(tmp_path):
    import copy

    model = tiny_unet()
    plain = copy.deepcopy(model)
    perf_util.to_channels_last(model)
    conv = model.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert list(model.state_dict()) == list(plain.state_dict())
    x, t, y = unet_inputs()
    out, grads = _loss_and_grads(model, lambda: model(x, t, y=y))
    expected, expected_grads = _loss_and_grads(plain, lambda: plain(x, t, y=y))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Flat float32 masters (bf16 torso) round-trip channels-last weights.
    loop = make_train_loop(tmp_path, model, "cpu", use_bf16=True)
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)
    state = loop.mp_trainer.master_params_to_state_dict(loop.mp_trainer.master_params)
    torch.testing.assert_close(conv.detach().float(), state["input_blocks.0.0.weight"],
                               rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- TF32


def test_tf32_switch_is_cuda_only_and_restored():
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")

    def state():
        if new_api:
            return matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
        return matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    before = state()
    with perf_util.preserved_float32_precision():
        perf_util.set_tf32(True, device="cpu")
        assert state() == before  # CPU runs never change the CUDA numerics
        perf_util.set_tf32(True, device="cuda")
        assert state() == (("tf32", "tf32") if new_api else (True, True))
        perf_util.set_tf32(False, device="cuda")
        assert state() == (("ieee", "ieee") if new_api else (False, False))
    assert state() == before
