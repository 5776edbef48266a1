"""End-to-end runs of scripts/vae_train.py, vae_sample.py and vae_latent_pca.py on tiny digits."""

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import logger
from guided_diffusion.runtime.checkpoints import load_checkpoint
from guided_diffusion.sampling.files import grid_scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--image_size", "8", "--hidden_size", "32", "--latent_size", "2"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, argv, log_dir=None):
    """Call a script's main in-process; log_dir plays the role of $OPENAI_LOGDIR."""
    module = _script(name)
    old_env = os.environ.pop("OPENAI_LOGDIR", None)
    if log_dir is not None:
        os.environ["OPENAI_LOGDIR"] = log_dir
    try:
        module.main(argv)  # the convention: main(argv) parses its own flags
    finally:
        os.environ.pop("OPENAI_LOGDIR", None)
        if old_env is not None:
            os.environ["OPENAI_LOGDIR"] = old_env
        # With $OPENAI_LOGDIR unset, the default logger that reset() falls back to cannot reopen
        # (and truncate) the run's progress.csv.
        logger.reset()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 300-image 8x8 digits folder and a VAE trained on it for 30 steps, then resumed to 40."""
    pytest.importorskip("sklearn")
    from guided_diffusion.data.digits import write_digits

    root = tmp_path_factory.mktemp("vae")
    data = write_digits(str(root / "digits"), image_size=8, limit=300)
    log_dir = str(root / "log")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = ["--data_dir", data, "--batch_size", "50", "--log_interval", "10", "--save_interval", "20"] + MODEL
        _run("vae_train", train + ["--iterations", "30"], log_dir)
        first_run = sorted(os.listdir(log_dir))
        with open(os.path.join(log_dir, "progress.csv")) as f:
            first_rows = list(csv.DictReader(f))
        _run("vae_train", train + ["--iterations", "40", "--resume_checkpoint", "auto"], log_dir)
    finally:
        torch.set_num_threads(old_threads)
    return dict(root=root, data=data, log_dir=log_dir, first_run=first_run, first_rows=first_rows)


def test_train_writes_checkpoints_logs_and_resumes(trained):
    log_dir = trained["log_dir"]
    assert {"vae000020.pt", "vae000030.pt"} <= set(trained["first_run"])
    assert "vae000040.pt" not in trained["first_run"]
    state = load_checkpoint(os.path.join(log_dir, "vae000040.pt"))
    assert state["step"] == 40 and state["flags"]["latent_size"] == 2 and state["opt"]["state"]
    with open(os.path.join(log_dir, "log.txt")) as f:
        assert "vae000030.pt at step 30" in f.read()
    rows = trained["first_rows"]
    assert {"loss", "recon", "kl", "elbo"} <= set(rows[0])
    # One engine, the reference's cadence: a dump after the first step of every interval, the
    # logged step counting the steps taken.
    assert [int(float(r["step"])) for r in rows] == [1, 11, 21]
    with open(os.path.join(log_dir, "progress.csv")) as f:
        resumed_rows = list(csv.DictReader(f))
    # The resumed run (30 -> 40, a dump after its first step) continues the step count.
    assert int(float(resumed_rows[-1]["step"])) == 31
    for r in rows + resumed_rows:
        assert float(r["elbo"]) == pytest.approx(-(float(r["recon"]) + float(r["kl"])), rel=1e-4)


def test_sample_writes_prior_samples_reconstructions_and_interpolation(trained, tmp_path):
    ckpt = os.path.join(trained["log_dir"], "vae000040.pt")
    out = str(tmp_path)
    _run(
        "vae_sample",
        ["--model_path", ckpt, "--data_dir", trained["data"], "--out_dir", out, "--num_samples", "10",
         "--batch_size", "4", "--num_recon", "6", "--interp_steps", "5"],  # flags: the checkpoint's
    )
    with np.load(os.path.join(out, "samples_10x8x8x3.npz")) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (10, 8, 8, 3)
    with np.load(os.path.join(out, "reconstructions.npz")) as npz:
        assert npz["originals"].shape == npz["reconstructions"].shape == (6, 8, 8, 3)
        # Grayscale is stored as three equal channels.
        assert (npz["reconstructions"][..., 0] == npz["reconstructions"][..., 2]).all()
    with np.load(os.path.join(out, "interpolation.npz")) as npz:
        assert npz["images"].shape == (5, 8, 8, 3) and npz["endpoints"].shape == (2, 8, 8, 3)
    # Interpolation row: original, 5 steps, original, 8-pixel images magnified k times, with
    # 2-pixel padding.
    k = grid_scale(8, 8, 1, 7, 2)
    assert Image.open(os.path.join(out, "interpolation.png")).size == (7 * (8 * k + 2) + 2, 8 * k + 4)
    # Reconstruction grid: 6 (original, reconstruction) pairs, 8 images per row.
    k = grid_scale(8, 8, 2, 8, 2)
    size = Image.open(os.path.join(out, "reconstructions.png")).size
    assert size == (8 * (8 * k + 2) + 2, 2 * (8 * k + 2) + 2) and min(size) >= 256


def test_latent_pca_plots_raw_2d_latent_and_prints_knn(trained, tmp_path, capsys):
    ckpt = os.path.join(trained["log_dir"], "vae000040.pt")
    _run("vae_latent_pca", ["--model_path", ckpt, "--data_dir", trained["data"], "--out_dir", str(tmp_path)] + MODEL)
    printed = capsys.readouterr().out
    assert "5-NN leave-one-out accuracy on the raw 2-D latent:" in printed
    with np.load(tmp_path / "latent_pca.npz") as npz:
        assert str(npz["coords_kind"]) == "latent" and npz["coords"].shape == (300, 2)
        assert sorted(set(npz["labels"].tolist())) == list(range(10))
        for key in ("mean", "components", "explained_variance", "explained_variance_ratio"):
            assert key in npz
    assert Image.open(tmp_path / "latent_pca.png").size == (900, 720)


def test_latent_pca_without_labels_warns_and_uses_one_colour(trained, tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, name in enumerate(sorted(os.listdir(trained["data"]))[:40]):
        shutil.copy(os.path.join(trained["data"], name), folder / f"img{i:03d}.png")
    ckpt = os.path.join(trained["log_dir"], "vae000040.pt")
    _run("vae_latent_pca", ["--model_path", ckpt, "--data_dir", str(folder), "--out_dir", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    assert "warning" in printed and "one colour" in printed and "leave-one-out accuracy" not in printed
    with np.load(tmp_path / "o" / "latent_pca.npz") as npz:
        assert "labels" not in npz and npz["coords"].shape == (40, 2)


def test_latent_pca_on_any_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    features = rng.normal(size=(100, 16))
    features[:, 3] += 6 * labels
    np.savez(tmp_path / "f.npz", features=features, labels=labels)
    _run("vae_latent_pca", ["--features_npz", str(tmp_path / "f.npz"), "--out_dir", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"on the 2-D PCA: ([0-9.]+)", printed).group(1))
    assert accuracy > 0.9  # the classes are 6 standard deviations apart along one axis


def test_bad_input_gives_one_line_errors(trained, tmp_path):
    ckpt = os.path.join(trained["log_dir"], "vae000040.pt")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    out = tmp_path / "out"
    for script in ("vae_sample.py", "vae_latent_pca.py"):
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "scripts", script), "--model_path", ckpt,
             "--data_dir", trained["data"], "--out_dir", str(out), "--image_size", "8",
             "--hidden_size", "32", "--latent_size", "20"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        # The convention of every script: exit status 2 and one line naming the checkpoint's
        # value; the flags it agrees with (--image_size 8, --hidden_size 32) are not mentioned.
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith(f"error: checkpoint {ckpt} was trained with --latent_size 2, "
                                      "not --latent_size 20: drop these flags")
        assert not out.exists()  # refused before the log folder is made
    with pytest.raises(ValueError, match="--latent_size must be a positive integer, got 0"):
        _run("vae_train", ["--data_dir", trained["data"], "--latent_size", "0", "--image_size", "8"])


def test_sampling_reads_the_flags_from_the_checkpoint(trained, tmp_path):
    ckpt = os.path.join(trained["log_dir"], "vae000040.pt")
    _run("vae_sample", ["--model_path", ckpt, "--num_samples", "2", "--batch_size", "2",
                        "--log_dir", str(tmp_path / "log"), "--out_dir", str(tmp_path / "out"),
                        "--save_images", "True"])
    # 8x8 images from a checkpoint trained at --image_size 8 although the default is 28.
    assert sorted(os.listdir(tmp_path / "out")) == ["samples_2x8x8x3", "samples_2x8x8x3.npz",
                                                    "samples_2x8x8x3.png"]
    # --save_images: one PNG per sample, the same pixels as the npz.
    folder = tmp_path / "out" / "samples_2x8x8x3"
    names = sorted(os.listdir(folder))
    assert len(names) == 2 and all(n.endswith(".png") for n in names)
    with np.load(tmp_path / "out" / "samples_2x8x8x3.npz") as npz:
        for name, image in zip(names, npz["arr_0"]):
            with Image.open(folder / name) as png:
                assert np.array_equal(np.asarray(png.convert("RGB")), image)
    assert (tmp_path / "log" / "log.txt").exists()
    with pytest.raises(ValueError, match="not a VAE checkpoint"):
        torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
        _run("vae_sample", ["--model_path", str(tmp_path / "plain.pt"), "--out_dir", str(tmp_path / "o2")])
