"""safetensors checkpoints in and out (issue 30, point 2).

The oracle is the safetensors package itself (its own writer and reader, not ours) and the .pt
files of the same weights: sampling from either gives the same bytes, training in either format
gives the same tensors, and a resumed safetensors run equals an uninterrupted .pt run.
"""

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

st = pytest.importorskip("safetensors.torch")

from guided_diffusion.runtime import checkpoints, files, safetensors_files  # noqa: E402
from guided_diffusion.runtime.checkpoints import (  # noqa: E402
    find_latest_checkpoint, load_checkpoint, save_atomic,
)
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion, model_and_diffusion_defaults,
)

from _launch import child_env  # noqa: E402
from test_resume import DIFFUSION, data, run, tensors_equal  # noqa: E402,F401  (data: fixture)
from test_scripts import load_script, run_inprocess  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_MODEL = (
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 40 --learn_sigma True "
    "--class_cond True --num_classes 3"
).split()


def error_line(capsys, status):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, (status, err)
    return err[0]


# ----------------------------------------------------------------------------- the file format


def test_a_state_dict_is_a_plain_safetensors_file_both_ways(tmp_path):
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4),
             "label_emb.weight": torch.randn(5, 4).half(), "steps": torch.arange(3)}
    ours = tmp_path / "ours.safetensors"
    save_atomic(state, ours)
    # The package's own reader sees the same names and values: nothing of ours in the way.
    read = st.load_file(str(ours))
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in state.items())
    # And a file the package wrote loads with ours.
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(state, str(theirs))
    loaded = load_checkpoint(theirs)
    assert tensors_equal(dict(sorted(loaded.items())), dict(sorted(state.items())))
    assert checkpoints.is_complete_checkpoint(str(theirs))


def test_a_nested_checkpoint_comes_back_as_it_was_saved(tmp_path):
    # The shape of the cGAN's and the VAE's one-file checkpoints: state dicts, an optimizer
    # state (integer keys), flags, a numpy random state, None.
    rng = np.random.RandomState(0).get_state()
    checkpoint = {
        "format": "cgan/1", "step": 7, "flags": {"image_size": 8, "use_fp16": False},
        "generator": {"net.0.weight": torch.randn(2, 2)}, "ema": {"net.0.weight": torch.ones(2)},
        "opt_g": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                  "param_groups": [{"lr": 2e-4, "betas": (0.5, 0.999), "params": [0]}]},
        "rng": {"numpy": rng, "python": (3, tuple(range(5)), None)}, "nothing": None,
    }
    path = tmp_path / "cgan000007.safetensors"
    save_atomic(checkpoint, path)
    loaded = load_checkpoint(path)
    assert loaded["rng"]["numpy"][0] == rng[0] and np.array_equal(loaded["rng"]["numpy"][1], rng[1])
    assert loaded["rng"]["numpy"][1].dtype == rng[1].dtype and loaded["rng"]["numpy"][2:] == rng[2:]
    del loaded["rng"]["numpy"], checkpoint["rng"]["numpy"]
    assert tensors_equal(checkpoint, loaded)
    assert type(loaded["opt_g"]["param_groups"][0]["betas"]) is tuple
    # Every tensor is in the file under its path, for other readers.
    assert "generator/net.0.weight" in st.load_file(str(path))


def test_an_object_safetensors_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="save it as .pt"):
        save_atomic({"model": {"w": torch.zeros(1)}, "when": object()}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One tiny model's perturbed weights as M.pt (torch.save) and M.safetensors (safetensors'
    own writer): every weight moved, so no zero-initialised layer makes the samples trivial."""
    folder = tmp_path_factory.mktemp("weights")
    parsed = vars(load_script("image_sample").create_argparser().parse_args(SAMPLE_MODEL))
    flags = {k: parsed[k] for k in model_and_diffusion_defaults()}
    model, _ = create_model_and_diffusion(**flags, num_classes=parsed["num_classes"])
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save(state, folder / "M.pt")
    st.save_file(state, str(folder / "M.safetensors"))
    return folder


def sample(weights_file, out, seed=5):
    return run_inprocess("image_sample", [
        "--model_path", weights_file, *SAMPLE_MODEL, "--num_samples", 3, "--batch_size", 2,
        "--timestep_respacing", 4, "--seed", seed, "--log_dir", out, "--progress", "False"])


def test_sampling_from_safetensors_gives_the_bytes_of_sampling_from_pt(weights, tmp_path):
    assert sample(weights / "M.pt", tmp_path / "pt") == 0
    assert sample(weights / "M.safetensors", tmp_path / "st") == 0
    name = "samples_3x8x8x3.npz"
    assert (tmp_path / "pt" / name).read_bytes() == (tmp_path / "st" / name).read_bytes()
    with np.load(tmp_path / "st" / name) as npz:
        assert npz["arr_0"].std() > 0  # real images, not a constant


def test_a_wrong_kind_of_file_is_one_line(weights, tmp_path, capsys):
    png = tmp_path / "picture.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    line = error_line(capsys, sample(png, tmp_path / "a"))
    assert f"cannot read checkpoint {png}: it is a PNG image" in line
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((weights / "M.safetensors").read_bytes()[:-100])
    line = error_line(capsys, sample(cut, tmp_path / "b"))
    assert f"cannot read checkpoint {cut}: the file is truncated or corrupt" in line
    assert not checkpoints.is_complete_checkpoint(str(cut))
    renamed = tmp_path / "really_pt.safetensors"
    renamed.write_bytes((weights / "M.pt").read_bytes())
    line = error_line(capsys, sample(renamed, tmp_path / "c"))
    assert "a torch.save file named .safetensors (rename it to .pt)" in line
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "truncated or corrupt" in error_line(capsys, sample(empty, tmp_path / "d"))


WITHOUT_SAFETENSORS = textwrap.dedent(
    """
    import runpy, sys
    sys.modules["safetensors"] = None  # as if it were not installed
    sys.modules["safetensors.torch"] = None
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_without_safetensors(tmp_path, script, *args):
    driver = tmp_path / "driver.py"
    driver.write_text(WITHOUT_SAFETENSORS)
    return subprocess.run(
        [sys.executable, str(driver), os.path.join(REPO, "scripts", script), *map(str, args)],
        env=child_env(cpu=True), capture_output=True, text=True, timeout=120)


def test_without_the_package_a_safetensors_path_is_refused_in_one_line(weights, tmp_path, data):
    proc = run_without_safetensors(
        tmp_path, "image_sample.py", "--model_path", weights / "M.safetensors", *SAMPLE_MODEL,
        "--num_samples", 1, "--log_dir", tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "needs the safetensors package: pip install 'guided-diffusion[safetensors]'" in lines[0]
    # Training refuses --save_format safetensors before its log folder exists.
    log_dir = tmp_path / "train"
    proc = run_without_safetensors(
        tmp_path, "image_train.py", "--data_dir", data, *DIFFUSION, "--max_steps", 1,
        "--save_format", "safetensors", "--log_dir", log_dir)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "--save_format safetensors" in lines[0] and "pip install" in lines[0]
    assert not log_dir.exists()


# ----------------------------------------------------------------------------- training


def names_in(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith((".pt", ".safetensors")))


def test_training_in_safetensors_resumes_to_the_uninterrupted_pt_run(data, tmp_path, monkeypatch):
    common = ["--data_dir", data, *DIFFUSION, "--ema_rate", "0.9,0.99", "--save_interval", 1,
              "--log_interval", 1]
    pt, parts = tmp_path / "pt", tmp_path / "st"
    assert run("image_train", [*common, "--max_steps", 3], pt, monkeypatch) == 0
    # Two steps, keeping one set: step 1's set goes as a whole, in its format.
    assert run("image_train", [*common, "--max_steps", 2, "--save_format", "safetensors",
                               "--keep_checkpoints", 1], parts, monkeypatch) == 0
    assert names_in(parts) == ["ema_0.99_000002.safetensors", "ema_0.9_000002.safetensors",
                               "model000002.safetensors", "opt000002.pt", "state000002.pt"]
    assert run("image_train", [*common, "--max_steps", 1, "--save_format", "safetensors",
                               "--resume_checkpoint", "auto"], parts, monkeypatch) == 0
    log = (parts / "log.txt").read_text()
    assert f"resuming from {parts / 'model000002.safetensors'}" in log
    assert f"loading EMA from checkpoint: {parts / 'ema_0.9_000002.safetensors'}" in log
    for name in ("model000003", "ema_0.9_000003", "ema_0.99_000003"):
        want = torch.load(pt / f"{name}.pt", weights_only=True)
        got = st.load_file(str(parts / f"{name}.safetensors"))  # the package's reader
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), f"{name} differs"
    for name in ("opt000003.pt", "state000003.pt"):
        assert tensors_equal(torch.load(pt / name, weights_only=True),
                             torch.load(parts / name, weights_only=True)), name
    assert find_latest_checkpoint(parts, "model") == str(parts / "model000003.safetensors")


def test_init_checkpoint_and_resume_checkpoint_take_safetensors(data, tmp_path, monkeypatch):
    common = ["--data_dir", data, *DIFFUSION, "--save_interval", 1]
    first = tmp_path / "first"
    assert run("image_train", [*common, "--max_steps", 1, "--save_format", "safetensors"], first,
               monkeypatch) == 0
    tuned = tmp_path / "tuned"
    assert run("image_train", [*common, "--max_steps", 1, "--init_checkpoint",
                               first / "ema_0.9999_000001.safetensors"], tuned, monkeypatch) == 0
    assert "--init_checkpoint: starting from the weights of" in (tuned / "log.txt").read_text()
    assert names_in(tuned)[-1] == "state000001.pt" and "model000001.pt" in names_in(tuned)
    resumed = tmp_path / "resumed"
    assert run("image_train", [*common, "--max_steps", 1, "--resume_checkpoint",
                               first / "model000001.safetensors"], resumed, monkeypatch) == 0
    assert "model000002.pt" in names_in(resumed)  # the default format, step counted on


def test_the_classifier_trains_and_resumes_in_safetensors(data, tmp_path, monkeypatch):
    from test_resume import CLASSIFIER

    common = ["--data_dir", data, *CLASSIFIER, "--save_interval", 1, "--save_format",
              "safetensors"]
    assert run("classifier_train", [*common, "--iterations", 1], tmp_path, monkeypatch) == 0
    assert names_in(tmp_path) == ["model000001.safetensors", "opt000001.pt", "state000001.pt"]
    assert run("classifier_train", [*common, "--iterations", 2, "--resume_checkpoint", "auto"],
               tmp_path, monkeypatch) == 0
    assert "model000002.safetensors" in names_in(tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert f"resuming from {tmp_path / 'model000001.safetensors'}" in log


@pytest.mark.parametrize("value", ["zip", "", "PT", "safetensor"])
def test_bad_save_format_is_one_line_before_the_log_folder(value, data, tmp_path, monkeypatch,
                                                           capsys):
    log_dir = tmp_path / "logs"
    status = run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 1,
                                 "--save_format", value], log_dir, monkeypatch)
    line = error_line(capsys, status)
    assert f"--save_format {value!r}: use pt" in line and "safetensors" in line
    assert not log_dir.exists()


def test_save_format_without_a_value_is_refused(data, tmp_path, monkeypatch, capsys):
    status = run("image_train", ["--data_dir", data, *DIFFUSION, "--save_format"], tmp_path / "l",
                 monkeypatch)
    err = capsys.readouterr().err
    assert status == 2 and "--save_format" in err


# ----------------------------------------------------------------------------- interruptions


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from guided_diffusion.runtime import files
    from guided_diffusion.runtime.checkpoints import save_atomic

    def write_half_then_die(self, data):
        # Half of the safetensors bytes reach the disk, then SIGKILL: no handler, no cleanup.
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    files._ErrorRecorder.write = write_half_then_die
    save_atomic({"w": torch.full((1000,), 2.0)}, sys.argv[1])
    """
)


def test_a_process_killed_mid_write_leaves_the_previous_safetensors_file(tmp_path):
    path = tmp_path / "model000010.safetensors"
    save_atomic({"w": torch.full((1000,), 1.0)}, path)
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.run([sys.executable, str(script), str(path)], env=child_env(cpu=True),
                          capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    leftovers = [n for n in os.listdir(tmp_path) if n not in (path.name, script.name)]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the abandoned write
    assert torch.equal(st.load_file(str(path))["w"], torch.full((1000,), 1.0))
    assert find_latest_checkpoint(tmp_path, "model") == str(path)


def test_a_full_disk_during_a_safetensors_save_keeps_the_previous_set(data, tmp_path, monkeypatch,
                                                                      capsys):
    real_write, real_bytes = files._ErrorRecorder.write, safetensors_files.to_bytes
    produced = []  # the bytes of every safetensors file, in order

    def to_bytes(obj, path):
        produced.append(real_bytes(obj, path))
        return produced[-1]

    def write(self, data):
        # Set 2's model file (the 4th safetensors file, after its opt and state files) meets a
        # full disk after its first bytes.
        if len(produced) == 4 and data is produced[-1]:
            real_write(self, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(safetensors_files, "to_bytes", to_bytes)
    monkeypatch.setattr(files._ErrorRecorder, "write", write)
    status = run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 3,
                                 "--save_interval", 1, "--save_format", "safetensors"], tmp_path,
                 monkeypatch)
    monkeypatch.undo()
    line = error_line(capsys, status)
    assert "cannot write checkpoint file" in line
    assert "model000002.safetensors: No space left on device" in line
    assert f"the previous checkpoint {tmp_path / 'model000001.safetensors'} is intact" in line
    assert names_in(tmp_path) == ["ema_0.9999_000001.safetensors", "model000001.safetensors",
                                  "opt000001.pt", "state000001.pt"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    for name in names_in(tmp_path):
        load_checkpoint(tmp_path / name)
    assert find_latest_checkpoint(tmp_path, "model") == str(tmp_path / "model000001.safetensors")


def test_a_one_file_vae_checkpoint_as_safetensors_samples_and_resumes_the_same(data, tmp_path,
                                                                             monkeypatch):
    from test_resume import VAE

    common = ["--data_dir", data, *VAE, "--save_interval", 1, "--log_interval", 1]
    assert run("vae_train", [*common, "--iterations", 3], tmp_path / "full", monkeypatch) == 0
    assert run("vae_train", [*common, "--iterations", 2], tmp_path / "part", monkeypatch) == 0
    pt = tmp_path / "part" / "vae000002.pt"
    converted = tmp_path / "part" / "vae000002.safetensors"
    save_atomic(load_checkpoint(pt), converted)  # model, optimizer, flags, random state
    os.remove(pt)
    # Resuming from the converted file gives the uninterrupted run's step 3, bit for bit.
    assert run("vae_train", [*common, "--iterations", 3, "--resume_checkpoint", converted],
               tmp_path / "part", monkeypatch) == 0
    assert tensors_equal(torch.load(tmp_path / "full" / "vae000003.pt", weights_only=True),
                         torch.load(tmp_path / "part" / "vae000003.pt", weights_only=True))
    outs = []
    for checkpoint in (tmp_path / "full" / "vae000002.pt", converted):
        out = tmp_path / f"samples_{checkpoint.suffix[1:]}"
        assert run_inprocess("vae_sample", ["--model_path", checkpoint, "--num_samples", 4,
                                            "--batch_size", 4, "--out_dir", out, "--log_dir",
                                            out / "log"]) == 0
        outs.append((out / "samples_4x8x8x3.npz").read_bytes())
    assert outs[0] == outs[1]


def test_a_real_full_disk_during_safetensors_saves(data, tmp_path):
    """A tiny tmpfs, as test_resume's test for .pt files."""
    from test_resume import run_on_small_disk

    out, errors, log_dir = run_on_small_disk(data, tmp_path, "--save_format safetensors")
    assert "No space left on device" in errors[0]
    assert "model000001.safetensors is intact" in errors[0]
    assert out["latest"] == str(log_dir / "model000001.safetensors")
    assert [n for n in out["names"] if n.endswith((".pt", ".safetensors"))] == [
        "ema_0.9999_000001.safetensors", "model000001.safetensors", "opt000001.pt",
        "state000001.pt"]
    assert not [n for n in out["names"] if "000002" in n or n.endswith(".tmp")]
