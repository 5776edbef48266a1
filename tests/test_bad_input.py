"""Bad input that used to get a traceback or a misleading line, each refused before any work with
one line naming the fix (in-process runs of the scripts, untrained toy checkpoints)."""

import os

import pytest
import torch

from guided_diffusion.cli.hints import explain_state_dict_mismatch
from guided_diffusion.data.digits import write_digits
from guided_diffusion.runtime import train_state
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

from test_scripts import error_line, run_inprocess

pytestmark = pytest.mark.usefixtures("cpu_only")

TOY = dict(num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=16)
TOY_FLAGS = ["--num_channels", 32, "--num_res_blocks", 1, "--channel_mult", "1,2",
             "--num_head_channels", 16]
CLASSIFIER = dict(classifier_width=32, classifier_depth=1, classifier_channel_mult="1,2",
                  classifier_attention_resolutions="8")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("bad_input") / "digits"), image_size=16,
                        limit=12)


def test_an_image_size_the_levels_cannot_halve_is_one_line(digits, tmp_path, capsys):
    # Two levels halve the image once: 7 cannot be halved (the first forward pass would fail
    # deep inside torch when the way up meets the way down).
    line = error_line(capsys, run_inprocess("image_train", [
        "--data_dir", tmp_path / "unused", "--image_size", 7, *TOY_FLAGS,
        "--attention_resolutions", 7, "--log_dir", tmp_path / "log"]))
    assert line == ("error: --image_size 7 does not fit --channel_mult 1,2: its 2 levels halve "
                    "the image 1 time(s), so the size must be a multiple of 2: pass --image_size "
                    "6 or 8, or a --channel_mult with fewer levels")
    line = error_line(capsys, run_inprocess("classifier_train", [
        "--data_dir", digits, "--num_classes", 10, "--image_size", 12,
        "--classifier_channel_mult", "1,2,2,2", "--log_dir", tmp_path / "log"]))
    assert "--image_size 12 does not fit --classifier_channel_mult 1,2,2,2" in line
    assert "multiple of 8: pass --image_size 8 or 16" in line


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", 0], "--batch_size must be at least 1, got 0"),
    (["--batch_size", -1], "--batch_size must be at least 1, got -1"),
    (["--num_samples", 0], "--num_samples must be at least 1, got 0"),
])
def test_sample_counts_below_one_are_refused_before_the_model_is_read(flags, message, tmp_path,
                                                                      capsys):
    # The model file does not exist: the counts are refused before it is even looked for.
    log = tmp_path / "log"
    line = error_line(capsys, run_inprocess("image_sample", [
        "--model_path", tmp_path / "missing.pt", "--image_size", 16, *TOY_FLAGS, *flags,
        "--log_dir", log]))
    assert line == f"error: {message}"
    assert not log.exists()


def test_an_unwritable_out_dir_is_refused_before_sampling(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    log = tmp_path / "log"
    for script in ("image_sample", "classifier_sample", "super_res_sample"):
        line = error_line(capsys, run_inprocess(script, [
            "--model_path", tmp_path / "missing.pt", "--out_dir", blocker / "samples",
            "--log_dir", log]))
        assert line.startswith(f"error: cannot write to --out_dir {blocker / 'samples'} (")
        assert "pass a folder you can write to" in line
    assert not log.exists() and os.listdir(tmp_path) == ["a_file"]


def test_files_that_hold_something_else_are_named(tmp_path, capsys):
    flags = dict(model_and_diffusion_defaults(), image_size=16, attention_resolutions="8", **TOY)
    torch.save(create_model_and_diffusion(**flags)[0].state_dict(), tmp_path / "model.pt")
    cflags = dict(classifier_defaults(), image_size=16, num_classes=10, **CLASSIFIER)
    torch.save(create_classifier(**cflags).state_dict(), tmp_path / "classifier.pt")
    torch.save(train_state.gather(3), tmp_path / "state000003.pt")
    model_args = ["--image_size", 16, *TOY_FLAGS, "--attention_resolutions", 8,
                  "--num_samples", 1, "--batch_size", 1, "--timestep_respacing", 2,
                  "--log_dir", tmp_path / "log"]

    line = error_line(capsys, run_inprocess("image_sample", [
        "--model_path", tmp_path / "state000003.pt", *model_args]))
    assert "this is a training-state file (stateNNNNNN.pt" in line
    assert "pass the modelNNNNNN.pt or ema_<rate>_NNNNNN.pt file beside it" in line

    line = error_line(capsys, run_inprocess("image_sample", [
        "--model_path", tmp_path / "classifier.pt", *model_args]))
    assert "holds a noisy-image classifier (trained by classifier_train.py), not a diffusion " \
           "model: give it as --classifier_path" in line

    classifier_args = ["--classifier_width", 32, "--classifier_depth", 1,
                       "--classifier_channel_mult", "1,2", "--classifier_attention_resolutions",
                       8, "--num_classes", 10]
    line = error_line(capsys, run_inprocess("classifier_sample", [
        "--model_path", tmp_path / "model.pt", "--classifier_path", tmp_path / "model.pt",
        *model_args, *classifier_args]))
    assert "does not fit the classifier flags: this file holds a diffusion model (a UNet), not " \
           "a noisy-image classifier" in line
    assert not (tmp_path / "log").exists()


def test_a_wrong_image_size_names_the_size_each_fix_means(tmp_path, capsys):
    # Trained at 8x8 with attention at 4x4 maps (--attention_resolutions 4); sampled with
    # --image_size 16, attention_resolutions 4 would mean 4x4 maps of a 16x16 image, a level this
    # network does not have. Both --image_size 8 and --attention_resolutions 8 make the weights
    # fit: only the first samples at the size the model learnt.
    flags = dict(model_and_diffusion_defaults(), image_size=8, attention_resolutions="4", **TOY)
    torch.save(create_model_and_diffusion(**flags)[0].state_dict(), tmp_path / "model8.pt")
    line = error_line(capsys, run_inprocess("image_sample", [
        "--model_path", tmp_path / "model8.pt", "--image_size", 16, *TOY_FLAGS,
        "--attention_resolutions", 4, "--num_samples", 1, "--batch_size", 1,
        "--log_dir", tmp_path / "log"]))
    assert ("pass --image_size 8 (for a model trained at 8x8) or pass --attention_resolutions 8 "
            "(for a model trained at 16x16)") in line


def test_a_classifier_mismatch_is_told_in_classifier_flags(tmp_path):
    flags = dict(classifier_defaults(), image_size=16, num_classes=1000, **CLASSIFIER)
    trained = create_classifier(**dict(flags, num_classes=10, classifier_depth=2)).state_dict()
    # Without the flags to search, the count read off the head, and the classifier's own flags
    # to check for the rest.
    hint = explain_state_dict_mismatch(create_classifier(**flags), trained)
    assert hint.startswith("pass --num_classes 10 (other flags may differ too: check "
                           "--classifier_depth, --classifier_channel_mult/--image_size, ")
    assert "--num_res_blocks" not in hint and "--num_heads" not in hint


def test_a_missing_val_data_dir_is_named_before_the_model_is_built(digits, tmp_path, capsys):
    line = error_line(capsys, run_inprocess("classifier_train", [
        "--data_dir", digits, "--val_data_dir", tmp_path / "no_such_folder", "--image_size", 16,
        "--classifier_width", 32, "--classifier_depth", 1, "--classifier_channel_mult", "1,2",
        "--classifier_attention_resolutions", 8, "--num_classes", 10, "--log_dir",
        tmp_path / "log"]))
    assert line == (f"error: data directory not found: {tmp_path / 'no_such_folder'} "
                    "(check --val_data_dir)")
    # Refused before the run started: the log folder it made is removed again.
    assert not (tmp_path / "log").exists()
