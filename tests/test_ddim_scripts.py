"""ddim_invert.py, ddim_interpolate.py and ddim_consistency.py end to end on 8x8 toy models: the
files they write, that they compute what the library computes (seed contract included), and one
line for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.data.digits import write_digits
from guided_diffusion.script_util import diffusion_for_steps
from guided_diffusion.sampling.files import grid_scale, to_uint8
from guided_diffusion.sampling.files import save_latents, uint8_to_model_input
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

from test_scripts import SCRIPTS, child_env, error_line, run_inprocess

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 6
TOY = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
       "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 100 "
       "--noise_schedule cosine").split()
COND = ["--class_cond", "True", "--num_classes", NUM_CLASSES]


def toy_flags(class_cond):
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", num_head_channels=16, diffusion_steps=100,
                 noise_schedule="cosine", class_cond=class_cond)
    return flags


def toy_model(class_cond, seed):
    """A toy UNet whose zero-initialised layers are filled, so its output depends on x, t and y."""
    torch.manual_seed(seed)
    model, _ = create_model_and_diffusion(**toy_flags(class_cond), num_classes=NUM_CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddim_scripts")
    paths = {"root": root, "digits": write_digits(str(root / "digits"), image_size=8, limit=6)}
    for name, class_cond in (("cond", True), ("uncond", False)):
        paths[name] = root / f"{name}.pt"
        torch.save(toy_model(class_cond, seed=len(name)).state_dict(), paths[name])
    return paths


def loaded(path, class_cond):
    model, _ = create_model_and_diffusion(**toy_flags(class_cond), num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def inverted(toys):
    """ddim_invert.py on the 6 digits with the class-conditional toy (batches of 4 and 2)."""
    out = toys["root"] / "inverted"
    status = run_inprocess("ddim_invert", [
        "--model_path", toys["cond"], *TOY, *COND, "--input", toys["digits"], "--steps", "5,2",
        "--batch_size", 4, "--log_dir", out, "--progress", "False"])
    assert status == 0
    return out


def test_invert_writes_latents_grid_and_metrics(toys, inverted):
    with np.load(inverted / "latents.npz") as npz:
        x_T, labels, steps, images = npz["x_T"], npz["labels"], int(npz["steps"]), npz["images"]
    assert x_T.shape == (6, 3, 8, 8) and x_T.dtype == np.float32 and steps == 5
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5])  # 0_0000.png, 1_0001.png, ...
    files = sorted(os.listdir(toys["digits"]))
    expected_images = np.stack([np.asarray(Image.open(os.path.join(toys["digits"], f))) for f in files])
    np.testing.assert_array_equal(images, expected_images)

    # The latents are the library's inversion with 5 steps and the labels.
    model = loaded(toys["cond"], True)
    diffusion = diffusion_for_steps(toy_flags(True), 5)
    x0 = uint8_to_model_input(images)
    with torch.no_grad():
        expected = diffusion.ddim_reverse_sample_loop(model, x0, model_kwargs={"y": torch.from_numpy(labels)})
    np.testing.assert_allclose(x_T, expected.numpy(), atol=1e-5)

    report = json.loads((inverted / "reconstruction.json").read_text())
    assert report["num_images"] == 6 and set(report["steps"]) == {"2", "5"}
    for row in report["steps"].values():
        assert row["mse"] > 0 and row["psnr"] == pytest.approx(10 * np.log10(1 / row["mse"]))
    with torch.no_grad():
        recon = diffusion.ddim_sample_loop(model, x0.shape, noise=expected, model_kwargs={"y": torch.from_numpy(labels)})
    mse = (((recon.clamp(-1, 1) - x0) / 2) ** 2).mean().item()
    assert report["steps"]["5"]["mse"] == pytest.approx(mse, rel=1e-4)

    grid = np.asarray(Image.open(inverted / "reconstructions.png"))
    # Originals + 2 step counts, 6 columns, magnified (nearest) to at least 256 pixels a side.
    k = grid_scale(8, 8, 3, 6, 2)
    assert k > 1 and grid.shape[:2] == (3 * (8 * k + 2) + 2, 6 * (8 * k + 2) + 2)
    np.testing.assert_array_equal(grid[2 : 2 + 8 * k : k, 2 : 2 + 8 * k : k], images[0])
    log = (inverted / "log.txt").read_text()
    assert "psnr" in log and "latents.npz" in log


def test_invert_reads_an_npz(toys, tmp_path):
    images = (np.arange(4 * 8 * 8 * 3) % 251).astype(np.uint8).reshape(4, 8, 8, 3)
    np.savez(tmp_path / "images.npz", images)
    assert run_inprocess("ddim_invert", [
        "--model_path", toys["uncond"], *TOY, "--input", tmp_path / "images.npz", "--steps", "3",
        "--num_images", 3, "--log_dir", tmp_path, "--progress", "False"]) == 0
    with np.load(tmp_path / "latents.npz") as npz:
        assert npz["x_T"].shape == (3, 3, 8, 8) and "labels" not in npz
        np.testing.assert_array_equal(npz["images"], images[:3])


def test_interpolate_drawn_pairs_follows_the_seed_contract(toys, tmp_path):
    assert run_inprocess("ddim_interpolate", [
        "--model_path", toys["cond"], *TOY, *COND, "--num_pairs", 2, "--num_points", 4,
        "--steps", 3, "--seed", 5, "--log_dir", tmp_path, "--progress", "False"]) == 0
    with np.load(tmp_path / "interpolation.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (8, 8, 8, 3) and labels.shape == (8,)
    # As the sampling scripts: labels first, then the two ends of every pair.
    torch.manual_seed(5)
    drawn = torch.randint(0, NUM_CLASSES, (2,))
    starts, ends = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    np.testing.assert_array_equal(labels, drawn.repeat_interleave(4).numpy())
    model, diffusion = loaded(toys["cond"], True), diffusion_for_steps(toy_flags(True), 3)
    with torch.no_grad():
        for ends_, column in ((starts, 0), (ends, 3)):
            expected = diffusion.ddim_sample_loop(model, (2, 3, 8, 8), noise=ends_, model_kwargs={"y": drawn})
            np.testing.assert_array_equal(images[column::4], to_uint8(expected).numpy())
    # The middle of a path is neither end.
    assert not np.array_equal(images[1], images[0]) and not np.array_equal(images[1], images[3])
    grid = np.asarray(Image.open(tmp_path / "interpolation.png"))
    k = grid_scale(8, 8, 2, 4, 2)
    assert grid.shape[:2] == (2 * (8 * k + 2) + 2, 4 * (8 * k + 2) + 2) and min(grid.shape[:2]) >= 256


def test_interpolate_between_inverted_latents(toys, inverted, tmp_path):
    assert run_inprocess("ddim_interpolate", [
        "--model_path", toys["cond"], *TOY, *COND, "--latents", inverted / "latents.npz",
        "--num_pairs", 5, "--num_points", 3, "--steps", 5, "--log_dir", tmp_path,
        "--progress", "False"]) == 0
    with np.load(tmp_path / "interpolation.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (9, 8, 8, 3)  # 6 latents make 3 pairs
    np.testing.assert_array_equal(labels, [0, 0, 0, 2, 2, 2, 4, 4, 4])
    with np.load(inverted / "latents.npz") as npz:
        x_T = torch.from_numpy(npz["x_T"])
    model, diffusion = loaded(toys["cond"], True), diffusion_for_steps(toy_flags(True), 5)
    with torch.no_grad():
        row_ends = diffusion.ddim_sample_loop(model, (2, 3, 8, 8), noise=x_T[2:4], model_kwargs={"y": torch.tensor([2, 2])})
    # The script decodes the 9 points in one batch, this the 2 ends alone: the batch size
    # changes the convolutions' float rounding (~1e-8), which can move a pixel across a uint8
    # rounding boundary, so a rare off-by-one is allowed.
    diff = np.abs(images[[3, 5]].astype(int) - to_uint8(row_ends).numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).sum())


def test_consistency_matches_image_sample_and_reports_distances(toys, tmp_path):
    assert run_inprocess("ddim_consistency", [
        "--model_path", toys["uncond"], *TOY, "--steps", "2,4", "--num_samples", 3, "--seed", 1,
        "--log_dir", tmp_path / "c", "--progress", "False"]) == 0
    with np.load(tmp_path / "c" / "consistency.npz") as npz:
        images = npz["arr_0"]
        assert "arr_1" not in npz
    assert images.shape == (6, 8, 8, 3)
    # The same seed gives image_sample.py's DDIM samples at the finest step count.
    assert run_inprocess("image_sample", [
        "--model_path", toys["uncond"], *TOY, "--timestep_respacing", "ddim4", "--use_ddim", "True",
        "--num_samples", 3, "--batch_size", 3, "--seed", 1, "--log_dir", tmp_path / "s",
        "--progress", "False"]) == 0
    with np.load(tmp_path / "s" / "samples_3x8x8x3.npz") as npz:
        np.testing.assert_array_equal(images[3:], npz["arr_0"])
    report = json.loads((tmp_path / "c" / "consistency.json").read_text())
    assert report["reference_steps"] == 4 and report["num_samples"] == 3
    coarse, fine = images[:3].astype(float), images[3:].astype(float)
    assert report["steps"]["2"]["mean_abs_pixel_distance"] == pytest.approx(np.abs(coarse - fine).mean())
    assert report["steps"]["2"]["mse"] == pytest.approx((((coarse - fine) / 255) ** 2).mean())
    assert report["steps"]["4"] == {"mean_abs_pixel_distance": 0.0, "mse": 0.0}
    assert report["steps"]["2"]["mean_abs_pixel_distance"] > 0
    grid = np.asarray(Image.open(tmp_path / "c" / "consistency.png"))
    k = grid_scale(8, 8, 2, 3, 2)
    assert grid.shape[:2] == (2 * (8 * k + 2) + 2, 3 * (8 * k + 2) + 2)


# ----------------------------------------------------------------------------- bad input


def test_image_folder_of_the_wrong_size(toys, tmp_path, capsys):
    folder = write_digits(str(tmp_path / "digits16"), image_size=16, limit=2)
    line = error_line(capsys, run_inprocess("ddim_invert", [
        "--model_path", toys["uncond"], *TOY, "--input", folder, "--log_dir", tmp_path]))
    assert "is 16x16 but --image_size is 8" in line and "0_0000.png" in line


def test_eta_other_than_zero_is_refused(toys, tmp_path, capsys):
    line = error_line(capsys, run_inprocess("ddim_invert", [
        "--model_path", toys["uncond"], *TOY, "--input", toys["digits"], "--eta", 0.5,
        "--log_dir", tmp_path]))
    assert "--eta 0" in line and "cannot be inverted" in line


@pytest.mark.parametrize("script", ["ddim_interpolate", "ddim_consistency"])
def test_latents_that_do_not_fit_the_model(toys, tmp_path, capsys, script):
    save_latents(tmp_path / "big.npz", torch.zeros(2, 3, 16, 16))
    line = error_line(capsys, run_inprocess(script, [
        "--model_path", toys["uncond"], *TOY, "--latents", tmp_path / "big.npz", "--log_dir", tmp_path]))
    assert "(2, 3, 16, 16)" in line and "--image_size 16" in line
    save_latents(tmp_path / "unlabelled.npz", torch.zeros(2, 3, 8, 8))
    line = error_line(capsys, run_inprocess(script, [
        "--model_path", toys["cond"], *TOY, *COND, "--latents", tmp_path / "unlabelled.npz",
        "--log_dir", tmp_path]))
    assert "needs labels" in line
    np.savez(tmp_path / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8))
    line = error_line(capsys, run_inprocess(script, [
        "--model_path", toys["uncond"], *TOY, "--latents", tmp_path / "samples.npz", "--log_dir", tmp_path]))
    assert "not a latents file" in line


def test_several_ranks_are_refused(toys, tmp_path, capsys, monkeypatch):
    from guided_diffusion import dist_util

    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    line = error_line(capsys, run_inprocess("ddim_consistency", [
        "--model_path", toys["uncond"], *TOY, "--log_dir", tmp_path]))
    assert "runs as one process" in line


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "ddim_invert.py"), "--eta", "1", "--log_dir", str(tmp_path)],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
