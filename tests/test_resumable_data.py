"""Batch streams with a saveable position: load_data's and the cGAN's in-memory batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import dist_util
from guided_diffusion.cgan import array_batches
from guided_diffusion.image_datasets import load_data
from guided_diffusion.runtime.resumable_data import epoch_order


def grey_folder(folder, n):
    """n images whose grey level encodes their index (file names sort in index order)."""
    folder.mkdir()
    for i in range(n):
        arr = np.zeros((8, 8, 3), dtype=np.uint8)
        arr[:, :4] = 10 * i  # the left half only, so a flip is visible
        Image.fromarray(arr).save(folder / f"x_{i:02d}.png")
    return folder


def indices(images):
    """The image index of each image of a batch, and whether it was flipped."""
    left = ((images[:, 0, 0, 0] + 1) * 127.5).round() / 10
    right = ((images[:, 0, 0, -1] + 1) * 127.5).round() / 10
    return [(int(max(a, b)), bool(b > a)) for a, b in zip(left.tolist(), right.tolist())]


def take(stream, n):
    return [indices(next(stream)[0]) for _ in range(n)]


def test_epoch_order_is_a_pure_function_of_seed_rank_and_epoch():
    a = epoch_order(3, 0, 1, 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, epoch_order(3, 0, 1, 10)))
    assert sorted(a[0].tolist()) == list(range(10))
    for other in (epoch_order(4, 0, 1, 10), epoch_order(3, 1, 1, 10), epoch_order(3, 0, 2, 10)):
        assert not np.array_equal(a[0], other[0]) or not np.array_equal(a[1], other[1])
    order, seeds = epoch_order(3, 0, 1, 10, shuffle=False)
    assert order.tolist() == list(range(10)) and len(set(seeds.tolist())) == 10


def test_load_data_position_resumes_mid_epoch_and_across_epochs(tmp_path):
    data_dir = grey_folder(tmp_path / "data", 7)  # batch 3: two batches per epoch, one image left
    full = take(load_data(data_dir=str(data_dir), batch_size=3, image_size=8, seed=5), 7)
    # Every epoch is a permutation of the images, and the flips vary.
    first_epoch = [i for batch in full[:2] for i, _ in batch]
    assert len(set(first_epoch)) == 6
    assert {f for batch in full for _, f in batch} == {True, False}
    assert full[0:2] != full[2:4]  # reshuffled
    for stop in (1, 2, 3):  # mid-epoch, at an epoch's end, mid-epoch again
        stream = load_data(data_dir=str(data_dir), batch_size=3, image_size=8, seed=5)
        assert take(stream, stop) == full[:stop]
        saved = stream.state_dict()
        resumed = load_data(data_dir=str(data_dir), batch_size=3, image_size=8, seed=99)
        resumed.load_state_dict(saved)
        assert take(resumed, 7 - stop) == full[stop:]


def test_load_data_default_seed_follows_torch_seed_without_drawing(tmp_path):
    data_dir = grey_folder(tmp_path / "data", 6)
    torch.manual_seed(11)
    a = take(load_data(data_dir=str(data_dir), batch_size=2, image_size=8), 3)
    after = torch.rand(1)  # load_data drew nothing from torch's generator
    torch.manual_seed(11)
    assert torch.equal(torch.rand(1), after)
    torch.manual_seed(11)
    assert take(load_data(data_dir=str(data_dir), batch_size=2, image_size=8), 3) == a
    torch.manual_seed(12)
    assert take(load_data(data_dir=str(data_dir), batch_size=2, image_size=8), 3) != a


def test_ranks_shuffle_their_shards_independently(tmp_path, monkeypatch):
    data_dir = grey_folder(tmp_path / "data", 8)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist_util, "get_rank", lambda rank=rank: rank)
        stream = load_data(data_dir=str(data_dir), batch_size=4, image_size=8, seed=0)
        seen[rank] = [i for i, _ in indices(next(stream)[0])]
        assert stream.state_dict()["rank"] == rank
    assert sorted(seen[0]) == [0, 2, 4, 6] and sorted(seen[1]) == [1, 3, 5, 7]


def test_a_position_of_another_stream_is_refused(tmp_path):
    data_dir = grey_folder(tmp_path / "data", 6)
    stream = load_data(data_dir=str(data_dir), batch_size=2, image_size=8)
    next(stream)
    other = load_data(data_dir=str(data_dir), batch_size=3, image_size=8)
    with pytest.raises(ValueError, match="batch_size=2 but this run has batch_size=3"):
        other.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="not a saved batch-stream position"):
        other.load_state_dict({"epoch": 1})


def test_array_batches_resume_exactly():
    images = np.zeros((10, 4, 4, 3), dtype=np.uint8)
    for i in range(10):
        images[i, :, :2] = 20 * i
    labels = np.arange(10)
    make = lambda: array_batches(images, labels, batch_size=4, random_flip=True, seed=3)
    stream = make()
    full = [next(stream) for _ in range(6)]
    assert any(not torch.equal(b[:, :, :, 0], b[:, :, :, -1]) for b, _ in full)  # some flips
    stream = make()
    for _ in range(3):
        next(stream)
    resumed = array_batches(images, labels, batch_size=4, random_flip=True, seed=0)
    resumed.load_state_dict(stream.state_dict())
    for want, (got, cond) in zip(full[3:], (next(resumed) for _ in range(3))):
        assert torch.equal(want[0], got) and torch.equal(want[1]["y"], cond["y"])


EXIT_WITH_A_LOADER_IN_A_CYCLE = """
import sys
from guided_diffusion.image_datasets import load_data
stream = load_data(data_dir=sys.argv[1], batch_size=2, image_size=8)
next(stream)
# The loader ends up held by a reference cycle and forgotten by its stream, as when an exception's
# traceback keeps it: its worker (which ignores SIGTERM) must not keep the interpreter from exiting.
cycle = {"loader": stream._batches}
cycle["self"] = cycle
stream._batches = None
print("exiting", flush=True)
"""


def test_exit_is_not_held_up_by_a_forgotten_loader_worker(tmp_path):
    import subprocess
    import sys

    from _launch import child_env

    data_dir = grey_folder(tmp_path / "data", 4)
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_A_LOADER_IN_A_CYCLE, str(data_dir)],
                          env=child_env(cpu=True), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr[-2000:]
