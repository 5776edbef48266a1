"""
The proxy FID while training (--fid_interval, guided_diffusion/training/fid.py), with random-weight
Inception networks on a tiny model and a few steps:

- the logged fid is the Frechet distance of the EMA samples' features recomputed here from the
  checkpoint by the public sampler, with the trace of the matrix square root taken from the
  singular values of the two centred feature matrices (an exact identity for sample
  covariances, independent of scipy's sqrtm); a reference batch holding mu/sigma gives the same
  value as one holding the images; the training is bit-for-bit the same with and without it;
- every flag refused in one line before a log folder exists; a failed measurement costs a
  warning and no checkpoint; the split over ranks has no duplicates and misses nothing.
"""

import os
import subprocess

import numpy as np
import pytest
import torch

from guided_diffusion.cli.main import run_main
from guided_diffusion.data.digits import write_digits
from guided_diffusion.evaluation.inception import load_inception
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.training import fid as proxy
from guided_diffusion.training.fid import FID_SEED, rank_indices

from _launch import REPO_ROOT as REPO, child_env, torchrun_prefix
from test_inception import he_initialised_model
from test_resume import DIFFUSION, load, run, tensors_equal

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("digits") / "d"), image_size=16, limit=12)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random Inception weights, and a reference batch of 6 images (and its statistics)."""
    folder = tmp_path_factory.mktemp("fid")
    weights = folder / "inception.pth"
    torch.save(he_initialised_model().state_dict(), weights)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    ref = folder / "ref.npz"
    np.savez(ref, arr_0=images)
    with torch.no_grad():
        pool, _ = load_inception(str(weights))(torch.from_numpy(images))
    pool = pool.double().numpy()
    stats = folder / "ref_stats.npz"
    np.savez(stats, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    return {"weights": str(weights), "ref": str(ref), "stats": str(stats), "ref_pool": pool}


def frechet_low_rank(a, b):
    """
    FID of two feature sets through tr((S1 S2)^(1/2)) = sum of the singular values of
    A B^T / sqrt((n1 - 1)(n2 - 1)), A and B the centred features (S1 = A^T A / (n1 - 1), ...):
    the nonzero eigenvalues of S1 S2 are those of (A B^T)(A B^T)^T / ((n1 - 1)(n2 - 1)).
    """
    ca, cb = a - a.mean(0), b - b.mean(0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / scale
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ca ** 2).sum() / (len(a) - 1) + (cb ** 2).sum() / (len(b) - 1)
                 - 2 * trace_sqrt)


K, BATCH = 5, 4
FID = lambda files, ref: ["--fid_interval", 2, "--fid_samples", K, "--fid_steps", 3,  # noqa: E731
                          "--fid_ref", ref, "--inception_path", files["weights"]]


def logged(folder, key):
    columns, *rows = (folder / "progress.csv").read_text().splitlines()
    at = columns.split(",").index(key)
    return [row.split(",")[at] for row in rows]


def test_the_logged_fid_is_that_of_the_ema_samples_and_training_is_unchanged(
        data, files, tmp_path, monkeypatch):
    common = ["--data_dir", data, *DIFFUSION, "--max_steps", 2, "--log_interval", 1,
              "--lr", 1e-3, "--ema_rate", 0.5]
    assert run("image_train", common, tmp_path / "plain", monkeypatch) == 0
    measured = []
    original = proxy.ProxyFID.__call__
    monkeypatch.setattr(proxy.ProxyFID, "__call__",
                        lambda self, step: measured.append(original(self, step)) or measured[-1])
    assert run("image_train", [*common, *FID(files, files["ref"])], tmp_path / "fid",
               monkeypatch) == 0
    for name in sorted(os.listdir(tmp_path / "plain")):
        if name.endswith(".pt"):  # the weights after 2 steps are the same bit for bit
            assert tensors_equal(load(tmp_path / "plain" / name), load(tmp_path / "fid" / name))
    fid_column = logged(tmp_path / "fid", "fid")
    assert fid_column[0] == "" and float(fid_column[1]) == pytest.approx(measured[0], rel=1e-6)
    assert logged(tmp_path / "fid", "fid_step")[1] == "2"
    assert float(logged(tmp_path / "fid", "fid_seconds")[1]) > 0
    log = (tmp_path / "fid" / "log.txt").read_text()
    assert f"step 2: proxy FID {measured[0]:.4f} of {K} samples (3 DDIM steps, EMA 0.5 " in log

    expected = oracle_fid(tmp_path / "fid" / "ema_0.5_000002.pt", files, [range(0, 4), range(4, 5)])
    assert measured[0] == pytest.approx(expected, rel=1e-4)


def oracle_fid(ema_checkpoint, files, blocks):
    """
    The FID the run should log, recomputed independently: the EMA weights, DDIM in 3 steps
    from the documented noise (sample i: a generator seeded FID_SEED + i), the Inception pool
    features, the low-rank formula against the reference images' features. `blocks`: the
    run's rounds (batch composition changes float rounding, so the same batches are used).
    """
    defaults = model_and_diffusion_defaults()
    flags = dict(zip(DIFFUSION[::2], DIFFUSION[1::2]))
    for name, value in flags.items():
        key = name[2:]
        if key in defaults:
            kind = type(defaults[key])
            defaults[key] = value == "True" if kind is bool else kind(value)
    defaults.update(dropout=0.1, timestep_respacing="ddim3")
    model, diffusion = create_model_and_diffusion(**defaults)
    model.load_state_dict(load(ema_checkpoint))
    model.eval()
    inception = load_inception(files["weights"])
    pools = []
    with torch.no_grad():
        for block in blocks:
            noise = torch.stack([torch.randn((3, 16, 16), generator=torch.Generator()
                                             .manual_seed(FID_SEED + i)) for i in block])
            x = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=True)
            images = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            pools.append(inception(images)[0].double().numpy())
    return frechet_low_rank(np.concatenate(pools), files["ref_pool"])


def test_two_ranks_share_the_samples_and_log_the_fid_of_all_of_them(data, files, tmp_path):
    # --batch_size 2 on 2 ranks, 5 samples: round 0 is samples 0-1 (rank 0) and 2-3 (rank 1),
    # round 1 is sample 4 (rank 0) and nothing for rank 1. A duplicate or a missing sample
    # would change the statistics, so the logged FID must be the oracle's of samples 0-4.
    argv = ["--data_dir", data, *DIFFUSION, "--batch_size", 2, "--max_steps", 2,
            "--log_interval", 1, "--lr", 1e-3, "--ema_rate", 0.5, *FID(files, files["ref"]),
            "--log_dir", tmp_path]
    proc = subprocess.run([*torchrun_prefix(2), os.path.join(REPO, "scripts", "image_train.py"),
                           *map(str, argv)], env=child_env(cpu=True, GD_DIST_TIMEOUT=300),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged_fid = float(logged(tmp_path, "fid")[1])
    expected = oracle_fid(tmp_path / "ema_0.5_000002.pt", files,
                          [range(0, 2), range(2, 4), range(4, 5)])
    assert logged_fid == pytest.approx(expected, rel=1e-4)


def test_stored_statistics_give_the_fid_of_the_images_and_a_failure_costs_no_checkpoint(
        data, files, tmp_path, monkeypatch):
    common = ["--data_dir", data, *DIFFUSION, "--max_steps", 4, "--log_interval", 1,
              "--lr", 0, "--save_interval", 100]
    calls = []
    original = proxy.ProxyFID.local_features

    def second_fails(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self)

    monkeypatch.setattr(proxy.ProxyFID, "local_features", second_fails)
    folder = tmp_path / "stats"
    assert run("image_train", [*common, *FID(files, files["stats"])], folder, monkeypatch) == 0
    assert os.path.exists(folder / "model000004.pt")  # the run went on to its final checkpoint
    column = logged(folder, "fid")
    assert column[0] == column[2] == "" and column[1] != ""
    assert column[3] == ""  # the failed step 4 logs nothing (not the stale value of step 2)
    log = (folder / "log.txt").read_text()
    assert "warning: step 4: the proxy FID was not measured (RuntimeError: CUDA out of memory" in log
    # The stored mu/sigma (of the same 6 images, by numpy here) are what the images give.
    from_stats = proxy.reference_statistics(files["stats"], None, "cpu")
    from_images = proxy.reference_statistics(files["ref"], load_inception(files["weights"]), "cpu")
    np.testing.assert_allclose(from_stats.mu, from_images.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(from_stats.sigma, from_images.sigma, rtol=1e-6, atol=1e-9)


def test_a_multiple_of_the_interval_is_measured_after_a_resume(data, files, tmp_path,
                                                              monkeypatch):
    common = ["--data_dir", data, *DIFFUSION, "--log_interval", 1, "--lr", 0,
              "--save_interval", 1, *FID(files, files["stats"])]
    steps = []
    monkeypatch.setattr(proxy.ProxyFID, "__call__", lambda self, step: steps.append(step))
    assert run("image_train", [*common, "--max_steps", 1], tmp_path, monkeypatch) == 0
    assert run("image_train", [*common, "--max_steps", 3, "--resume_checkpoint", "auto"],
               tmp_path, monkeypatch) == 0
    assert steps == [2, 4]  # global steps, resumed ones included


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("count,batch", [(5, 4), (2, 1), (1000, 16), (7, 3)])
def test_the_ranks_share_the_samples_without_duplicates(world, count, batch):
    taken = [i for rank in range(world) for block in rank_indices(count, batch, rank, world)
             for i in block]
    assert sorted(taken) == list(range(count))
    for rank in range(world):
        assert all(len(block) <= batch for block in rank_indices(count, batch, rank, world))


def test_noise_and_labels_depend_only_on_the_sample_index():
    both = proxy.fid_noise(range(3), (1, 2, 2))
    assert torch.equal(proxy.fid_noise([2], (1, 2, 2))[0], both[2])
    assert proxy.fid_labels([0, 1, 10, 11], 10).tolist() == [0, 1, 0, 1]


# ----------------------------------------------------------------------------- refusals


def refusal(capsys, tmp_path, argv):
    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_main(__import__("test_scripts").load_script("image_train").main,
                 [*map(str, argv), "--log_dir", str(folder)])
    status = exc.value.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert not folder.exists()  # refused before the log folder is made
    return lines[0]


def bad_files(tmp_path, files):
    png = tmp_path / "picture.png"
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(png)
    paths = {"png": png, "none": tmp_path / "none.npz", "labels": tmp_path / "labels.npz",
             "float": tmp_path / "float.npz", "one": tmp_path / "one.npz",
             "small_mu": tmp_path / "small_mu.npz", "text": tmp_path / "text.npz"}
    np.savez(paths["labels"], arr_1=np.zeros(3))
    np.savez(paths["float"], arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    np.savez(paths["one"], arr_0=np.zeros((1, 8, 8, 3), dtype=np.uint8))
    np.savez(paths["small_mu"], mu=np.zeros(64), sigma=np.eye(64))
    paths["text"].write_text("not an archive")
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("change,expected", [
    ({"--fid_interval": -1}, "--fid_interval must be at least 0"),
    ({"--fid_samples": 1}, "--fid_samples must be at least 2"),
    ({"--fid_samples": 0}, "--fid_samples must be at least 2"),
    ({"--fid_steps": 0}, "--fid_steps must be between 1 and --diffusion_steps 50"),
    ({"--fid_steps": 51}, "--fid_steps must be between 1 and --diffusion_steps 50"),
    ({"--fid_ref": ""}, "--fid_interval needs --fid_ref REF.npz"),
    ({"--fid_ref": "none"}, "is not a file"),
    ({"--fid_ref": "png"}, "is a PNG image"),
    ({"--fid_ref": "text"}, "is not an npz file"),
    ({"--fid_ref": "labels"}, "holds arr_1: a reference batch is an npz with mu"),
    ({"--fid_ref": "float"}, "arr_0 is float32 (4, 8, 8, 3)"),
    ({"--fid_ref": "one"}, "(at least 2)"),
    ({"--fid_ref": "small_mu"}, "mu is (64,) and sigma (64, 64)"),
    ({"--inception_path": "none"}, "--inception_path"),
    ({"--inception_path": "png"}, "--inception_path"),
    ({"--inception_path": "labels"}, "--inception_path"),
    ({"--in_channels": 4}, "--in_channels 3 or 1"),
])
def test_bad_fid_flags_are_refused_in_one_line_before_any_work(change, expected, data, files,
                                                               tmp_path, capsys):
    bad = bad_files(tmp_path, files)
    argv = dict(zip(FID(files, files["stats"])[::2], FID(files, files["stats"])[1::2]))
    argv.update({k: bad.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    line = refusal(capsys, tmp_path, ["--data_dir", data, *DIFFUSION, "--max_steps", 1,
                                      *[x for kv in argv.items() for x in kv]])
    assert expected in line, line


@pytest.mark.parametrize("flag", ["--fid_interval", "--fid_samples", "--fid_steps"])
def test_fid_counts_must_be_integers(flag, data, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(__import__("test_scripts").load_script("image_train").main,
                 ["--data_dir", data, *map(str, DIFFUSION), flag, "many",
                  "--log_dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert f"argument {flag}: invalid int value: 'many'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_no_weights_anywhere_names_the_download(data, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("guided_diffusion.evaluation.evaluator.default_inception_path",
                        lambda: None)
    argv = FID(files, files["stats"])
    argv[argv.index("--inception_path") + 1] = ""
    line = refusal(capsys, tmp_path, ["--data_dir", data, *DIFFUSION, *argv])
    assert "none were given (--inception_path)" in line and "pt_inception-2015-12-05" in line

