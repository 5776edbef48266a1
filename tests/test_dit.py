"""
The DiT network (guided_diffusion/dit.py) against its oracles: the official facebookresearch/DiT
code (state-dict manifest, forward outputs and initial weights, in tests/data/dit, made by
tests/data/dit/make_fixtures.py), the paper's numbers (Peebles & Xie 2023, Tables 1 and 4, section
3.2), and formulas written out here.
"""

import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import _dit_cases
from guided_diffusion import fp16_util, logger
from guided_diffusion.dit import DIT_SIZES, DiT, dit_model
from test_fast_paths import trap_host_reads

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = pathlib.Path(__file__).resolve().parent / "data" / "dit"
EPS32 = torch.finfo(torch.float32).eps

# The paper's Table 1: depth, hidden width, heads of each model size; every size comes with
# patch sides 2, 4 and 8.
PAPER_TABLE_1 = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# The paper's parameter counts in millions at 256 pixels, patch 2 (its Table 4).
PAPER_MILLIONS = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((DATA / "official_manifest.json").read_text())["models"]


@pytest.fixture(scope="module")
def official():
    with np.load(DATA / "official_forward.npz") as arrays:
        outputs = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    return outputs, json.loads((DATA / "official_forward.json").read_text())


def _meta_model(entry):
    """Our model for a manifest entry, on the meta device (no memory, no values)."""
    kwargs = dict(entry["kwargs"])
    with torch.device("meta"):
        return dit_model(entry["model"], image_size=kwargs.pop("input_size"), **kwargs)


def _case_model(case, **overrides):
    """A case's model with the recipe's random weights (pos_embed: ours)."""
    model = DiT(**{**_dit_cases.CASES[case]["config"], **overrides}).eval()
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    weights = _dit_cases.random_weights(shapes, _dit_cases.CASES[case]["seed"])
    missing, unexpected = model.load_state_dict(
        {key: torch.from_numpy(value) for key, value in weights.items()}, strict=False)
    assert missing == [_dit_cases.POS_EMBED] and not unexpected
    return model


def _case_inputs(case):
    x, t, y = _dit_cases.inputs(case)
    return torch.from_numpy(x), torch.from_numpy(t), None if y is None else torch.from_numpy(y)


def _float32_tolerance(model, reference):
    """
    Two float32 evaluations of the same network that differ only in summation order (BLAS
    blocking, vector width, attention kernel): each of the depth + 2 stages (embeddings, blocks,
    decoder) rounds its reductions to a few eps of their magnitude, so allow 8 eps per stage of
    the output's scale. (A float64 evaluation puts the float32 rounding of these cases at about
    10 eps of the output's scale in total.)
    """
    return 8 * EPS32 * (model.depth + 2) * float(reference.abs().max())


# ---------------------------------------------------------------------------- sizes and manifest


def test_the_twelve_named_sizes_are_the_papers():
    expected = {f"DiT-{name}/{patch}": (*row, patch)
                for name, row in PAPER_TABLE_1.items() for patch in (2, 4, 8)}
    assert {name: tuple(size) for name, size in DIT_SIZES.items()} == expected
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_model("DiT-M/2", image_size=32, in_channels=4)


@pytest.mark.parametrize("label", [
    "DiT-S/2@256", "DiT-S/4@256", "DiT-S/8@256", "DiT-B/2@256", "DiT-B/4@256", "DiT-B/8@256",
    "DiT-L/2@256", "DiT-L/4@256", "DiT-L/8@256", "DiT-XL/2@256", "DiT-XL/4@256", "DiT-XL/8@256",
    "DiT-XL/2@512", "DiT-S/8@256,no-null-class",
])
def test_state_dict_has_the_official_keys_shapes_and_parameter_counts(manifest, label):
    entry = manifest[label]
    model = _meta_model(entry)
    state = model.state_dict()
    assert [[key, list(value.shape)] for key, value in state.items()] == entry["state_dict"]
    # The official count includes the fixed positions (their frozen Parameter, our buffer).
    assert sum(v.numel() for v in state.values()) == entry["parameters"]
    assert sum(p.numel() for p in model.parameters()) == entry["trainable_parameters"]
    assert all(p.requires_grad for p in model.parameters())
    # The manifest is also read for the sizes: blocks, width and patch side.
    depth, width, _, patch = DIT_SIZES[entry["model"]]
    shapes = dict(entry["state_dict"])
    assert f"blocks.{depth - 1}.attn.qkv.weight" in shapes and f"blocks.{depth}.mlp.fc1.bias" not in shapes
    assert shapes["x_embedder.proj.weight"] == [width, 4, patch, patch]
    # The null-class row exactly when class_dropout_prob > 0.
    assert shapes["y_embedder.embedding_table.weight"] == [
        1000 + (entry["kwargs"]["class_dropout_prob"] > 0), width]


@pytest.mark.parametrize("label", ["DiT-XL/2@256", "DiT-XL/2@512"])
def test_the_released_checkpoints_load_strict(manifest, label):
    """DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt hold exactly the official state dict: a
    checkpoint with its keys and shapes (meta tensors: no file, no memory) loads with strict."""
    model = _meta_model(manifest[label])
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in manifest[label]["state_dict"]}
    model.load_state_dict(checkpoint, strict=True)
    # and strict means strict: a missing or misshapen entry is refused.
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in checkpoint.items() if k != "pos_embed"})
    checkpoint["final_layer.linear.weight"] = torch.empty(16, 1152, device="meta")
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(checkpoint)


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_parameter_counts_are_the_papers(name):
    with torch.device("meta"):
        model = dit_model(name, image_size=32, in_channels=4, num_classes=1000,
                          class_dropout_prob=0.1, learn_sigma=True)
    # The paper counts the learned weights: the fixed positions (0.2M for DiT-B/2) would round
    # DiT-B/2's 130.3M to 131M.
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == PAPER_MILLIONS[name]


# ---------------------------------------------------------------------------- the official outputs


@pytest.mark.parametrize("case", list(_dit_cases.CASES))
def test_outputs_equal_the_official_models_for_the_same_weights(official, case):
    outputs, info = official
    x, t, y = _case_inputs(case)
    assert float(x.double().sum()) == pytest.approx(info["x_sums"][case], rel=1e-12)  # same inputs
    model = _case_model(case)
    with torch.no_grad():
        out = model(x, t, y)
    reference = outputs[f"{case}/out"]
    config = _dit_cases.CASES[case]["config"]
    channels = config["in_channels"] * (2 if config["learn_sigma"] else 1)
    assert out.shape == reference.shape == (len(t), channels, *x.shape[2:])
    assert reference.abs().max() > 0.5  # random weights: no zero layer hides a difference
    torch.testing.assert_close(out, reference, rtol=0, atol=_float32_tolerance(model, reference))


def test_positions_equal_the_official_and_the_formula(official):
    outputs, _ = official
    for case in ("tiny", "pixel_rgb_unconditional", "pixel_grey_5_classes"):
        config = _dit_cases.CASES[case]["config"]
        model = DiT(**config)
        # The official buffer, from the same double-precision formula, rounded once.
        torch.testing.assert_close(model.pos_embed[0], outputs[f"{case}/pos_embed"], rtol=0,
                                   atol=EPS32)
        side = config["image_size"] // config["patch_size"]
        assert torch.equal(model.pos_embed[0], _positions(side, side, config["hidden_size"]))


def _positions(rows, cols, dim):
    """The 2-D sin-cos positions written out element by element: channel k < dim/4 of the first
    half is sin(col * w_k), then cos(col * w_k); the second half does the same for the row;
    w_k = 10000 ** (-k / (dim / 4)); token r * cols + c."""
    quarter = dim // 4
    table = np.zeros((rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            for half, pos in enumerate((c, r)):
                for k in range(quarter):
                    angle = pos * 10000.0 ** (-k / quarter)
                    table[r * cols + c, half * 2 * quarter + k] = math.sin(angle)
                    table[r * cols + c, half * 2 * quarter + quarter + k] = math.cos(angle)
    return torch.from_numpy(table).float()


def test_same_seed_gives_the_official_initial_weights(official):
    """With torch.manual_seed(s), the official module creates and initialises its weights in an
    order this port keeps, so a fresh model is the official fresh model, weight for weight."""
    _, info = official
    torch.manual_seed(0)
    model = DiT(**_dit_cases.CASES["tiny"]["config"])
    expected = info["tiny_init_seed0"]
    assert list(model.state_dict()) == list(expected)
    for key, value in model.state_dict().items():
        assert value.flatten()[:4].tolist() == expected[key]["first"], key
        assert float(value.double().sum()) == expected[key]["sum"], key
        assert float(value.double().square().sum()) == expected[key]["sum_sq"], key


# ---------------------------------------------------------------------------- adaLN-Zero init


def test_adaln_zero_initialisation():
    torch.manual_seed(0)
    model = DiT(image_size=16, in_channels=4, hidden_size=128, depth=2, num_heads=4, patch_size=2,
                num_classes=10, class_dropout_prob=0.1, learn_sigma=True)
    zeros = [block.adaLN_modulation[-1] for block in model.blocks]
    zeros += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    for layer in zeros:
        assert not layer.weight.any() and not layer.bias.any()
    # A fresh model is exactly zero: every block is the identity, the decoder outputs zeros.
    x = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 10, 9]))
    assert out.shape == (3, 8, 16, 16) and not out.any()

    def xavier_bound(fan_in, fan_out):
        return math.sqrt(6 / (fan_in + fan_out))

    for block in model.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            fan_out, fan_in = layer.weight.shape
            _assert_uniform(layer.weight, xavier_bound(fan_in, fan_out))
            assert not layer.bias.any()
    # The patch projection like a linear layer over its C * p * p inputs: a conv's Xavier would
    # count fan_out = D * p * p and draw from a narrower range.
    proj = model.x_embedder.proj.weight
    _assert_uniform(proj, xavier_bound(4 * 2 * 2, 128))
    assert proj.abs().max() > xavier_bound(4 * 2 * 2, 128 * 2 * 2)
    assert not model.x_embedder.proj.bias.any()
    for weight in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight,
                   model.t_embedder.mlp[2].weight):
        assert abs(weight.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * weight.numel())
        assert abs(weight.mean().item()) < 5 * 0.02 / math.sqrt(weight.numel())
    assert not model.t_embedder.mlp[0].bias.any() and not model.t_embedder.mlp[2].bias.any()


def _assert_uniform(weight, bound):
    """Inside [-bound, bound], with the uniform's std bound / sqrt(3) (5 standard errors)."""
    assert weight.abs().max() <= bound
    n = weight.numel()
    # The sample std of a uniform has standard error ~ sigma * sqrt(0.2 / n) (kurtosis 1.8).
    sigma = bound / math.sqrt(3)
    assert abs(weight.std().item() - sigma) < 5 * sigma * math.sqrt(0.2 / n)


# ---------------------------------------------------------------------------- pixel space, shapes


def test_labels_null_row_and_unconditional_models():
    kwargs = dict(image_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, patch_size=4)
    assert DiT(**kwargs, num_classes=7).y_embedder.embedding_table.num_embeddings == 7
    with_null = DiT(**kwargs, num_classes=7, class_dropout_prob=0.1)
    assert with_null.y_embedder.embedding_table.num_embeddings == 8
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert with_null(x, t, torch.tensor([7, 0])).shape == (2, 3, 8, 8)  # 7: the null class
    with pytest.raises(ValueError, match="num_classes"):
        DiT(**kwargs, num_classes=7)(x, t, torch.tensor([7, 0]))
    with pytest.raises(ValueError, match="pass y"):
        with_null(x, t)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        with_null(x, t, torch.tensor([1]))

    unconditional = DiT(**kwargs)
    assert not any(key.startswith("y_embedder") for key in unconditional.state_dict())
    assert unconditional(x, t).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_cond"):
        DiT(**kwargs, class_dropout_prob=0.1)


def test_configuration_and_input_errors_name_the_numbers():
    kwargs = dict(in_channels=3, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="divisible by it, got 12x12"):
        DiT(image_size=12, patch_size=8, **kwargs)
    with pytest.raises(ValueError, match="by its 3 heads"):
        DiT(image_size=8, patch_size=2, **{**kwargs, "num_heads": 3})
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(image_size=8, patch_size=2, **{**kwargs, "hidden_size": 34})
    model = DiT(image_size=8, patch_size=2, **kwargs)
    with pytest.raises(ValueError, match=r"\[N x 3 x 8 x 8\].*\(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1]))


def test_rectangles_patch_and_unpatchify_in_row_major_order():
    torch.manual_seed(0)
    p, rows, cols = 2, 3, 5
    model = DiT(image_size=(p * rows, p * cols), in_channels=1, hidden_size=16, depth=0,
                num_heads=2, patch_size=p, learn_sigma=True)
    assert torch.equal(model.pos_embed[0], _positions(rows, cols, 16))
    # Unpatchify written out: token r * cols + c holds its patch as (row a, column b, channel ch).
    tokens = torch.randn(2, rows * cols, p * p * 2)
    image = model.unpatchify(tokens)
    assert image.shape == (2, 2, p * rows, p * cols)
    for r, c, a, b, ch in np.ndindex(rows, cols, p, p, 2):
        assert image[1, ch, r * p + a, c * p + b] == tokens[1, r * cols + c, (a * p + b) * 2 + ch]
    # Without blocks the network is token-wise: a pixel changes its own output patch only.
    for param in model.parameters():
        nn.init.normal_(param, std=0.3)
    x, t = torch.randn(1, 1, p * rows, p * cols), torch.tensor([10])
    with torch.no_grad():
        moved = model(x.index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([3]),
                                   torch.tensor([7])), torch.tensor(5.0)), t) != model(x, t)
    changed = moved.any(dim=1)[0].nonzero().tolist()
    assert changed and all(r // p == 1 and c // p == 3 for r, c in changed)


# ---------------------------------------------------------------------------- fast paths, precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_runs_on_the_fused_kernel_forward_and_backward(dtype):
    model = _case_model("tiny").train()
    if dtype == torch.bfloat16:
        model.convert_to_bf16()
    x, t, y = _case_inputs("tiny")

    def loss_and_grads():
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.detach().float().clone() for p in model.parameters()]

    # Without the math kernel, an attention call a fused kernel cannot take raises.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION]):
        fused_out, fused_grads = loss_and_grads()
    with sdpa_kernel([SDPBackend.MATH]):
        math_out, math_grads = loss_and_grads()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(fused_out, math_out, **tol)
    for a, b in zip(fused_grads, math_grads):
        torch.testing.assert_close(a, b, **{k: v * 10 for k, v in tol.items()})


def test_forward_reads_no_tensor_on_the_host():
    model = _case_model("tiny")
    x, t, y = _case_inputs("tiny")
    model(x, t, y)  # warm-up: fills the timestep-frequency cache
    with trap_host_reads():
        with torch.no_grad():
            model(x, t, y)
        model(x, t, y).sum().backward()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_torso(precision):
    reference = _case_model("tiny")
    half = _case_model("tiny", use_fp16=precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    x, t, y = _case_inputs("tiny")
    with torch.no_grad():  # built with use_fp16, it computes in float32 until converted
        torch.testing.assert_close(half(x, t, y), reference(x, t, y), rtol=0, atol=0)
    getattr(half, f"convert_to_{precision}")()
    assert half.dtype == dtype
    torso = [half.x_embedder] + [part for b in half.blocks for part in (b.attn, b.mlp)]
    assert {p.dtype for part in torso for p in part.parameters()} == {dtype}
    # The conditioning path and the decoder stay float32, as the UNet's embeddings and output.
    rest = [half.t_embedder, half.y_embedder, half.final_layer] + [b.adaLN_modulation for b in half.blocks]
    assert {p.dtype for part in rest for p in part.parameters()} == {torch.float32}
    assert half.pos_embed.dtype == torch.float32
    with torch.no_grad():
        expected = reference(x, t, y)
        try:
            out = half(x, t, y)
        except (RuntimeError, NotImplementedError) as err:  # CPU builds without fp16 kernels
            pytest.skip(f"{dtype} kernels unavailable on this CPU build: {err}")
    # A 16-bit torso rounds to its unit roundoff u (2**-11 for fp16, 2**-8 for bf16) at every
    # step; the float32 decoder and conditioning add nothing of that size. Allow 16 u of the
    # output's scale.
    assert out.dtype == torch.float32
    unit_roundoff = {"fp16": 2.0**-11, "bf16": 2.0**-8}[precision]
    assert (out - expected).abs().max() < 16 * unit_roundoff * expected.abs().max()
    # Back in float32, it computes what a float32 model with the rounded torso weights does.
    half.convert_to_fp32()
    assert half.dtype == torch.float32 and {p.dtype for p in half.parameters()} == {torch.float32}
    with torch.no_grad():
        for part in [reference.x_embedder] + [m for b in reference.blocks for m in (b.attn, b.mlp)]:
            for param in part.parameters():
                param.copy_(param.to(dtype))
        torch.testing.assert_close(half(x, t, y), reference(x, t, y), rtol=0, atol=0)


def test_mixed_precision_trainer_drives_a_bf16_dit(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])
    model = _case_model("tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fp16_util.MixedPrecisionTrainer(model=model, use_bf16=True)
    # The fixed positions are a buffer: no master copy, no optimizer state, never updated.
    assert sum(m.numel() for m in trainer.master_params) == sum(p.numel() for p in model.parameters())
    opt = fp16_util.make_adamw(trainer.master_params, lr=1e-3)
    x, t, y = _case_inputs("tiny")
    trainer.zero_grad()
    trainer.backward(model(x, t, y).square().mean())
    assert bool(trainer.optimize_no_sync(opt))
    after = model.state_dict()
    assert torch.equal(after["pos_embed"], before["pos_embed"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"].float(), before["blocks.0.attn.qkv.weight"])
    saved = trainer.master_params_to_state_dict(trainer.master_params)
    assert set(saved) == set(before) and saved["blocks.0.mlp.fc1.weight"].dtype == torch.float32


def test_gradient_checkpointing_gives_equal_gradients():
    plain, checkpointed = _case_model("tiny").train(), _case_model("tiny", use_checkpoint=True).train()
    x, t, y = _case_inputs("tiny")
    grads = []
    for model in (plain, checkpointed):
        model(x, t, y).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_outputs_equal_the_official_models(official):
    from test_cuda import _tf32_off

    outputs, _ = official
    for case in ("tiny", "DiT-S/2"):
        model = _case_model(case).cuda()
        x, t, y = (v.cuda() if v is not None else None for v in _case_inputs(case))
        with _tf32_off(), torch.no_grad():
            out = model(x, t, y).cpu()
        reference = outputs[f"{case}/out"]
        torch.testing.assert_close(out, reference, rtol=0, atol=_float32_tolerance(model, reference))
        model.convert_to_fp16()
        with torch.no_grad():
            half = model(x, t, y).cpu()
        assert (half - reference).abs().max() < 2e-2 * reference.abs().max()
