"""The fast paths: attention on fused kernels, no host synchronisation in a forward, a training
step or a sampling step, cached diffusion tables, torch.compile, and bf16 with float32 masters."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from guided_diffusion import script_util
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
