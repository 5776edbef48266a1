"""
Unit tests of the network building blocks, mixed precision, checkpointing, the factories and
their error messages. Models are tiny (32 channels, 16x16 or 32x32 images) to stay fast.
"""

import argparse
import json
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from guided_diffusion import fp16_util, logger, nn as gnn, script_util
from guided_diffusion.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
)

TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_heads=2,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _perturb(model, seed=0, scale=0.05):
    """Move every weight off its initial value so zero-initialised layers pass a signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _inputs(batch=2, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.tensor([3, 700])[:batch]
    return x, t


# ---------------------------------------------------------------- nn helpers


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.5, 10.0])
    emb = gnn.timestep_embedding(t, 6)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    odd = gnn.timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


def test_layer_factories_and_bad_dims():
    assert isinstance(gnn.conv_nd(1, 4, 4, 3), nn.Conv1d)
    assert isinstance(gnn.conv_nd(3, 4, 4, 3), nn.Conv3d)
    assert isinstance(gnn.avg_pool_nd(2, 2), nn.AvgPool2d)
    assert isinstance(gnn.linear(3, 5), nn.Linear)
    with pytest.raises(ValueError, match="unsupported dimensions"):
        gnn.conv_nd(4, 4, 4, 3)
    with pytest.raises(ValueError, match="unsupported dimensions"):
        gnn.avg_pool_nd(0, 2)


def test_zero_scale_mean_flat_and_ema():
    layer = nn.Linear(3, 2)
    original = layer.weight.detach().clone()
    assert gnn.scale_module(layer, 2.0) is layer
    torch.testing.assert_close(layer.weight, 2 * original)
    gnn.zero_module(layer)
    assert all(torch.all(p == 0) for p in layer.parameters())

    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(gnn.mean_flat(x), torch.tensor([5.5, 17.5]))

    target = [torch.ones(3)]
    source = [torch.full((3,), 3.0, requires_grad=True)]
    gnn.update_ema(target, source, rate=0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.9 + 0.1 * 3.0))


def test_groupnorm32_computes_in_float32():
    norm = gnn.normalization(64)
    assert isinstance(norm, gnn.GroupNorm32) and norm.num_groups == 32
    x = (torch.randn(2, 64, 5) * 300).half()
    out = norm(x)
    assert out.dtype == torch.float16
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).half()
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- attention


def _naive_attention(q, k, v):
    """softmax(q^T k / sqrt(C)) v over [B x C x T] tensors, written out by hand."""
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("bts,bcs->bct", weights, v)


@pytest.mark.parametrize("heads", [1, 3])
def test_qkv_attention_both_head_orders(heads):
    batch, ch, length = 2, 8, 10
    qkv = torch.randn(batch, 3 * heads * ch, length)

    # Legacy layout: per head [q, k, v].
    per_head = qkv.reshape(batch * heads, 3 * ch, length)
    q, k, v = per_head[:, :ch], per_head[:, ch : 2 * ch], per_head[:, 2 * ch :]
    legacy_expected = _naive_attention(q, k, v).reshape(batch, heads * ch, length)
    legacy = QKVAttentionLegacy(heads)(qkv)
    torch.testing.assert_close(legacy, legacy_expected, rtol=1e-5, atol=1e-5)

    # New layout: [all q, all k, all v], then heads.
    q, k, v = (part.reshape(batch * heads, ch, length) for part in qkv.chunk(3, dim=1))
    new_expected = _naive_attention(q, k, v).reshape(batch, heads * ch, length)
    torch.testing.assert_close(QKVAttention(heads)(qkv), new_expected, rtol=1e-5, atol=1e-5)

    if heads > 1:
        assert not torch.allclose(legacy_expected, new_expected, atol=1e-3)


def test_attention_uses_scaled_dot_product_attention(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append([(tuple(a.shape), a.stride(-1)) for a in args[:3]])
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    QKVAttentionLegacy(2)(torch.randn(1, 48, 5))
    QKVAttention(2)(torch.randn(1, 48, 5))
    # The fused kernels need 4-D [batch, heads, tokens, channels] with contiguous channels.
    assert calls == [[((1, 2, 5, 8), 1)] * 3] * 2


def test_attention_head_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"96 channels.*num_head_channels=64"):
        AttentionBlock(96, num_head_channels=64)
    with pytest.raises(ValueError, match=r"64 channels.*num_heads=3"):
        AttentionBlock(64, num_heads=3)
    with pytest.raises(ValueError, match=r"num_head_channels=64"):
        script_util.create_model(32, 32, 1, attention_resolutions="32", num_head_channels=64)


# ---------------------------------------------------------------- checkpointing


def _count_blocks(model):
    return sum(isinstance(m, (ResBlock, AttentionBlock)) for m in model.modules())


def test_gradient_checkpointing_gives_equal_gradients(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    grads, outs = {}, {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = _perturb(
            script_util.create_model(**TINY, dropout=0.1, class_cond=True, use_checkpoint=flag)
        )
        model.train()
        x, t = _inputs()
        calls.clear()
        torch.manual_seed(5)  # same dropout masks in both runs
        out = model(x, t, y=torch.tensor([1, 2]))
        (out**2).mean().backward()
        n_blocks = _count_blocks(model)
        assert calls == ([False] * n_blocks if flag else [])
        outs[flag] = out.detach()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters()}

    torch.testing.assert_close(outs[True], outs[False])
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads[False].values())


def test_attention_block_honours_use_checkpoint(monkeypatch):
    calls = []
    def fake_checkpoint(func, *args, **kwargs):
        calls.append(1)
        return func(*args)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", fake_checkpoint)
    x = torch.randn(1, 32, 4, 4, requires_grad=True)
    AttentionBlock(32, use_checkpoint=False)(x)
    assert calls == []
    AttentionBlock(32, use_checkpoint=True)(x)
    assert calls == [1]
    with torch.no_grad():  # nothing to save when no graph is built
        AttentionBlock(32, use_checkpoint=True)(x)
    assert calls == [1]


# ---------------------------------------------------------------- precision


def _conv_dtypes(module):
    return {m.weight.dtype for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}


def test_convert_to_fp16_casts_only_the_torso_convolutions():
    model = script_util.create_model(**TINY, class_cond=True, use_fp16=True)
    assert model.dtype == torch.float16
    model.convert_to_fp16()
    for part in (model.input_blocks, model.middle_block, model.output_blocks):
        assert _conv_dtypes(part) == {torch.float16}
        for m in part.modules():
            if isinstance(m, (nn.GroupNorm, nn.Linear)):
                assert all(p.dtype == torch.float32 for p in m.parameters())
    for part in (model.time_embed, model.label_emb, model.out):
        assert all(p.dtype == torch.float32 for p in part.parameters())

    model.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_forward_close_to_fp32():
    torch.manual_seed(0)
    reference = _perturb(script_util.create_model(**TINY, learn_sigma=True)).eval()
    half = script_util.create_model(**TINY, learn_sigma=True, use_fp16=True).eval()
    half.load_state_dict(reference.state_dict())
    half.convert_to_fp16()
    x, t = _inputs()
    with torch.no_grad():
        expected = reference(x, t)
        try:
            out = half(x, t)
        except (RuntimeError, NotImplementedError) as err:  # CPU builds without fp16 kernels
            pytest.skip(f"float16 kernels unavailable on this CPU build: {err}")
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 2e-2 * expected.abs().max()


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    unet = _perturb(script_util.create_model(**TINY, learn_sigma=True)).eval()
    classifier = _perturb(
        script_util.create_classifier(
            16, False, 64, 1, "8", True, True, "attention",
            num_classes=5, classifier_channel_mult="1,2",
        )
    ).eval()
    x, t = _inputs()
    for model in (unet, classifier):
        with torch.no_grad():
            expected = model(x, t)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, t)
        assert out.dtype == torch.bfloat16
        assert torch.isfinite(out.float()).all()
        assert (out.float() - expected).abs().max() < 5e-2 * expected.abs().max()


def test_mixed_precision_trainer_fp32_step(tmp_path):
    torch.manual_seed(0)
    model = _perturb(script_util.create_model(**TINY))
    trainer = fp16_util.MixedPrecisionTrainer(model=model)
    before = [p.detach().clone() for p in model.parameters()]
    x, t = _inputs()
    with logger.scoped_configure(dir=str(tmp_path), format_strs=[]):
        trainer.zero_grad()
        trainer.backward((model(x, t) ** 2).mean())
        grads = [p.grad.clone() for p in model.parameters()]
        assert trainer.optimize(torch.optim.SGD(trainer.master_params, lr=0.1))
        logged = dict(logger.getkvs())
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    expected_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert logged["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)


def test_master_param_groups_round_trip():
    model = script_util.create_model(**TINY)
    groups = fp16_util.get_param_groups_and_shapes(model.named_parameters())
    assert all(p.ndim <= 1 for _, p in groups[0][0]) and all(p.ndim > 1 for _, p in groups[1][0])
    master = fp16_util.make_master_params(groups)
    total = sum(p.numel() for p in model.parameters())
    assert master[0].dim() == 1 and master[1].shape[0] == 1
    assert master[0].numel() + master[1].numel() == total

    state = fp16_util.master_params_to_state_dict(model, groups, master, use_fp16=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(state[name], value)
    again = fp16_util.state_dict_to_master_params(model, state, use_fp16=True)
    for a, b in zip(again, master):
        torch.testing.assert_close(a, b)

    original = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        master[1].add_(1.0)
    fp16_util.master_params_to_model_params(groups, master)
    for name, p in groups[1][0]:
        torch.testing.assert_close(p.detach(), original[name] + 1.0)
    for name, p in groups[0][0]:
        torch.testing.assert_close(p.detach(), original[name])


def test_mixed_precision_trainer_fp16_step_and_overflow(tmp_path):
    torch.manual_seed(0)
    model = _perturb(script_util.create_model(**TINY, use_fp16=True))
    trainer = fp16_util.MixedPrecisionTrainer(model=model, use_fp16=True, fp16_scale_growth=0.25)
    assert trainer.lg_loss_scale == fp16_util.INITIAL_LOG_LOSS_SCALE == 20.0
    assert _conv_dtypes(model.input_blocks) == {torch.float16}
    opt = torch.optim.SGD(trainer.master_params, lr=0.01)
    x, t = _inputs()

    with logger.scoped_configure(dir=str(tmp_path), format_strs=[]):
        trainer.zero_grad()
        try:
            trainer.backward((model(x, t) ** 2).mean())
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"float16 kernels unavailable on this CPU build: {err}")
        conv = model.input_blocks[0][0].weight
        assert conv.grad.dtype == torch.float16
        master_before = [m.detach().clone() for m in trainer.master_params]
        assert trainer.optimize(opt)
        assert trainer.lg_loss_scale == 20.25
        # The step happened on the fp32 master copy and was copied back into the model.
        assert any(not torch.equal(a, b) for a, b in zip(master_before, trainer.master_params))
        state = trainer.master_params_to_state_dict(trainer.master_params)
        torch.testing.assert_close(conv.detach(), state["input_blocks.0.0.weight"].half())

        trainer.zero_grad()
        trainer.backward((model(x, t) ** 2).mean())
        conv.grad.view(-1)[0] = float("inf")
        master_before = [m.detach().clone() for m in trainer.master_params]
        assert not trainer.optimize(opt)
        assert trainer.lg_loss_scale == 19.25
        assert all(torch.equal(a, b) for a, b in zip(master_before, trainer.master_params))
        assert all(m.grad is None for m in trainer.master_params)


# ---------------------------------------------------------------- factories


def test_image_size_32_defaults_to_four_levels():
    model = script_util.create_model(32, 32, 1, attention_resolutions="16,8")
    assert model.channel_mult == (1, 2, 2, 2)
    x, t = _inputs(size=32)
    with torch.no_grad():
        assert model(x, t).shape == (2, 3, 32, 32)
    classifier = script_util.create_classifier(32, False, 64, 1, "8", True, True, "attention")
    with torch.no_grad():
        assert classifier(x, t).shape == (2, 1000)


def test_unsupported_size_asks_for_channel_mult():
    with pytest.raises(ValueError, match="pass --channel_mult"):
        script_util.create_model(48, 32, 1)
    model = script_util.create_model(48, 32, 1, channel_mult="1,2", attention_resolutions="24")
    assert model.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        script_util.create_classifier(48, False, 64, 1, "8", True, True, "adaptive")
    with pytest.raises(ValueError, match="channel_mult must be comma-separated"):
        script_util.create_model(32, 32, 1, channel_mult="1,x")


def test_num_classes_reaches_every_factory():
    model = script_util.create_model(**TINY, class_cond=True, num_classes=10)
    assert model.label_emb.weight.shape == (10, 128)
    assert script_util.create_model(**TINY, class_cond=True).label_emb.num_embeddings == 1000
    assert not hasattr(script_util.create_model(**TINY, num_classes=10), "label_emb")

    classifier = script_util.create_classifier(
        32, False, 64, 1, "8", True, True, "adaptive", num_classes=7
    )
    assert classifier.out[3].out_channels == 7

    sr_flags = dict(
        large_size=64, small_size=32, num_channels=32, num_res_blocks=1, learn_sigma=False,
        class_cond=True, use_checkpoint=False, attention_resolutions="8", num_heads=1,
        num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
        resblock_updown=False, use_fp16=False,
    )
    assert script_util.sr_create_model(**sr_flags, num_classes=4).label_emb.num_embeddings == 4

    diffusion_flags = dict(script_util.diffusion_defaults(), diffusion_steps=100)
    flags = dict(script_util.model_and_diffusion_defaults(), **diffusion_flags)
    flags.update(image_size=32, num_channels=32, num_res_blocks=1, class_cond=True)
    model, diffusion = script_util.create_model_and_diffusion(**flags, num_classes=3)
    assert model.label_emb.num_embeddings == 3 and diffusion.num_timesteps == 100

    cflags = dict(script_util.classifier_and_diffusion_defaults(), **diffusion_flags)
    cflags.update(image_size=32, classifier_width=64, classifier_depth=1)
    classifier, _ = script_util.create_classifier_and_diffusion(**cflags, num_classes=3)
    assert classifier.out[2].c_proj.out_channels == 3

    srflags = dict(script_util.sr_model_and_diffusion_defaults(), **diffusion_flags)
    srflags.update(sr_flags)
    model, _ = script_util.sr_create_model_and_diffusion(**srflags, num_classes=5)
    assert model.label_emb.num_embeddings == 5
    with pytest.raises(ValueError, match="num_classes"):
        script_util.create_model(**TINY, class_cond=True, num_classes=0)


def test_label_errors_are_clear():
    x, t = _inputs()
    conditional = script_util.create_model(**TINY, class_cond=True, num_classes=10)
    unconditional = script_util.create_model(**TINY)
    with pytest.raises(ValueError, match="unconditional.*--class_cond True"):
        unconditional(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional.*pass y"):
        conditional(x, t)
    with pytest.raises(ValueError, match=r"\[0, 10\).*--num_classes"):
        conditional(x, t, y=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        conditional(x, t, y=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="shape"):
        conditional(x, t, y=torch.tensor([1]))
    with torch.no_grad():
        assert conditional(x, t, y=torch.tensor([0, 9])).shape == x.shape


def test_super_res_model_upsamples_low_res():
    model = _perturb(
        SuperResModel(
            image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
            attention_resolutions=(), channel_mult=(1, 2),
        )
    ).eval()
    x, t = _inputs()
    low = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, t, low_res=low)
        # The same network fed the concatenation by hand, as a plain UNet.
        plain = UNetModel.forward(
            model, torch.cat([x, F.interpolate(low, (16, 16), mode="bilinear")], 1), t
        )
    torch.testing.assert_close(out, plain)
    with pytest.raises(ValueError, match="low_res"):
        model(x, t)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_pools(pool):
    model = EncoderUNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32, pool=pool,
    ).eval()
    x, t = _inputs()
    with torch.no_grad():
        assert model(x, t).shape == (2, 4)


def test_encoder_pool_errors():
    common = dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
        attention_resolutions=(), channel_mult=(1, 2),
    )
    with pytest.raises(ValueError, match="unknown classifier pool"):
        EncoderUNetModel(**common, pool="max")
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetModel(**common, pool="attention")


def test_create_gaussian_diffusion_maps_flags():
    gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
    make = script_util.create_gaussian_diffusion
    d = make(steps=100)
    assert (d.loss_type, d.model_mean_type, d.model_var_type) == (
        gd.LossType.MSE, gd.ModelMeanType.EPSILON, gd.ModelVarType.FIXED_LARGE,
    )
    assert d.num_timesteps == 100
    d = make(steps=100, learn_sigma=True, rescale_learned_sigmas=True, predict_xstart=True)
    assert (d.loss_type, d.model_mean_type, d.model_var_type) == (
        gd.LossType.RESCALED_MSE, gd.ModelMeanType.START_X, gd.ModelVarType.LEARNED_RANGE,
    )
    d = make(steps=100, use_kl=True, rescale_learned_sigmas=True, sigma_small=True)
    assert (d.loss_type, d.model_var_type) == (gd.LossType.RESCALED_KL, gd.ModelVarType.FIXED_SMALL)
    d = make(steps=100, timestep_respacing="5", noise_schedule="cosine", rescale_timesteps=True)
    assert d.num_timesteps == 5 and d.rescale_timesteps
    assert type(d).__name__ == "SpacedDiffusion"


# ---------------------------------------------------------------- flags


# Flags of each reference script that are not model/diffusion flags (the scripts own them).
SCRIPT_ONLY = {
    "image_sample": {"clip_denoised", "num_samples", "batch_size", "use_ddim", "model_path"},
    "image_nll": {"clip_denoised", "num_samples", "batch_size", "model_path", "data_dir"},
    "image_train": {
        "data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size",
        "microbatch", "ema_rate", "log_interval", "save_interval", "resume_checkpoint",
        "fp16_scale_growth",
    },
    "classifier_train": {
        "data_dir", "val_data_dir", "noised", "iterations", "lr", "weight_decay", "anneal_lr",
        "batch_size", "microbatch", "schedule_sampler", "resume_checkpoint", "log_interval",
        "eval_interval", "save_interval",
    },
    "classifier_sample": {
        "clip_denoised", "num_samples", "batch_size", "use_ddim", "model_path", "classifier_path",
        "classifier_scale",
    },
    "super_res_sample": {
        "clip_denoised", "num_samples", "batch_size", "use_ddim", "base_samples", "model_path",
    },
    "super_res_train": {
        "data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size",
        "microbatch", "ema_rate", "log_interval", "save_interval", "resume_checkpoint",
        "fp16_scale_growth",
    },
}


def _defaults_for(script):
    su = script_util
    return {
        "image_sample": su.model_and_diffusion_defaults(),
        "image_nll": su.model_and_diffusion_defaults(),
        "image_train": su.model_and_diffusion_defaults(),
        "classifier_train": su.classifier_and_diffusion_defaults(),
        "classifier_sample": {**su.model_and_diffusion_defaults(), **su.classifier_defaults()},
        "super_res_sample": su.sr_model_and_diffusion_defaults(),
        "super_res_train": su.sr_model_and_diffusion_defaults(),
    }[script]


def test_defaults_dicts_match_reference_scripts(conformance):
    reference = json.loads((conformance / "defaults.json").read_text())
    assert set(reference) == set(SCRIPT_ONLY)
    for script, flags in reference.items():
        ours = _defaults_for(script)
        assert set(ours) == set(flags) - SCRIPT_ONLY[script], script
        for key, value in ours.items():
            assert value == flags[key] and type(value) is type(flags[key]), (script, key)
    su = script_util
    assert su.diffusion_defaults().items() <= su.model_and_diffusion_defaults().items()
    assert su.classifier_defaults().items() <= su.classifier_and_diffusion_defaults().items()
    assert script_util.NUM_CLASSES == 1000


def test_argparse_helpers():
    assert [script_util.str2bool(v) for v in ("YES", "true", "T", "y", "1")] == [True] * 5
    assert [script_util.str2bool(v) for v in ("no", "False", "f", "N", "0")] == [False] * 5
    with pytest.raises(argparse.ArgumentTypeError, match="boolean"):
        script_util.str2bool("maybe")

    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, dict(a=1, b=0.5, c="x", d=False, e=None))
    args = parser.parse_args(["--a", "3", "--b", "2", "--d", "True", "--e", "hi"])
    assert script_util.args_to_dict(args, ["a", "b", "c", "d", "e"]) == dict(
        a=3, b=2.0, c="x", d=True, e="hi"
    )
    assert isinstance(args.b, float)


def test_mismatch_hints_name_every_flag_at_once(monkeypatch):
    from guided_diffusion.cli import hints
    from guided_diffusion.cli.hints import explain_state_dict_mismatch

    flags = dict(script_util.model_and_diffusion_defaults(), **TINY, num_classes=10)
    build = lambda f: script_util.create_model_and_diffusion(**f)[0]
    # Three searched flags plus two read off tensors (width, learn_sigma) at once.
    trained = dict(flags, num_res_blocks=2, resblock_updown=True, attention_resolutions="16,8",
                   num_channels=64, learn_sigma=True)
    hint = explain_state_dict_mismatch(build(flags), build(trained).state_dict(), flags, build)
    fix = hint.split(" (")[0]
    assert fix.startswith("pass ") and " or pass " not in fix
    changes = dict(zip(fix.split()[1::2], fix.split()[2::2]))
    assert changes == {"--num_channels": "64", "--learn_sigma": "True", "--num_res_blocks": "2",
                       "--resblock_updown": "True", "--attention_resolutions": "16,8"}

    # A classifier's class count is read off its head, whatever the pooling.
    cflags = dict(script_util.classifier_defaults(), image_size=16, classifier_width=32,
                  classifier_depth=1, classifier_channel_mult="1,2",
                  classifier_attention_resolutions="8", num_classes=1000)
    cbuild = lambda f: script_util.create_classifier(**f)
    for pool in ("attention", "adaptive", "spatial_v2"):
        here = dict(cflags, classifier_pool=pool)
        four = cbuild(dict(here, num_classes=4)).state_dict()
        assert explain_state_dict_mismatch(cbuild(here), four).startswith("pass --num_classes 4")
        assert explain_state_dict_mismatch(cbuild(here), four, here, cbuild).startswith(
            "pass --num_classes 4 (")
    other = cbuild(dict(cflags, num_classes=4, classifier_depth=2, classifier_pool="adaptive"))
    hint = explain_state_dict_mismatch(cbuild(cflags), other.state_dict(), cflags, cbuild)
    assert hint.startswith("pass --num_classes 4 --classifier_depth 2 --classifier_pool adaptive (")
    # Beyond what the search can reach (a fifth level), the hint says what to check; the
    # search stops at its time limit (shortened here).
    monkeypatch.setattr(hints, "_SEARCH_SECONDS", 1.0)
    deep = build(dict(flags, channel_mult="1,2,2,2,2", num_res_blocks=3, image_size=32))
    started = time.monotonic()
    hint = explain_state_dict_mismatch(build(flags), deep.state_dict(), flags, build)
    assert "check --num_res_blocks" in hint and time.monotonic() - started < 5


def test_load_model_weights_names_the_flags_to_change():
    from guided_diffusion.cli.weights import load_model_weights

    source = _perturb(script_util.create_model(**TINY, class_cond=True, learn_sigma=True))
    state = source.state_dict()
    cases = [
        (dict(), r"label_emb.weight: pass --class_cond True.*--learn_sigma True"),
        (dict(class_cond=True, learn_sigma=True, num_classes=10), "pass --num_classes 1000"),
        (dict(class_cond=True, learn_sigma=True, num_channels=64), "pass --num_channels 32"),
        (dict(class_cond=True, learn_sigma=True, use_scale_shift_norm=True),
         "pass --use_scale_shift_norm False"),
        (dict(class_cond=True, learn_sigma=True, num_res_blocks=2), "check --num_res_blocks"),
    ]
    for overrides, message in cases:
        target = script_util.create_model(**{**TINY, **overrides})
        with pytest.raises(ValueError, match=message):
            load_model_weights(target, state, "ckpt.pt")

    unconditional = script_util.create_model(**TINY)
    with pytest.raises(ValueError, match="pass --class_cond False"):
        load_model_weights(source, unconditional.state_dict(), "ckpt.pt")
    opt = torch.optim.AdamW(source.parameters())
    with pytest.raises(ValueError, match="optimizer checkpoint"):
        load_model_weights(source, opt.state_dict(), "ckpt.pt")

    target = script_util.create_model(**TINY, class_cond=True, learn_sigma=True)
    load_model_weights(target, state, "ckpt.pt")
    for name, value in target.state_dict().items():
        assert torch.equal(value, state[name])
