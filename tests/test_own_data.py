"""
Issue 23, one's own data: reference batches made with the training resize and crop, the evaluator
on image folders and grey batches, super-resolution from image files, and the dataset
preparation scripts (CIFAR-10's pickle archive, LSUN's lmdb)."""

import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from guided_diffusion.data.cifar10 import write_cifar10
from guided_diffusion.errors import ScriptError
from guided_diffusion.evaluation.evaluator import Evaluator, evaluate
from guided_diffusion.evaluation.reference_batch import make_reference_batch
from guided_diffusion.image_datasets import center_crop_arr
from guided_diffusion.sampling.files import read_low_res_images

from _launch import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StubFeatures(nn.Module):
    """Cheap deterministic features with the Evaluator's model interface."""

    def forward(self, images):
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(1, 2)), x.std(dim=(1, 2))], dim=1), x[:, :5, 0, 0]

    def logits(self, pool):
        return pool[:, :4]


def save_pngs(folder, images, name):
    """Save each uint8 HWC image as folder/name (name formatted with its index i); return folder."""
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / name.format(i=i))
    return folder


def write_pictures(folder, sizes, seed=0, labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        name = f"{labels[i] if labels else 'x'}_{i:03d}.png"
        Image.fromarray(rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def test_reference_batch_uses_the_training_crop_and_keeps_statistics_of_all(tmp_path):
    paths = write_pictures(tmp_path / "data", [(20, 14), (14, 20), (30, 30), (16, 12)],
                           labels=["b", "a", "b", "a"])
    evaluator = Evaluator(model=StubFeatures(), progress=False)
    out, kept, counted = make_reference_batch(tmp_path / "data", tmp_path / "ref.npz", 8,
                                              class_cond=True, max_images=2, evaluator=evaluator,
                                              batch_size=3, progress=False)
    assert (kept, counted) == (2, 4)
    paths = sorted(paths, key=lambda p: p.name)  # load_data's order: a_001, a_003, b_000, b_002
    crops = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 8) for p in paths])
    with np.load(out) as ref:
        assert sorted(ref.files) == ["arr_0", "arr_1", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(ref["arr_0"], crops[[0, 3]])  # spread: first and last
        assert ref["arr_1"].tolist() == [0, 1]  # classes "a", "b"
        # Statistics of all four images (in float64, as FIDStatistics keeps them).
        pool = evaluator.compute_activations([crops])[0].astype(np.float64)
        np.testing.assert_allclose(ref["mu"], pool.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ref["sigma"], np.cov(pool, rowvar=False), rtol=1e-10)


def test_the_evaluator_reads_folders_and_grey_batches(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    folder = save_pngs(tmp_path / "folder", images, "{i}.png")
    np.savez(tmp_path / "same.npz", images)
    evaluator = Evaluator(model=StubFeatures(), batch_size=4, progress=False)
    quiet = lambda *a: None
    from_folder = evaluate(ref_batch=str(folder), sample_batch=str(tmp_path / "same.npz"),
                           evaluator=evaluator, out=quiet)
    assert from_folder["FID"] == pytest.approx(0.0, abs=1e-9)
    assert from_folder["Precision"] == 1.0 and from_folder["Recall"] == 1.0
    # A grey batch is seen as three equal channels.
    grey = images[..., :1]
    np.savez(tmp_path / "grey.npz", grey)
    np.savez(tmp_path / "grey_rgb.npz", np.repeat(grey, 3, axis=-1))
    a = evaluator.read_activations(str(tmp_path / "grey.npz"))
    b = evaluator.read_activations(str(tmp_path / "grey_rgb.npz"))
    np.testing.assert_array_equal(a[0], b[0])
    # A folder of mixed sizes, and a picture given as a batch: one clear error each.
    write_pictures(tmp_path / "mixed", [(8, 8), (9, 8)])
    with pytest.raises(ScriptError, match="make_ref_batch.py"):
        evaluator.read_activations(str(tmp_path / "mixed"))
    with pytest.raises(ScriptError, match="is a PNG image"):
        evaluate(ref_batch=str(folder / "0.png"), sample_batch=str(folder), evaluator=evaluator,
                 out=quiet)


def test_make_ref_batch_cli(tmp_path):
    write_pictures(tmp_path / "data", [(12, 10)] * 3)
    script = os.path.join(REPO, "evaluations", "make_ref_batch.py")
    run = lambda *a: subprocess.run([sys.executable, script, *map(str, a)], env=child_env(cpu=True),
                                    capture_output=True, text=True, timeout=120)
    ok = run(tmp_path / "data", tmp_path / "ref.npz", "--image_size", "8,10", "--progress", False)
    assert ok.returncode == 0, ok.stderr
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["arr_0"].shape == (3, 8, 10, 3) and ref.files == ["arr_0"]
    (tmp_path / "data" / "x_bad.png").write_bytes(b"broken")
    bad = run(tmp_path / "data", tmp_path / "ref2.npz", "--image_size", 8, "--progress", False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "x_bad.png" in lines[0]
    assert not (tmp_path / "ref2.npz").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left


def test_low_res_inputs_from_an_npz_an_image_or_a_folder(tmp_path):
    rng = np.random.RandomState(2)
    images = rng.randint(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    folder = save_pngs(tmp_path / "low", images, "{i}_{i}.png")
    np.savez(tmp_path / "low.npz", images, np.arange(3))
    from_npz, labels = read_low_res_images(str(tmp_path / "low.npz"), 8, class_cond=True)
    from_folder, folder_labels = read_low_res_images(str(folder), 8, class_cond=True)
    np.testing.assert_array_equal(from_folder, from_npz)
    assert folder_labels.tolist() == labels.tolist() == [0, 1, 2]
    one, _ = read_low_res_images(str(folder / "1_1.png"), 8)
    np.testing.assert_array_equal(one, images[1:2])
    # A larger picture is brought to size as training does; grey keeps one channel.
    Image.fromarray(images[0]).resize((16, 16)).convert("L").save(tmp_path / "big.png")
    grey, _ = read_low_res_images(str(tmp_path / "big.png"), 8, channels=1)
    assert grey.shape == (1, 8, 8, 1)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScriptError, match="not an npz file: pass an npz of samples, an image"):
        read_low_res_images(str(tmp_path / "notes.txt"), 8)


# ------------------------------------------------------------------ dataset preparation


def cifar_pickle(obj):
    # The distributed archive holds Python 2 pickles; protocol 2 with byte-string keys is what
    # they look like to Python 3.
    return pickle.dumps(obj, protocol=2)


def make_cifar_archive(path, per_batch=3, payload=None):
    rng = np.random.RandomState(0)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                  "frog", "horse", "ship", "truck")]
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
                         b"labels": [int(x) for x in rng.randint(0, 10, per_batch)],
                         b"batch_label": name.encode()}
    with tarfile.open(path, "w:gz") as tar:
        members = {"batches.meta": cifar_pickle({b"label_names": names}),
                   **{k: cifar_pickle(v) for k, v in batches.items()}}
        if payload is not None:
            members["test_batch"] = payload
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches, [n.decode() for n in names]


def test_cifar10_archive_to_class_named_pngs(tmp_path):
    batches, names = make_cifar_archive(tmp_path / "cifar.tar.gz")
    counts = write_cifar10(str(tmp_path / "cifar.tar.gz"), str(tmp_path / "out"))
    assert counts == {"train": 15, "test": 3}
    first = batches["data_batch_1"]
    label = names[int(first[b"labels"][0])]
    with Image.open(tmp_path / "out" / "train" / f"{label}_00000.png") as png:
        # Row layout: 1024 red, 1024 green, 1024 blue values, each 32 rows of 32.
        np.testing.assert_array_equal(np.array(png), first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    second = batches["data_batch_2"]
    assert os.path.exists(tmp_path / "out" / "train" / f"{names[int(second[b'labels'][0])]}_00003.png")
    assert len(os.listdir(tmp_path / "out" / "test")) == 3


def test_cifar10_refuses_a_pickle_that_runs_code_and_leaves_nothing(tmp_path):
    evil = pickle.dumps(os.system, protocol=2)  # names posix.system
    make_cifar_archive(tmp_path / "evil.tar.gz", payload=evil)
    with pytest.raises(ScriptError, match="refusing to unpickle"):
        write_cifar10(str(tmp_path / "evil.tar.gz"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["evil.tar.gz"]
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ScriptError, match="not a tar archive"):
        write_cifar10(str(tmp_path / "img.png"), str(tmp_path / "out"))


def test_lsun_lmdb_export(tmp_path):
    lmdb = pytest.importorskip("lmdb", reason="the optional lmdb package (guided-diffusion[lsun])")
    from guided_diffusion.data.lsun import lsun_crop, write_lsun

    rng = np.random.RandomState(3)
    pictures = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
                [(24, 16), (16, 30), (20, 20)]]
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, picture in enumerate(pictures):
            buffer = io.BytesIO()
            picture.save(buffer, format="WEBP", lossless=True)
            txn.put(f"key{i}".encode(), buffer.getvalue())
    env.close()
    assert write_lsun(str(tmp_path / "db"), str(tmp_path / "out"), image_size=8, prefix="cat") == 3
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["cat_0000000.png", "cat_0000001.png", "cat_0000002.png"]
    for name, picture in zip(names, pictures):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out" / name)),
                                      lsun_crop(picture, 8))
        assert lsun_crop(picture, 8).shape == (8, 8, 3)
