"""
Issue 23, grey and N-channel data and rectangles: --in_channels through the networks, the data
loader and the scripts (a grey digits model trains and samples end to end), .npy data, rectangular
--image_size H,W, image_train's augmentation flags, and the one-line refusals."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.data.digits import digits_arrays
from guided_diffusion.errors import ImageChannelsError
from guided_diffusion.image_datasets import ImageDataset, center_crop_arr, load_data
from guided_diffusion.script_util import create_classifier, create_model, sr_create_model
from guided_diffusion.unet import AttentionBlock

from test_scripts import error_line, run_inprocess

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

MODEL = ("--num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
         "--num_head_channels 16 --diffusion_steps 50 --learn_sigma True --class_cond True "
         "--num_classes 10").split()


@pytest.fixture(scope="module")
def grey_digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grey")
    images, labels = digits_arrays(8, limit=24)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"{label}_{i:03d}.png")  # mode "L"
    return folder


def test_networks_take_the_channel_count():
    flags = dict(channel_mult="1,2", attention_resolutions="4", num_head_channels=16,
                 learn_sigma=True)
    grey = create_model(8, 32, 1, in_channels=1, **flags)
    assert grey.input_blocks[0][0].weight.shape[1] == 1 and grey.out[2].weight.shape[0] == 2
    assert grey(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 2, 8, 8)
    five = create_model(8, 32, 1, in_channels=5, **flags)
    assert five(torch.randn(1, 5, 8, 8), torch.tensor([1])).shape == (1, 10, 8, 8)
    classifier = create_classifier(8, False, 32, 1, "4", True, True, "attention", num_classes=3,
                                   classifier_channel_mult="1,2", in_channels=1)
    assert classifier(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 3)
    sr = sr_create_model(16, 8, 32, 1, False, False, False, "4", 4, 16, -1, True, 0.0, False,
                         False, channel_mult="1,2", in_channels=1)
    out = sr(torch.randn(1, 1, 16, 16), torch.tensor([1]), low_res=torch.randn(1, 1, 8, 8))
    assert sr.input_blocks[0][0].weight.shape[1] == 2 and out.shape == (1, 1, 16, 16)


def test_grey_validation_data_is_read_with_the_models_channels(grey_digits, tmp_path):
    # The validation subset goes through the training loader's channel handling: read as RGB,
    # it would not fit a 1-channel model.
    assert run_inprocess("image_train", ["--data_dir", grey_digits, "--image_size", 8, *MODEL,
                                         "--in_channels", 1, "--batch_size", 4, "--max_steps", 1,
                                         "--val_data_dir", grey_digits, "--val_interval", 1,
                                         "--val_num_images", 4, "--log_dir", tmp_path]) == 0
    assert "val_loss" in (tmp_path / "progress.csv").read_text().splitlines()[0]


def test_the_ddim_tools_take_grey_models(grey_digits, tmp_path):
    train = tmp_path / "train"
    assert run_inprocess("image_train", ["--data_dir", grey_digits, "--image_size", 8, *MODEL,
                                         "--in_channels", 1, "--batch_size", 4, "--max_steps", 1,
                                         "--log_dir", train]) == 0
    tool = ["--model_path", train / "model000001.pt", "--image_size", 8, *MODEL,
            "--in_channels", 1, "--progress", False]
    assert run_inprocess("ddim_invert", [*tool, "--input", grey_digits, "--num_images", 4,
                                         "--steps", "2,3", "--log_dir", tmp_path / "inv"]) == 0
    with np.load(tmp_path / "inv" / "latents.npz") as npz:
        assert npz["x_T"].shape == (4, 1, 8, 8)
    latents = ["--latents", tmp_path / "inv" / "latents.npz"]
    assert run_inprocess("ddim_consistency", [*tool, *latents, "--steps", "2,3",
                                              "--log_dir", tmp_path / "cons"]) == 0
    with np.load(tmp_path / "cons" / "consistency.npz") as npz:
        assert npz["arr_0"].shape == (8, 8, 8, 1)
    assert run_inprocess("ddim_interpolate", [*tool, "--num_pairs", 1, "--num_points", 3,
                                              "--steps", 2, "--log_dir", tmp_path / "interp"]) == 0
    with np.load(tmp_path / "interp" / "interpolation.npz") as npz:
        assert npz["arr_0"].shape == (3, 8, 8, 1)
    # An explicit --in_channels 3 contradicts the checkpoint: one line, and no log folder.
    refused = [*tool, "--in_channels", 3, "--input", grey_digits, "--steps", 2,
               "--log_dir", tmp_path / "refused"]
    assert run_inprocess("ddim_invert", refused) == 2
    assert not (tmp_path / "refused").exists()


def test_grey_digits_train_and_sample_end_to_end(grey_digits, tmp_path, capsys):
    train = tmp_path / "train"
    assert run_inprocess("image_train", ["--data_dir", grey_digits, "--image_size", 8, *MODEL,
                                         "--in_channels", 1, "--batch_size", 4, "--max_steps", 2,
                                         "--log_dir", train]) == 0
    state = torch.load(train / "model000002.pt", weights_only=True)
    assert state["input_blocks.0.0.weight"].shape[1] == 1 and state["out.2.weight"].shape[0] == 2
    out = tmp_path / "samples"
    sample = ["--model_path", train / "model000002.pt", "--image_size", 8, *MODEL,
              "--timestep_respacing", 3, "--num_samples", 3, "--batch_size", 3, "--seed", 1,
              "--progress", False, "--log_dir", out]
    assert run_inprocess("image_sample", [*sample, "--in_channels", 1, "--save_images", True,
                                          "--class_label", 2]) == 0
    with np.load(out / "samples_3x8x8x1.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and labels.tolist() == [2, 2, 2]
    folder = out / "samples_3x8x8x1"
    assert sorted(os.listdir(folder)) == ["000000_2.png", "000001_2.png", "000002_2.png"]
    with Image.open(folder / "000001_2.png") as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.array(png), images[1, :, :, 0])
    # The grey checkpoint sampled with the default 3 channels (as a checkpoint without its run's
    # args.json, which would supply --in_channels): one line naming the fix.
    line = error_line(capsys, run_inprocess("image_sample", [*sample, "--config", "none",
                                                             "--log_dir", tmp_path / "no"]))
    assert "--in_channels 1" in line and not (tmp_path / "no").exists()
    line = error_line(capsys, run_inprocess("image_sample", [*sample, "--in_channels", 1,
                                                              "--class_label", 10]))
    assert "--class_label 10 is out of range" in line


def test_rectangles_train_and_sample(grey_digits, tmp_path, capsys):
    train = tmp_path / "train"
    assert run_inprocess("image_train", [
        "--data_dir", grey_digits, "--image_size", "8,16", *MODEL, "--in_channels", 1,
        "--batch_size", 4, "--max_steps", 1, "--log_dir", train]) == 0
    assert run_inprocess("image_sample", [
        "--model_path", train / "model000001.pt", "--image_size", "8,16", *MODEL,
        "--in_channels", 1, "--timestep_respacing", 2, "--num_samples", 2, "--batch_size", 2,
        "--progress", False, "--balanced_labels", True, "--log_dir", tmp_path]) == 0
    with np.load(tmp_path / "samples_2x8x16x1.npz") as npz:
        assert npz["arr_0"].shape == (2, 8, 16, 1) and npz["arr_1"].tolist() == [0, 1]
    line = error_line(capsys, run_inprocess("image_train", [
        "--data_dir", grey_digits, "--image_size", "10,16", *MODEL, "--channel_mult", "1,2,2,2",
        "--in_channels", 1, "--max_steps", 1, "--log_dir", tmp_path / "bad"]))
    assert "divisible by 8" in line and "10" in line


def test_a_rectangle_keeps_the_square_layers_of_its_shorter_side():
    flags = dict(channel_mult="1,2", attention_resolutions="8", num_head_channels=16)
    square = create_model(16, 32, 1, **flags)
    wide = create_model((16, 32), 32, 1, **flags)
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert shapes(wide) == shapes(square)  # attention at 16 // 8 = rate 2, as for the square
    assert any(isinstance(m, AttentionBlock) for m in wide.input_blocks[3])  # level 2 (rate 2)
    assert wide(torch.randn(1, 3, 16, 32), torch.tensor([5])).shape == (1, 3, 16, 32)
    pooled = create_classifier((16, 32), False, 32, 1, "8", True, True, "attention", num_classes=2,
                               classifier_channel_mult="1,2")
    assert pooled(torch.randn(2, 3, 16, 32), torch.tensor([1, 2])).shape == (2, 2)


def test_rectangle_crop_covers_then_cuts_the_centre():
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, size=(30, 40, 3), dtype=np.uint8))  # 40 wide
    # Cover 8x16 (H x W): both sides are at least twice the target, so one BOX halving (20x15),
    # then bicubic by max(16/20, 8/15) = 0.8 to 16x12, then rows (12 - 8) // 2 = 2.. of it.
    want = np.array(image.resize((20, 15), Image.BOX).resize((16, 12), Image.BICUBIC))[2:10]
    np.testing.assert_array_equal(center_crop_arr(image, (8, 16)), want)


def test_grey_colour_and_npy_data(tmp_path):
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    grey.save(tmp_path / "a_0.png")
    item, _ = ImageDataset(8, [str(tmp_path / "a_0.png")], random_flip=False, in_channels=1)[0]
    assert item.shape == (1, 8, 8)
    np.testing.assert_array_equal(item[0], np.arange(64, dtype=np.float32).reshape(8, 8) / 127.5 - 1)
    # The reference's behaviour stays the default: grey files become RGB.
    assert ImageDataset(8, [str(tmp_path / "a_0.png")], random_flip=False)[0][0].shape == (3, 8, 8)
    colour = tmp_path / "b_1.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(colour)
    with pytest.raises(ImageChannelsError, match="b_1.png is a colour image.*--in_channels 3"):
        ImageDataset(8, [str(colour)], in_channels=1)[0]
    four = np.random.RandomState(2).randint(0, 256, (8, 8, 4), dtype=np.uint8)
    np.save(tmp_path / "c_2.npy", four)
    item, _ = ImageDataset(8, [str(tmp_path / "c_2.npy")], random_flip=False, in_channels=4)[0]
    # The pixels' float32 mapping, as for picture files.
    np.testing.assert_array_equal(item, four.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    floats = np.linspace(-1, 1, 128, dtype=np.float32).reshape(8, 8, 2)
    np.save(tmp_path / "d_3.npy", floats)
    item, _ = ImageDataset(8, [str(tmp_path / "d_3.npy")], random_flip=False, in_channels=2)[0]
    np.testing.assert_array_equal(item, floats.transpose(2, 0, 1))
    with pytest.raises(ImageChannelsError, match="c_2.npy has 4 channels.*--in_channels 4"):
        ImageDataset(8, [str(tmp_path / "c_2.npy")], in_channels=2)[0]


def test_a_folder_of_mixed_channels_stops_training_in_one_line(grey_digits, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in sorted(os.listdir(grey_digits))[:6]:
        (mixed / name).write_bytes((grey_digits / name).read_bytes())
    Image.fromarray(np.random.RandomState(3).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        mixed / "1_colour.png")
    log = tmp_path / "log"
    line = error_line(capsys, run_inprocess("image_train", [
        "--data_dir", mixed, "--image_size", 8, *MODEL, "--in_channels", 1, "--batch_size", 7,
        "--max_steps", 1, "--log_dir", log]))
    assert "1_colour.png is a colour image" in line
    assert not [n for n in os.listdir(log) if n.endswith(".pt")]  # nothing saved half


def test_image_train_passes_its_augmentation_flags(grey_digits, tmp_path, monkeypatch):
    import guided_diffusion.image_datasets as image_datasets

    seen = {}
    real = image_datasets.load_data

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(image_datasets, "load_data", spy)
    base = ["--data_dir", grey_digits, "--image_size", 8, *MODEL, "--in_channels", 1,
            "--batch_size", 4, "--max_steps", 1, "--save_interval", 100]
    assert run_inprocess("image_train", [*base, "--log_dir", tmp_path / "a"]) == 0
    assert seen["random_flip"] is True and seen["random_crop"] is False  # the reference's
    assert run_inprocess("image_train", [*base, "--random_flip", False, "--random_crop", True,
                                         "--log_dir", tmp_path / "b"]) == 0
    assert seen["random_flip"] is False and seen["random_crop"] is True
    # Without flips and crops a deterministic stream gives the centre-cropped files themselves.
    data = load_data(data_dir=str(grey_digits), batch_size=2, image_size=8, deterministic=True,
                     random_flip=False, in_channels=1)
    batch, _ = next(data)
    first = sorted(os.listdir(grey_digits))
    wanted = {np.array(Image.open(grey_digits / n)).tobytes() for n in first}
    for image in batch:
        assert ((image[0].numpy() + 1) * 127.5).round().astype(np.uint8).tobytes() in wanted
