"""Image folders: file order, classes, sharding, crops, flips, batches and clear errors."""

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import dist_util, image_datasets
from guided_diffusion.image_datasets import (
    ImageDataset,
    UnreadableImageError,
    center_crop_arr,
    class_labels_from_paths,
    list_image_files_recursively,
    load_data,
    random_crop_arr,
)


def solid(path, color, size=(12, 10)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def gradient_image(width, height, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    for rel in ["b.PNG", "a.png", "sub/z.jpeg", "sub/deeper/y.JPG", "c.gif", "a/x.jpg"]:
        solid(tmp_path / rel, (1, 2, 3))
    for rel in ["notes.txt", "sub/model.pt", "noext", "d.webm"]:
        (tmp_path / rel).write_text("x")
    found = [os.path.relpath(p, tmp_path) for p in list_image_files_recursively(str(tmp_path))]
    # Entries of each folder in sorted order, sub-folders expanded where they sort.
    assert found == ["a/x.jpg", "a.png", "b.PNG", "c.gif", "sub/deeper/y.JPG", "sub/z.jpeg"]


def test_class_labels_from_file_names():
    paths = ["d/b_1.png", "d/a_2.png", "d/sub/b_3.jpg", "d/c_x_y.png", "d/10_a.png", "d/9_b.png"]
    labels, names = class_labels_from_paths(paths)
    assert names == ["10", "9", "a", "b", "c"]  # sorted as strings
    assert labels == [3, 2, 3, 4, 0, 1]


def test_class_cond_without_underscore_is_a_clear_error():
    with pytest.raises(ValueError, match="'nolabel.png'.*--class_cond False"):
        class_labels_from_paths(["d/a_1.png", "d/nolabel.png"])


def test_dataset_shards_items_and_labels(tmp_path):
    paths = [solid(tmp_path / f"c{i % 2}_{i}.png", (255, 0, 127)) for i in range(7)]
    ds = ImageDataset(8, paths, classes=list(range(7)), shard=1, num_shards=3, random_flip=False)
    assert ds.local_images == [paths[1], paths[4]]
    assert len(ds) == 2
    arr, out = ds[1]
    assert arr.dtype == np.float32 and arr.shape == (3, 8, 8)
    np.testing.assert_allclose(arr[0], 1.0)
    np.testing.assert_allclose(arr[1], -1.0)
    np.testing.assert_allclose(arr[2], 127 / 127.5 - 1, rtol=1e-6)
    assert out["y"].dtype == np.int64 and int(out["y"]) == 4
    assert ImageDataset(8, paths)[0][1] == {}


def test_center_crop_halves_with_box_then_bicubic():
    image = gradient_image(256, 200)
    # 200 >= 2*32 twice: 256x200 -> 128x100 -> 64x50, then bicubic to short side 32 (41x32),
    # then the central 32 columns starting at (41 - 32) // 2 = 4.
    want = image.resize((128, 100), Image.BOX).resize((64, 50), Image.BOX)
    want = np.array(want.resize((41, 32), Image.BICUBIC))[:, 4:36]
    got = center_crop_arr(image, 32)
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, want)


def test_center_crop_upscales_small_images():
    image = gradient_image(10, 6)
    got = center_crop_arr(image, 12)
    want = np.array(image.resize((20, 12), Image.BICUBIC))[:, 4:16]
    np.testing.assert_array_equal(got, want)


def test_random_crop_is_a_window_of_an_allowed_rescale():
    image = gradient_image(50, 36, seed=1)  # short side < 2 * 20: no BOX halving
    random.seed(0)
    sides_seen = set()
    for _ in range(12):
        got = random_crop_arr(image, 20)
        assert got.shape == (20, 20, 3)
        # Short side in [ceil(20 / 1.0), ceil(20 / 0.8)] = [20, 25]; find which one was used.
        matches = []
        for side in range(20, 26):
            scaled = np.array(image.resize((round(50 * side / 36), side), Image.BICUBIC))
            for top in range(scaled.shape[0] - 19):
                for left in range(scaled.shape[1] - 19):
                    if np.array_equal(scaled[top : top + 20, left : left + 20], got):
                        matches.append(side)
        assert matches, "crop is not a window of any allowed rescale"
        sides_seen.update(matches)
    assert len(sides_seen) > 1  # the scale really varies


def test_random_flip_mirrors_about_half_the_time(tmp_path):
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = 255  # left half white
    path = tmp_path / "half.png"
    Image.fromarray(arr).save(path)
    random.seed(1)
    flipped = ImageDataset(8, [str(path)], random_flip=True)
    lefts = [flipped[0][0][0, 0, 0] for _ in range(200)]
    n_mirrored = sum(v < 0 for v in lefts)
    assert 70 < n_mirrored < 130
    still = ImageDataset(8, [str(path)], random_flip=False)
    assert all(still[0][0][0, 0, 0] == 1.0 for _ in range(20))


def make_labelled_folder(folder, n=6):
    folder.mkdir(exist_ok=True)
    # Class "a" is black, "b" is white, so labels can be checked against pixels.
    for i in range(n):
        name = "ab"[i % 2]
        solid(folder / f"{name}_{i}.png", (0, 0, 0) if name == "a" else (255, 255, 255))
    return folder


def test_load_data_batches_forever_with_labels(tmp_path):
    data_dir = make_labelled_folder(tmp_path / "data", n=5)
    torch.manual_seed(0)
    batches = load_data(data_dir=str(data_dir), batch_size=2, image_size=8, class_cond=True)
    seen = 0
    for _ in range(5):  # 5 images, batch 2, drop_last: 2 batches per epoch, so this wraps twice
        images, kwargs = next(batches)
        assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        assert kwargs["y"].dtype == torch.int64
        # label 0 = "a" = black (-1), label 1 = "b" = white (+1)
        assert torch.equal(images[:, 0, 0, 0], kwargs["y"].float() * 2 - 1)
        seen += 1
    assert seen == 5
    images, kwargs = next(load_data(data_dir=str(data_dir), batch_size=2, image_size=8))
    assert kwargs == {}


def test_load_data_deterministic_order_and_rank_sharding(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Grey level encodes the file index; file names sort in index order.
    for i in range(6):
        solid(data_dir / f"x_{i}.png", (i * 40,) * 3)
    monkeypatch.setattr(dist_util, "get_rank", lambda: 1)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    batches = load_data(
        data_dir=str(data_dir), batch_size=3, image_size=4, deterministic=True, random_flip=False
    )
    images, _ = next(batches)
    grey = ((images[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert grey == [40.0, 120.0, 200.0]  # files 1, 3, 5


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="unspecified data directory"):
        load_data(data_dir="", batch_size=1, image_size=8)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_data(data_dir=str(tmp_path / "does_not_exist"), batch_size=1, image_size=8)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8)


def test_fewer_images_than_batch_size(tmp_path):
    data_dir = make_labelled_folder(tmp_path / "data", n=3)
    with pytest.raises(ValueError, match="3 images.*batch_size is 4"):
        load_data(data_dir=str(data_dir), batch_size=4, image_size=8)


def test_class_cond_with_unlabelled_files(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    solid(data_dir / "plain.png", (0, 0, 0))
    with pytest.raises(ValueError, match="plain.png"):
        load_data(data_dir=str(data_dir), batch_size=1, image_size=8, class_cond=True)


def test_truncated_image_names_the_file_in_one_line(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    good = solid(data_dir / "a_good.png", (9, 9, 9), size=(64, 64))
    broken = data_dir / "b_broken.png"
    payload = open(good, "rb").read()
    broken.write_bytes(payload[: len(payload) // 2])
    batches = load_data(data_dir=str(data_dir), batch_size=2, image_size=8)
    with pytest.raises(UnreadableImageError) as info:
        next(batches)
    message = str(info.value)
    assert "b_broken.png" in message
    assert "\n" not in message and "Traceback" not in message

    (data_dir / "b_broken.png").write_text("this is text, not a PNG")
    with pytest.raises(UnreadableImageError, match="b_broken.png"):
        image_datasets.ImageDataset(8, [str(data_dir / "b_broken.png")])[0]


def test_fewer_classes_than_num_classes_warns_once_naming_the_flag(tmp_path, monkeypatch, capsys):
    from guided_diffusion import logger

    monkeypatch.setattr(image_datasets, "_WARNED_CLASS_COUNTS", set())
    (tmp_path / "data").mkdir()
    for name in ("circle_0", "circle_1", "cross_0", "square_0", "triangle_0"):
        solid(tmp_path / "data" / f"{name}.png", (9, 9, 9))
    logger.configure(dir=str(tmp_path / "log"), format_strs=["stdout"])
    try:
        names = image_datasets.check_dataset_classes(str(tmp_path / "data"), 1000)
        image_datasets.check_dataset_classes(str(tmp_path / "data"), 1000)  # e.g. the val folder
        assert image_datasets.check_dataset_classes(str(tmp_path / "data"), 4) == names
    finally:
        logger.reset()
    assert names == ["circle", "cross", "square", "triangle"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: {tmp_path / 'data'} has 4 classes but --num_classes is 1000: 996 labels never "
        "appear in training, yet sampling draws from all 1000; pass --num_classes 4 (unless "
        "classes come later)"
    ]
    with pytest.raises(ValueError, match="has 4 classes but the model has 3 labels: pass --num_classes 4"):
        image_datasets.check_dataset_classes(str(tmp_path / "data"), 3)
