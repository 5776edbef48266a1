"""The real-digits judge (accuracy, precision/recall, FID, within-class spread on its features),
the by-class grid, and scripts/guidance_sweep.py end to end at toy size."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from guidance_eval import RealDigitsJudge, grid_by_class, within_class_spread
from guided_diffusion.script_util import (
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def judge():
    return RealDigitsJudge(8, steps=300, seed=0)


def test_judge_recognises_real_digits_and_rejects_noise(judge):
    assert judge.heldout_accuracy > 0.85
    split = int(0.8 * len(judge.real_u8))
    real, labels = judge.real_u8[split:], judge.real_labels[split:]
    good = judge.metrics(real, labels)
    assert good["accuracy"] == pytest.approx(judge.heldout_accuracy)
    assert good["precision"] > 0.8 and good["recall"] > 0.5
    assert 0.7 < good["spread"] < 1.3
    # Every real digit shown for the wrong class: same images and features, accuracy collapses.
    assert judge.accuracy(real, (labels + 1) % 10) < 0.1
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    bad = judge.metrics(noise, labels)
    assert bad["fid"] > 5 * good["fid"] and bad["precision"] < good["precision"]
    # One image repeated: no diversity at all.
    same = judge.metrics(np.repeat(real[:1], len(real), axis=0), labels)
    assert same["spread"] < 0.01 and same["recall"] < good["recall"]
    with pytest.raises(ValueError, match="image_size=16"):
        judge.accuracy(np.zeros((2, 16, 16, 3), np.uint8), [0, 1])


def test_within_class_spread():
    features = np.array([[0, 0], [2, 0], [10, 10], [10, 14], [99, 99]], dtype=float)
    classes = np.array([0, 0, 1, 1, 2])  # class 2 has one member and is left out
    # RMS distances to the class means: 1 and 2.
    assert within_class_spread(features, classes) == pytest.approx(1.5)
    assert np.isnan(within_class_spread(features[:1], classes[:1]))


def test_grid_by_class_puts_each_requested_class_on_its_row():
    images = np.stack([np.full((2, 2, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    labels = np.array([2, 0, 2, 1, 2])
    grid = grid_by_class(images, labels, num_classes=3, upscale=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 3 * 5 + 1, 1)
    tile = lambda row, col: grid[1 + 5 * row : 5 + 5 * row, 1 + 5 * col : 5 + 5 * col, 0]
    assert (tile(0, 0) == 20).all() and (tile(1, 0) == 40).all()
    assert [tile(2, c)[0, 0] for c in range(3)] == [10, 30, 50]
    assert (tile(0, 1) == 0).all()  # class 0 has one sample: black padding after it


MODEL = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
         "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 50").split()
CLASSIFIER = ("--classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2 "
              "--classifier_attention_resolutions 4").split()


def test_guidance_sweep_end_to_end(tmp_path):
    torch.manual_seed(0)
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", num_head_channels=16, diffusion_steps=50)
    for name, cond in (("cond", True), ("uncond", False)):
        model, _ = create_model_and_diffusion(**dict(flags, class_cond=cond), num_classes=10)
        with torch.no_grad():  # the output layer starts at zero; untrained, but not degenerate
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.save(model.state_dict(), tmp_path / f"{name}.pt")
    classifier = create_classifier(
        8, False, 32, 1, "4", True, True, "attention", num_classes=10, classifier_channel_mult="1,2"
    )
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "experiments",
                                                                         "guidance_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    args = [*MODEL, *CLASSIFIER, "--cond_model_path", tmp_path / "cond.pt",
            "--uncond_model_path", tmp_path / "uncond.pt", "--classifier_path",
            tmp_path / "classifier.pt", "--scales", "0,50", "--num_samples", 20,
            "--batch_size", 10, "--timestep_respacing", "ddim3", "--judge_steps", 30,
            "--out_dir", out]
    sweep.main([str(a) for a in args])
    table = json.loads((out / "sweep.json").read_text())
    rows = table["results"]
    assert [(r["model"], r["scale"]) for r in rows] == [
        ("conditional", 0.0), ("conditional", 50.0), ("unconditional", 0.0), ("unconditional", 50.0)]
    for row in rows:
        assert row["num_samples"] == 20 and 0 <= row["accuracy"] <= 1
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert np.isfinite(row["fid"]) and row["spread"] >= 0
    assert Image.open(out / "sweep.png").size[0] > 400
    grids = {p: np.asarray(Image.open(out / "grids" / p)) for p in sorted(os.listdir(out / "grids"))}
    assert sorted(grids) == ["conditional_scale0.png", "conditional_scale50.png",
                             "unconditional_scale0.png", "unconditional_scale50.png"]
    # Same noise and classes at every scale: the guidance gradient alone changed the samples.
    assert not np.array_equal(grids["conditional_scale0.png"], grids["conditional_scale50.png"])
    assert not np.array_equal(grids["unconditional_scale0.png"], grids["unconditional_scale50.png"])
    with pytest.raises(ValueError, match="--scales"):
        sweep.parse_scales("0,-1")
