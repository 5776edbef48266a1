"""
Issue 23, images out: one PNG per sample (--save_images, npz_to_images.py), the class choice of the
sampling scripts (--class_label, --balanced_labels; the default draw unchanged), --eta on DDIM, and
a PNG passed where an npz is expected."""

import fnmatch
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import dist_util
from guided_diffusion.errors import ScriptError
from guided_diffusion.sampling import loop
from guided_diffusion.sampling.files import (
    npz_to_image_files,
    read_image_npz,
    save_image_files,
    save_samples,
)
from guided_diffusion.sampling.loop import ClassLabels, make_sample_fn
from guided_diffusion.script_util import create_gaussian_diffusion

from _launch import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_images(n, h=6, w=5, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(n, h, w, c), dtype=np.uint8)


def read_folder(folder, pattern="*"):
    names = sorted(n for n in os.listdir(folder) if fnmatch.fnmatch(n, pattern))
    return names, [np.array(Image.open(os.path.join(folder, n))) for n in names]


def test_save_images_writes_one_png_per_sample_named_by_index_and_label(tmp_path):
    images, labels = random_images(3), np.array([7, 0, 7])
    npz = save_samples(images, labels, tmp_path, save_images=True)
    folder = os.path.splitext(npz)[0]
    names, pixels = read_folder(folder)
    assert names == ["000000_7.png", "000001_0.png", "000002_7.png"]
    for got, want in zip(pixels, images):
        np.testing.assert_array_equal(got, want)
    # Unlabelled samples are <index>.png; grey samples are grey PNGs.
    grey = random_images(2, c=1, seed=1)
    save_image_files(grey, None, tmp_path / "grey")
    names, pixels = read_folder(tmp_path / "grey")
    assert names == ["000000.png", "000001.png"]
    assert Image.open(tmp_path / "grey" / names[0]).mode == "L"
    np.testing.assert_array_equal(pixels[1], grey[1, :, :, 0])
    # Channel counts a PNG cannot hold are written as arrays.
    five = random_images(1, c=5, seed=2)
    save_image_files(five, [3], tmp_path / "five")
    np.testing.assert_array_equal(np.load(tmp_path / "five" / "000000_3.npy"), five[0])
    # Without --save_images no folder appears (the reference's output).
    save_samples(images, None, tmp_path / "plain")
    assert sorted(os.listdir(tmp_path / "plain")) == ["samples_3x6x5x3.npz", "samples_3x6x5x3.png"]


def test_npz_to_images_matches_save_images_and_replaces_only_its_own_files(tmp_path):
    images, labels = random_images(5, seed=3), np.array([1, 2, 3, 4, 5])
    np.savez(tmp_path / "s.npz", images, labels)
    (tmp_path / "s").mkdir()
    # An earlier, longer result's sample file, and the user's own files.
    (tmp_path / "s" / "000007_2.png").write_bytes(b"old")
    (tmp_path / "s" / "notes.txt").write_text("mine")
    (tmp_path / "s" / "best.png").write_bytes(b"mine too")
    folder, count = npz_to_image_files(str(tmp_path / "s.npz"), batch_size=2, limit=4)
    assert count == 4 and folder == str(tmp_path / "s")
    assert sorted(os.listdir(folder)) == sorted(
        [f"{i:06d}_{i + 1}.png" for i in range(4)] + ["notes.txt", "best.png"])
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    names, pixels = read_folder(folder, pattern="0*.png")
    for got, want in zip(pixels, images):
        np.testing.assert_array_equal(got, want)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left


def test_npz_to_images_cli_and_a_png_given_for_an_npz(tmp_path):
    images = random_images(2, seed=4)
    np.savez(tmp_path / "s.npz", images)
    Image.fromarray(images[0]).save(tmp_path / "x.png")
    script = os.path.join(REPO, "scripts", "npz_to_images.py")
    run = lambda *a: subprocess.run([sys.executable, script, *map(str, a)], env=child_env(cpu=True),
                                    capture_output=True, text=True, timeout=120)
    ok = run(tmp_path / "s.npz", "--out_dir", tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["000000.png", "000001.png"]
    bad = run(tmp_path / "x.png")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1
    assert "is a PNG image" in lines[0] and "pickle" not in lines[0]
    assert not (tmp_path / "x").exists()
    # The same clear line where the DDIM tools and super-resolution read an npz.
    with pytest.raises(ScriptError, match="is a PNG image"):
        read_image_npz(str(tmp_path / "x.png"), 5)


def test_default_labels_are_the_reference_draw(cpu_only):
    torch.manual_seed(3)
    got = [ClassLabels(10, 4)() for _ in range(2)]
    torch.manual_seed(3)
    want = [torch.randint(low=0, high=10, size=(4,)) for _ in range(2)]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_fixed_and_balanced_labels_draw_nothing_random(cpu_only, monkeypatch):
    state = torch.get_rng_state()
    assert ClassLabels(10, 3, class_label=4)().tolist() == [4, 4, 4]
    # Balanced over 2 ranks of batch 3: sample i of the gathered run gets label i % 4.
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    gathered = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist_util, "get_rank", lambda rank=rank: rank)
        labels = ClassLabels(4, 3, balanced=True)
        gathered[rank] = [labels().tolist() for _ in range(2)]
    run = [x for rnd in range(2) for rank in (0, 1) for x in gathered[rank][rnd]]
    assert run == [i % 4 for i in range(12)]
    assert np.bincount(run).tolist() == [3, 3, 3, 3]
    assert torch.equal(torch.get_rng_state(), state)


def test_label_choices_refused_in_one_line():
    with pytest.raises(ScriptError, match="--class_label 10 is out of range.*0 to 9"):
        ClassLabels(10, 2, class_label=10)
    with pytest.raises(ScriptError, match="exclude each other"):
        ClassLabels(10, 2, class_label=1, balanced=True)

    class Args:
        num_classes, batch_size, class_label, balanced_labels = 10, 2, 3, False

    with pytest.raises(ScriptError, match="--class_cond True"):
        loop.class_labels(Args(), class_cond=False)


def test_eta_reaches_ddim_and_is_refused_elsewhere():
    diffusion = create_gaussian_diffusion(steps=40, timestep_respacing="ddim5")
    flags = dict(diffusion_steps=40, noise_schedule="linear", learn_sigma=False, use_kl=False,
                 predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
    model = lambda x, t, **kw: 0.1 * x
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(fn, **kw):
        torch.manual_seed(1)
        return fn(model, (2, 1, 4, 4), noise=noise.clone(), **kw)

    plain = run(make_sample_fn("ddim", diffusion, flags))
    assert torch.equal(plain, run(make_sample_fn("ddim", diffusion, flags, eta=0.0)))
    noisy = run(make_sample_fn("ddim", diffusion, flags, eta=1.0))
    assert torch.equal(noisy, run(diffusion.ddim_sample_loop, eta=1.0))
    assert not torch.equal(noisy, plain)
    with pytest.raises(ScriptError, match="--use_ddim True"):
        make_sample_fn("ddpm", diffusion, flags, eta=0.5)
    with pytest.raises(ScriptError, match="at least 0"):
        make_sample_fn("ddim", diffusion, flags, eta=-1.0)
