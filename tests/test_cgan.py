"""Unit tests of the conditional GAN: networks, losses, optimiser, Parzen estimator, checkpoints."""

import gzip
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.errors import NonFiniteLossError
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from guided_diffusion import logger
from guided_diffusion.cgan import (
    balanced_labels,
    CGANTrainLoop,
    class_grid,
    create_cgan,
    discriminator_loss,
    generate_samples,
    generator_loss,
    is_mnist_dir,
    load_cgan_checkpoint,
    load_generator,
    Maxout,
    MLPDiscriminator,
    MLPGenerator,
    paper_sgd_schedule,
    PaperMomentumSGD,
    parzen_estimate,
    parzen_log_likelihood,
    read_mnist,
    real_to_model_space,
    select_parzen_sigma,
)
from guided_diffusion.runtime.checkpoints import save_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("single_thread")


def _flags(**over):
    flags = dict(arch="mlp", image_size=8, num_classes=10, z_dim=100, conv_channels=8, dropout=0.5)
    flags.update(over)
    return flags


# ---------------------------------------------------------------- networks


def test_mlp_generator_has_the_papers_layers():
    g, _ = create_cgan(**_flags(image_size=28))
    assert isinstance(g, MLPGenerator)
    assert (g.z_layer.in_features, g.z_layer.out_features) == (100, 200)
    assert (g.y_layer.in_features, g.y_layer.out_features) == (10, 1000)
    assert (g.joint.in_features, g.joint.out_features) == (1200, 1200)
    assert (g.out.in_features, g.out.out_features) == (1200, 784)
    assert g.dropout.p == 0.5
    out = g.eval()(torch.rand(5, 100), torch.arange(5))
    assert out.shape == (5, 784)
    assert out.min() > 0 and out.max() < 1  # sigmoid pixels


def test_mlp_discriminator_has_the_papers_maxout_layers():
    _, d = create_cgan(**_flags(image_size=28))
    assert isinstance(d, MLPDiscriminator)
    assert (d.x_layer.units, d.x_layer.pieces, d.x_layer.linear.in_features) == (240, 5, 784)
    assert (d.y_layer.units, d.y_layer.pieces, d.y_layer.linear.in_features) == (50, 5, 10)
    assert (d.joint.units, d.joint.pieces, d.joint.linear.in_features) == (240, 4, 290)
    assert d.out.out_features == 1 and d.dropout.p == 0.5
    assert d(torch.rand(3, 784), torch.tensor([0, 4, 9])).shape == (3,)


def test_maxout_takes_the_max_over_each_units_pieces():
    torch.manual_seed(0)
    layer = Maxout(in_features=4, units=3, pieces=2)
    x = torch.randn(5, 4)
    pre = x @ layer.linear.weight.T + layer.linear.bias
    expected = torch.stack([torch.maximum(pre[:, 2 * u], pre[:, 2 * u + 1]) for u in range(3)], 1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_conv_networks_shapes_and_range(size):
    g, d = create_cgan(**_flags(arch="conv", image_size=size))
    out = g.eval()(torch.rand(2, 100), torch.tensor([1, 7]))
    assert out.shape == (2, 3, size, size)
    assert out.abs().max() <= 1
    assert d.eval()(out, torch.tensor([1, 7])).shape == (2,)


def test_both_conv_networks_depend_on_the_label():
    torch.manual_seed(0)
    g, d = create_cgan(**_flags(arch="conv", image_size=16))
    g.eval(), d.eval()
    z = torch.rand(1, 100).repeat(2, 1)
    y = torch.tensor([2, 5])
    out = g(z, y)
    assert not torch.allclose(out[0], out[1])
    x = out[:1].repeat(2, 1, 1, 1)
    logits = d(x, y)
    assert logits[0] != logits[1]


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(arch="resnet"), "--arch"),
        (dict(arch="conv", image_size=28), "16, 32 or 64"),
        (dict(dropout=1.0), "--dropout"),
    ],
)
def test_bad_flags_give_clear_errors(over, message):
    with pytest.raises(ValueError, match=message):
        create_cgan(**_flags(**over))


def test_out_of_range_labels_name_num_classes():
    g, _ = create_cgan(**_flags())
    with pytest.raises(ValueError, match="--num_classes"):
        g(torch.rand(1, 100), torch.tensor([10]))


def test_mlp_real_images_become_grayscale_vectors_in_unit_range():
    images = torch.full((2, 3, 8, 8), -1.0)  # black
    images[1, 0] = 1.0  # pure red: luma 0.299
    flat = real_to_model_space("mlp", images)
    assert flat.shape == (2, 64)
    torch.testing.assert_close(flat[0], torch.zeros(64))
    torch.testing.assert_close(flat[1], torch.full((64,), (0.299 * 1 + 0.701 * -1 + 1) / 2))


# ---------------------------------------------------------------- losses and optimiser


def test_losses_match_the_value_function():
    # At logit 0 the discriminator says 1/2: each term is log 2.
    at_half = discriminator_loss(torch.zeros(4), torch.zeros(4)).item()
    assert at_half == pytest.approx(2 * math.log(2))
    real, fake = torch.tensor([2.0]), torch.tensor([-1.0])
    sig = lambda v: 1 / (1 + math.exp(-v))
    expected = -math.log(sig(2.0)) - math.log(1 - sig(-1.0))
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(-math.log(sig(-1.0)), rel=1e-6)


def test_paper_schedule():
    kw = dict(
        lr=0.1, lr_decay=1.00004, min_lr=1e-6, momentum=0.5, final_momentum=0.7, saturate_steps=1000
    )
    assert paper_sgd_schedule(0, **kw) == pytest.approx((0.1, 0.5))
    lr, mom = paper_sgd_schedule(500, **kw)
    assert lr == pytest.approx(0.1 / 1.00004**500) and mom == pytest.approx(0.6)
    assert paper_sgd_schedule(10**9, **kw) == pytest.approx((1e-6, 0.7))


def test_paper_momentum_sgd_follows_the_classical_rule():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = PaperMomentumSGD([p], lr=0.1, momentum=0.5)
    # loss = p^2 / 2 so grad = p. v1 = -0.1 * 1 = -0.1 -> p = 0.9.
    (p * p / 2).sum().backward()
    opt.step()
    assert p.item() == pytest.approx(0.9)
    # lr changes to 0.2: v2 = 0.5 * -0.1 - 0.2 * 0.9 = -0.23 -> p = 0.67.
    opt.param_groups[0]["lr"] = 0.2
    opt.zero_grad()
    (p * p / 2).sum().backward()
    opt.step()
    assert p.item() == pytest.approx(0.67)


# ---------------------------------------------------------------- Parzen window


def test_parzen_matches_a_scipy_gaussian_mixture():
    rng = np.random.RandomState(0)
    samples, points = rng.rand(30, 5), rng.rand(7, 5)
    for sigma in (0.05, 0.3, 1.0):
        comps = np.stack(
            [multivariate_normal(mean=m, cov=sigma**2 * np.eye(5)).logpdf(points) for m in samples]
        )
        expected = logsumexp(comps, axis=0) - math.log(len(samples))
        ours = parzen_log_likelihood(samples, points, sigma, batch_size=3)
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)


def test_parzen_width_is_chosen_on_validation_data():
    # Data drawn around the kernel centres with spread 0.1 must pick a width near 0.1.
    rng = np.random.RandomState(1)
    centres = rng.rand(200, 4)

    def draw(n):
        return centres[rng.randint(0, 200, n)] + 0.1 * rng.randn(n, 4)

    sigmas = np.logspace(-2, 0, 9)
    best, curve = select_parzen_sigma(centres, draw(500), sigmas)
    assert 0.05 < best < 0.2
    assert curve.argmax() == list(sigmas).index(best)
    valid, test = draw(500), draw(400)
    result = parzen_estimate(centres, valid, test, sigmas)
    assert result["sigma"] == select_parzen_sigma(centres, valid, sigmas)[0]
    ll = parzen_log_likelihood(centres, test, result["sigma"])
    # Reported as mean and standard error over the test points.
    assert result["mean"] == pytest.approx(ll.mean())
    assert result["stderr"] == pytest.approx(ll.std() / math.sqrt(400))


def test_parzen_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="image size"):
        parzen_log_likelihood(np.zeros((3, 64)), np.zeros((2, 784)), 0.1)


# ---------------------------------------------------------------- MNIST files


def _write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_are_read_into_the_papers_split(tmp_path, monkeypatch):
    import guided_diffusion.cgan.data as cgan_data

    monkeypatch.setattr(cgan_data, "MNIST_TRAIN_SIZE", 4)  # 4 train + 2 valid of 6
    rng = np.random.RandomState(0)
    train_x, test_x = rng.randint(0, 256, (6, 28, 28)), rng.randint(0, 256, (3, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x, 2051)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6), 2049)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x, 2051)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 8, 9]), 2049)
    assert is_mnist_dir(str(tmp_path))
    split = read_mnist(str(tmp_path))
    np.testing.assert_array_equal(split["train"][0][..., 0], train_x[:4])
    np.testing.assert_array_equal(split["valid"][1], [4, 5])
    np.testing.assert_array_equal(split["test"][0][..., 0], test_x)
    np.testing.assert_array_equal(split["test"][1], [7, 8, 9])
    # Labels file given where images are expected: the magic number says so.
    shutil.copy(tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match="magic"):
        read_mnist(str(tmp_path))


# ---------------------------------------------------------------- training loop and checkpoints


def _fixed_batches(count, size=8, batch=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch, 3, size, size, generator=gen) * 2 - 1,
            {"y": torch.randint(0, 10, (batch,), generator=gen)},
        )
        for _ in range(count)
    ]


def _loop(tmp_path, data, max_steps, optimizer="adam", resume="", **flag_over):
    flags = _flags(**flag_over)
    g, d = create_cgan(**flags)
    return CGANTrainLoop(
        generator=g,
        discriminator=d,
        data=iter(data),
        arch=flags["arch"],
        batch_size=10,
        optimizer=optimizer,
        ema_rate=0.9,
        iterations=max_steps,
        log_interval=100,
        save_interval=3,
        resume_checkpoint=resume,
        model_flags=flags,
    )


@pytest.fixture
def logdir(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    yield tmp_path
    logger.reset()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_continues_step_optimisers_and_ema_exactly(logdir, optimizer):
    batches = _fixed_batches(5)
    torch.manual_seed(0)
    straight = _loop(logdir / "a", batches, 5, optimizer)
    (logdir / "a").mkdir()
    logger.configure(dir=str(logdir / "a"), format_strs=["csv"])
    straight.run_loop()

    logger.configure(dir=str(logdir / "b"), format_strs=["csv"])
    torch.manual_seed(0)
    first = _loop(logdir / "b", batches, 3, optimizer)
    first.run_loop()
    assert sorted(os.listdir(logdir / "b")).count("cgan000003.pt") == 1
    rng = torch.get_rng_state()
    torch.manual_seed(123)  # different initial weights: everything must come from the file
    resumed = _loop(logdir / "b", batches[3:], 5, optimizer, resume="auto")
    torch.set_rng_state(rng)
    assert resumed.step == 3
    resumed.run_loop()
    assert resumed.step == 5
    for a, b in [
        (straight.generator, resumed.generator),
        (straight.discriminator, resumed.discriminator),
        (straight.ema, resumed.ema),
    ]:
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(pa, pb, msg=name)
    ckpt = load_cgan_checkpoint(logdir / "b" / "cgan000005.pt")
    assert ckpt["step"] == 5 and ckpt["flags"]["image_size"] == 8
    state = ckpt["opt_g"]["state"]
    tensors = [t for s in state.values() for t in s.values() if torch.is_tensor(t)]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_mismatched_checkpoint_flags_give_one_clear_error(logdir):
    torch.manual_seed(0)
    _loop(logdir, _fixed_batches(3), 3).run_loop()
    path = logdir / "cgan000003.pt"
    expected = r"trained with --image_size 8 \(got --image_size 16\): pass --image_size 8"
    with pytest.raises(ValueError, match=expected):
        load_generator(path, _flags(image_size=16))
    with pytest.raises(ValueError, match="--arch mlp"):
        _loop(logdir, _fixed_batches(1), 4, resume=str(path), arch="conv", image_size=16)
    with pytest.raises(ValueError, match="--optimizer adam"):
        _loop(logdir, _fixed_batches(1), 4, optimizer="sgd", resume=str(path))
    # A plain state dict (e.g. a diffusion model) is not taken for a cGAN checkpoint.
    save_atomic({"weight": torch.zeros(1)}, logdir / "model000000.pt")
    with pytest.raises(ValueError, match="not a cGAN checkpoint"):
        load_generator(logdir / "model000000.pt", _flags())
    with pytest.raises(FileNotFoundError):
        _loop(logdir, _fixed_batches(1), 4, resume=str(logdir / "missing.pt"))


def test_ema_is_updated_after_each_step(logdir):
    torch.manual_seed(0)
    batches = _fixed_batches(2)
    loop = _loop(logdir, batches, 2)
    ema = {k: v.clone() for k, v in loop.generator.state_dict().items()}  # starts as a copy
    for images, cond in batches:
        loop.run_step(images, cond["y"])
        live = loop.generator.state_dict()
        ema = {k: 0.9 * ema[k] + 0.1 * live[k] for k in ema}
        assert any(not torch.equal(ema[k], live[k]) for k in ema)
        for name, value in loop.ema.state_dict().items():
            torch.testing.assert_close(value, ema[name], msg=name)


def test_non_finite_loss_is_reported(logdir):
    torch.manual_seed(0)
    batches = _fixed_batches(1)
    batches[0][0][:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        _loop(logdir, batches, 1).run_loop()


# ---------------------------------------------------------------- sampling


def test_balanced_labels_and_class_grid():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert balanced_labels(3, 5, class_label=4).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="--class_label"):
        balanced_labels(3, 5, class_label=5)
    images = torch.arange(7).view(7, 1, 1, 1).to(torch.uint8)
    grid, per_row = class_grid(images, balanced_labels(7, 3), per_class=5)
    assert per_row == 2
    assert grid.flatten().tolist() == [0, 3, 1, 4, 2, 5]  # row c holds class c


def test_generate_samples_honours_the_requested_classes():
    torch.manual_seed(0)
    g, _ = create_cgan(**_flags())
    images, labels = generate_samples(g.eval(), num_samples=25, num_classes=10, batch_size=10)
    assert images.shape == (25, 3, 8, 8) and labels.tolist() == [i % 10 for i in range(25)]
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images[:, 0], images[:, 2])  # grayscale replicated to RGB
    _, labels = generate_samples(g, num_samples=4, num_classes=10, class_label=3)
    assert labels.tolist() == [3, 3, 3, 3]


# ---------------------------------------------------------------- scripts


def _run(script, *args, env_dir):
    env = dict(os.environ, OPENAI_LOGDIR=str(env_dir), OMP_NUM_THREADS="1")
    # The scripts import the package from the checkout even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sample_script_writes_npz_and_one_grid_row_per_class(logdir, tmp_path):
    torch.manual_seed(0)
    _loop(logdir, _fixed_batches(3), 3).run_loop()
    ckpt = str(logdir / "cgan000003.pt")
    out = tmp_path / "samples"
    res = _run(
        "cgan_sample.py", "--model_path", ckpt, "--image_size", "8", "--num_samples", "30",
        "--batch_size", "16", "--grid_per_class", "2", "--save_images", "True", env_dir=out,
    )
    assert res.returncode == 0, res.stderr
    with np.load(out / "samples_30x8x8x3.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (30, 8, 8, 3)
        assert data["arr_1"].tolist() == [i % 10 for i in range(30)]
        # --save_images: one PNG per sample named <index>_<label>.png, the npz's pixels.
        names = sorted(os.listdir(out / "samples_30x8x8x3"))
        assert len(names) == 30
        for name in names:
            index, label = (int(part) for part in name[:-len(".png")].split("_"))
            assert label == data["arr_1"][index]
            with Image.open(out / "samples_30x8x8x3" / name) as png:
                assert np.array_equal(np.asarray(png.convert("RGB")), data["arr_0"][index])
    from guided_diffusion.sampling.files import grid_scale

    with Image.open(out / "samples_30x8x8x3.png") as grid:
        # 10 rows (one per class) of 2 images, 8 pixels each magnified k times (the grid's
        # narrow side at least 256 pixels) plus 2-pixel padding.
        k = grid_scale(8, 8, 10, 2, 2)
        assert k == 16 and grid.size == (2 * (8 * k + 2) + 2, 10 * (8 * k + 2) + 2)



def test_sample_and_eval_scripts_take_the_network_flags_from_the_checkpoint(logdir, tmp_path):
    torch.manual_seed(0)
    _loop(logdir, _fixed_batches(3), 3).run_loop()  # an 8x8 MLP; the default --image_size is 28
    ckpt = str(logdir / "cgan000003.pt")
    out = tmp_path / "samples"
    res = _run("cgan_sample.py", "--model_path", ckpt, "--num_samples", "10", "--log_dir", out,
               "--conv_channels", "99", env_dir=tmp_path / "unused")  # conv_channels: no convs
    assert res.returncode == 0, res.stderr
    # 8x8 samples in --log_dir (not in $OPENAI_LOGDIR): the checkpoint's flags were used.
    assert {"log.txt", "samples_10x8x8x3.npz", "samples_10x8x8x3.png"} <= set(os.listdir(out))
    assert not (tmp_path / "unused").exists()

    # A flag that contradicts the checkpoint: exit status 2, one line naming its value, and
    # no folder made.
    for script in ("cgan_sample.py", "cgan_eval.py"):
        refused = tmp_path / f"refused_{script}"
        extra = ["--data_dir", str(tmp_path)] if script == "cgan_eval.py" else []
        res = _run(script, "--model_path", ckpt, "--image_size", "28", "--z_dim", "100", *extra,
                   "--log_dir", refused, env_dir=refused)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"error: checkpoint {ckpt} was trained with --image_size 8, not --image_size 28: "
            "drop these flags (the checkpoint's own values are used) or pass another checkpoint"
        ]
        assert not refused.exists()
    res = _run("cgan_eval.py", "--model_path", ckpt, "--sample_path", ckpt, env_dir=tmp_path / "x")
    assert res.returncode == 2 and "exactly one of --model_path" in res.stderr

def test_keep_dropout_samples_with_dropout_and_restores_the_mode():
    torch.manual_seed(0)
    g, _ = create_cgan(**_flags())
    g.eval()
    torch.manual_seed(3)
    plain, _ = generate_samples(g, num_samples=10, num_classes=10)
    torch.manual_seed(3)
    z = torch.rand(10, 100)
    with torch.no_grad():
        direct = g.to_images(g(z, torch.arange(10)))
    torch.testing.assert_close(plain, direct)  # eval mode: z and y alone decide the image
    torch.manual_seed(3)
    noisy, _ = generate_samples(g, num_samples=10, num_classes=10, keep_dropout=True)
    assert not torch.allclose(noisy, plain)
    assert not g.training and not g.dropout.training
