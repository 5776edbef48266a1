"""
Short cGAN training runs on the embedded digits (8x8): the requested class must be recognisable
by a classifier trained on real digits, the Parzen estimate must improve, and the same run with
shuffled labels (a broken conditioning path) must fail the class threshold.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from _launch import child_env, mpiexec_prefix
from guided_diffusion.data.digits import write_digits
from guided_diffusion import logger
from guided_diffusion.cgan import (
    cgan_defaults,
    cgan_training_batches,
    CGANTrainLoop,
    class_accuracy,
    create_cgan,
    default_sigmas,
    generate_samples,
    load_labeled_images,
    parzen_estimate,
    predict_classes,
    sample_noise,
    to_eval_space,
    train_classifier,
)
from guided_diffusion.sampling.files import to_uint8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8
# A short run: no dropout and a fast EMA make the conditioning appear within ~1000 steps (the
# paper's dropout 0.5 needs a few thousand; see the README for that run).
STEPS = 1000
BATCH = 50
NUM_CLASSES = 10
# Chance is 0.1. The measured figures are in the README; this threshold leaves room for seeds.
CONDITIONED_MIN_ACCURACY = 0.5
# The shuffled-label control may exceed chance_accuracy_bound() with probability at most this, on
# any machine and seed (see there).
CONTROL_ALPHA = 0.01


def chance_accuracy_bound(num_classes, alpha):
    """
    An accuracy that a generator whose labels carry no class information exceeds with probability
    at most alpha.

    Such a generator may still depend on y, through a mapping from labels to images that nothing
    ties to the digits (trained with shuffled labels, its label embedding stays an arbitrary
    function of its initialisation). A label whose images happen to look like its own digit then
    scores near 1 on all of its samples, so the samples are not independent trials (a binomial
    bound over 1000 samples would be far too tight: a GPU machine's run scored 0.30, three labels
    out of ten). The trials are the K labels: per-label hit rates X_k in [0, 1], independent
    across labels, and exchangeable, so their mean is 1/K on average. Hoeffding (1963, Theorem 1)
    bounds P(mean X >= a) <= exp(-K kl(a || 1/K)) for a > 1/K; this returns the a where the bound
    equals alpha.

    :param num_classes: K, the number of labels.
    :param alpha: the tolerated probability of exceeding the bound.
    """
    p = 1.0 / num_classes

    def kl(a):
        return a * math.log(a / p) + (1 - a) * math.log((1 - a) / (1 - p))

    target = math.log(1 / alpha) / num_classes
    low, high = p, 1.0 - 1e-12
    for _ in range(100):  # kl grows on (p, 1): bisect
        middle = (low + high) / 2
        low, high = (middle, high) if kl(middle) < target else (low, middle)
    return high


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Train / held-out folders (every fifth digit held out) and a classifier of real digits."""
    root = tmp_path_factory.mktemp("digits")
    everything = write_digits(str(root / "all"), image_size=SIZE)
    train_dir, test_dir = root / "train", root / "test"
    train_dir.mkdir(), test_dir.mkdir()
    for name in sorted(os.listdir(everything)):
        index = int(name.split("_")[1].split(".")[0])
        target = test_dir if index % 5 == 0 else train_dir
        shutil.copy(os.path.join(everything, name), target / name)
    train_x, train_y, _ = load_labeled_images(str(train_dir), image_size=SIZE)
    test_x, test_y, _ = load_labeled_images(str(test_dir), image_size=SIZE)
    train = to_eval_space(train_x, grayscale=True)
    test = to_eval_space(test_x, grayscale=True)
    classifier = train_classifier(train, train_y, num_classes=10, steps=600, seed=0)
    real_acc, _ = class_accuracy(classifier, test, test_y, num_classes=10)
    assert real_acc > 0.9, f"the judge itself is poor on real held-out digits: {real_acc}"
    return dict(train_dir=str(train_dir), test_dir=str(test_dir), test=test, classifier=classifier)


def _train(digits, logdir, *, shuffle_labels):
    logger.configure(dir=str(logdir), format_strs=["csv"])
    torch.manual_seed(0)
    flags = dict(cgan_defaults(), image_size=SIZE, dropout=0.0)
    generator, discriminator = create_cgan(**flags)
    initial = create_cgan(**flags)[0]
    initial.load_state_dict(generator.state_dict())
    data = cgan_training_batches(data_dir=digits["train_dir"], batch_size=BATCH, image_size=SIZE)
    if shuffle_labels:
        # The images keep their pixels but the labels no longer say which digit they show.
        data = ((x, {"y": c["y"][torch.randperm(len(c["y"]))]}) for x, c in data)
    loop = CGANTrainLoop(
        generator=generator,
        discriminator=discriminator,
        data=data,
        arch="mlp",
        batch_size=BATCH,
        ema_rate=0.99,
        max_steps=STEPS,
        log_interval=STEPS,
        save_interval=STEPS,
        model_flags=flags,
    )
    loop.run_loop()
    logger.reset()
    return initial.eval(), loop.ema


def _samples(generator, num=1000):
    torch.manual_seed(1)
    images, labels = generate_samples(generator, num_samples=num, num_classes=10)
    return to_eval_space(to_uint8(images), grayscale=True), labels


@pytest.fixture(scope="module")
def conditioned(digits, tmp_path_factory):
    return _train(digits, tmp_path_factory.mktemp("cgan"), shuffle_labels=False)


def test_generated_digits_show_the_requested_class(digits, conditioned):
    _, ema = conditioned
    samples, labels = _samples(ema)
    acc, per_class = class_accuracy(digits["classifier"], samples, labels, num_classes=NUM_CLASSES)
    print(f"accuracy on samples {acc:.3f}, per class {np.round(per_class, 2).tolist()}")
    assert acc > CONDITIONED_MIN_ACCURACY


def test_changing_y_alone_changes_the_generated_class(digits, conditioned):
    _, ema = conditioned
    torch.manual_seed(2)
    z = sample_noise(20, ema.z_dim).repeat_interleave(10, dim=0)  # each z with every class
    y = torch.arange(10).repeat(20)
    with torch.no_grad():
        images = to_uint8(ema.to_images(ema(z, y)))
    samples = to_eval_space(images, grayscale=True)
    predicted = predict_classes(digits["classifier"], samples).view(20, 10)
    # For a fixed z, the recognised class follows y.
    assert (predicted == torch.arange(10)).float().mean() > CONDITIONED_MIN_ACCURACY
    distinct = [len(set(row.tolist())) for row in predicted]
    assert np.mean(distinct) >= 5


def test_parzen_estimate_improves_with_training(digits, conditioned):
    initial, ema = conditioned
    test = digits["test"]
    valid, scored = test[0::2], test[1::2]
    sigmas = default_sigmas(-2, 0, 13)
    before = parzen_estimate(_samples(initial)[0], valid, scored, sigmas)
    after = parzen_estimate(_samples(ema)[0], valid, scored, sigmas)
    print(
        f"Parzen before {before['mean']:.2f} +- {before['stderr']:.2f}, "
        f"after {after['mean']:.2f} +- {after['stderr']:.2f}"
    )
    assert after["mean"] - before["mean"] > 5 * (after["stderr"] + before["stderr"])


def test_chance_accuracy_bound():
    # Against the binomial tail it dominates: with 0/1 hit rates (each label always or never drawn
    # as its own digit) the number of hits is Binomial(K, 1/K).
    from scipy.stats import binom

    bound = chance_accuracy_bound(NUM_CLASSES, CONTROL_ALPHA)
    assert binom.sf(math.ceil(bound * NUM_CLASSES) - 1, NUM_CLASSES, 1 / NUM_CLASSES) <= CONTROL_ALPHA
    assert chance_accuracy_bound(NUM_CLASSES, 0.5) < bound < chance_accuracy_bound(NUM_CLASSES, 1e-4)
    assert chance_accuracy_bound(1000, CONTROL_ALPHA) < 0.01  # many labels: close to chance
    # The control is meaningful only if chance cannot reach the class threshold itself.
    assert bound < CONDITIONED_MIN_ACCURACY


def test_shuffled_labels_fail_the_class_threshold(digits, tmp_path):
    _, ema = _train(digits, tmp_path, shuffle_labels=True)
    samples, labels = _samples(ema)
    acc, per_class = class_accuracy(digits["classifier"], samples, labels, num_classes=NUM_CLASSES)
    bound = chance_accuracy_bound(NUM_CLASSES, CONTROL_ALPHA)
    print(f"accuracy with shuffled training labels {acc:.3f} (chance bound {bound:.3f}), "
          f"per class {np.round(per_class, 2).tolist()}")
    assert acc < bound


def _run(args, env_dir, launcher=(), cpu=False):
    env = child_env(cpu=cpu, OPENAI_LOGDIR=env_dir)
    command = [*launcher, sys.executable, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_train_resume_sample_and_eval_scripts(digits, tmp_path):
    log = tmp_path / "log"
    train = ["scripts/cgan_train.py", "--data_dir", digits["train_dir"], "--image_size", str(SIZE),
             "--batch_size", "50", "--save_interval", "2", "--log_interval", "2"]
    res = _run([*train, "--iterations", "2"], log)
    assert res.returncode == 0, res.stderr
    res = _run([*train, "--iterations", "4", "--resume_checkpoint", "auto"], log)
    assert res.returncode == 0, res.stderr
    progress = (log / "progress.csv").read_text().splitlines()
    column = progress[0].split(",").index("step")
    steps = [int(float(row.split(",")[column])) for row in progress[1:]]
    assert steps[-1] == 3  # the resumed run's first step is step 3 (steps taken), not 1
    checkpoints = sorted(n for n in os.listdir(log) if n.startswith("cgan"))
    assert checkpoints == ["cgan000002.pt", "cgan000004.pt"]

    res = _run([*train, "--iterations", "6", "--resume_checkpoint", "auto", "--arch", "conv",
                "--image_size", "16"], log)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: checkpoint {log / 'cgan000004.pt'} was trained with --arch mlp "
        "--image_size 8 (got --arch conv --image_size 16): pass --arch mlp --image_size 8"
    ]

    out = tmp_path / "eval"
    res = _run(["scripts/cgan_eval.py", "--model_path", str(log / "cgan000004.pt"),
                "--image_size", str(SIZE), "--data_dir", digits["train_dir"],
                "--test_dir", digits["test_dir"], "--num_samples", "200",
                "--classifier_steps", "20"], out)
    assert res.returncode == 0, res.stderr
    figures = json.loads((out / "cgan_eval.json").read_text())
    assert figures["num_samples"] == 200 and len(figures["sample_accuracy_per_class"]) == 10
    assert np.isfinite(figures["parzen_mean"]) and figures["parzen_stderr"] > 0


DDP_CHECK = """
import sys, torch
from guided_diffusion import dist_util, logger
from guided_diffusion.cgan import CGANTrainLoop, create_cgan

dist_util.setup_dist()
logger.configure(dir=sys.argv[1], format_strs=["csv"])
rank = dist_util.get_rank()
torch.manual_seed(rank)  # different initial weights and data on each rank
flags = dict(arch=sys.argv[2], image_size=16, num_classes=10, z_dim=8, conv_channels=4, dropout=0.5)
g, d = create_cgan(**flags)

def batches():
    while True:
        yield torch.rand(6, 3, 16, 16) * 2 - 1, {"y": torch.randint(0, 10, (6,))}

loop = CGANTrainLoop(generator=g, discriminator=d, data=batches(), arch=flags["arch"], batch_size=6,
                     max_steps=3, save_interval=3, model_flags=flags)
loop.run_loop()
flat = torch.cat([p.detach().flatten() for m in (g, d, loop.ema) for p in m.parameters()])
gathered = dist_util.all_gather_tensors(flat)
assert dist_util.get_world_size() == 2
assert all(torch.equal(gathered[0], other) for other in gathered[1:]), "ranks diverged"
print("rank", rank, "in sync")
"""


def test_ddp_keeps_ranks_in_sync_under_mpiexec(tmp_path):
    # Each rank sees different data; identical weights afterwards mean gradients were averaged.
    # The conv networks also carry batch-norm buffers and label embeddings. Two CPU ranks (gloo).
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK)
    res = _run([str(script), str(tmp_path), "conv"], tmp_path, launcher=mpiexec_prefix(2), cpu=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("in sync") == 2
    assert torch.load(tmp_path / "cgan000003.pt", weights_only=True)["step"] == 3
