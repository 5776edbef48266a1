"""Long jobs lose nothing (runtime.kept_rounds), on a tiny class-conditional model:

- a sampling run stopped by SIGTERM after some batches exits 75 with one line, and the same
  command then continues it: its npz is the uninterrupted run's, byte for byte; so for a VAE, an
  editing script and a DDIM tool, for a second Ctrl-C (stop at once: no partial file), for a full
  disk part-way, and under mpiexec (a signal to one rank stops both);
- a finished result is not replaced without --overwrite True, and then user files in its PNG
  folder survive; another command's kept batches are refused (and kept) unless --overwrite True;
  a second live job on the folder, and a disk too small for the run, are refused before any work;
- Ctrl-C in training saves a checkpoint (exit 130, one line); a second Ctrl-C during the save
  leaves no file of that step.
"""

import errno
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.cli import run_config
from guided_diffusion.runtime import checkpoints, kept_rounds
from guided_diffusion.sampling import files as sample_files
from guided_diffusion.sampling import loop
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.training import engine

from _launch import child_env, mpiexec_prefix
from test_scripts import error_line, load_script, run_inprocess

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3
MODEL = (
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 50 "
    f"--class_cond True --num_classes {NUM_CLASSES}"
).split()
NPZ = "samples_64x8x8x3.npz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Twelve 8x8 images of three classes and a model trained on them for 2 steps."""
    root = tmp_path_factory.mktemp("resumable")
    data = root / "data"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(12):
        Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            data / f"c{i % NUM_CLASSES}_{i}.png")
    assert run_inprocess("image_train", [
        "--data_dir", data, *MODEL, "--batch_size", 2, "--max_steps", 2, "--save_interval", 2,
        "--log_dir", root / "train"]) == 0
    return {"root": root, "data": data, "model": root / "train" / "model000002.pt"}


def sample_args(trained, out, *extra):
    # The model flags come from the args.json beside the checkpoint.
    return ["--model_path", trained["model"], "--num_samples", 64, "--batch_size", 8,
            "--timestep_respacing", 3, "--progress", False, "--out_dir", out, "--log_dir", out,
            *extra]


@pytest.fixture(scope="module")
def uninterrupted(trained):
    """The bytes of an uninterrupted 64-sample run (8 batches of 8)."""
    out = trained["root"] / "uninterrupted"
    assert run_inprocess("image_sample", sample_args(trained, out)) == 0
    assert not (out / "partial").exists()
    return (out / NPZ).read_bytes()


def signal_in_round(monkeypatch, index, sig=signal.SIGTERM, times=1):
    """Send `sig` (`times` times) to this process while batch `index` (from 0) is gathered."""
    real = kept_rounds.KeptRounds._collect

    def collect(self, parts, streams, i, write):
        if i == index:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return real(self, parts, streams, i, write)

    monkeypatch.setattr(kept_rounds.KeptRounds, "_collect", collect)


def kept_files(out):
    return sorted(os.listdir(out / "partial"))


def no_temporaries(folder):
    return not [name for _, _, names in os.walk(folder) for name in names if name.endswith(".tmp")]


# ------------------------------------------------------------------ stop, continue, same bytes


def test_sigterm_stops_after_the_batch_and_the_same_command_continues_byte_for_byte(
        trained, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_in_round(monkeypatch, 2)
    assert run_inprocess("image_sample", sample_args(trained, out)) == 75
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    line = (f"preempted by SIGTERM: stopped after batch 3 of 8: 24 of 64 samples are kept in "
            f"{out / 'partial'}; run the same command again to continue (exit status 75)")
    assert [x for x in captured.out.splitlines() if "preempted" in x] == [line]
    assert kept_files(out) == ["command.json", "job.lock", *(f"round00000{i}.pt" for i in range(3))]
    assert not (out / NPZ).exists()
    monkeypatch.undo()
    assert run_inprocess("image_sample", sample_args(trained, out)) == 0
    assert "24 of 64 samples (3 of 8 batches) are kept" in capsys.readouterr().out
    assert (out / NPZ).read_bytes() == uninterrupted
    with np.load(out / NPZ) as npz:
        assert npz["arr_0"].shape == (64, 8, 8, 3) and npz["arr_1"].shape == (64,)
    assert not (out / "partial").exists() and no_temporaries(out)


def test_a_second_ctrl_c_stops_at_once_and_what_was_kept_continues(
        trained, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_in_round(monkeypatch, 2, signal.SIGINT, times=2)
    assert run_inprocess("image_sample", sample_args(trained, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: stopped at once by Ctrl-C"), err
    assert kept_files(out) == ["command.json", "job.lock", "round000000.pt", "round000001.pt"]
    assert no_temporaries(out)
    monkeypatch.undo()
    assert run_inprocess("image_sample", sample_args(trained, out)) == 0
    assert (out / NPZ).read_bytes() == uninterrupted


def test_a_full_disk_part_way_names_the_folder_and_what_is_kept(
        trained, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = checkpoints.save_atomic
    calls = []

    def full_at_the_third_batch(obj, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path)

    monkeypatch.setattr(checkpoints, "save_atomic", full_at_the_third_batch)
    line = error_line(capsys, run_inprocess("image_sample", sample_args(trained, out)))
    assert line == (
        f"error: cannot keep batch 3 of 8 in {out / 'partial'} (No space left on device): 16 of "
        "64 samples are kept there; free space (or fix the permissions), then run the same "
        "command again to continue")
    monkeypatch.undo()
    # The samples file itself cannot be written: every batch stays kept.
    real_write = sample_files.atomic_write

    def full_for_the_npz(path, write):
        if path.endswith(".npz"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, write)

    monkeypatch.setattr(sample_files, "atomic_write", full_for_the_npz)
    line = error_line(capsys, run_inprocess("image_sample", sample_args(trained, out)))
    assert line == (
        f"error: cannot write the samples to {out} (No space left on device): all 64 samples are "
        f"kept in {out / 'partial'}; free space (or fix the permissions), then run the same "
        "command again to continue")
    monkeypatch.undo()
    assert run_inprocess("image_sample", sample_args(trained, out)) == 0
    assert (out / NPZ).read_bytes() == uninterrupted


def test_a_disk_too_small_for_the_run_is_refused_before_any_work(trained, tmp_path, monkeypatch,
                                                                  capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(kept_rounds, "free_bytes", lambda folder: 20_000)
    line = error_line(capsys, run_inprocess("image_sample", sample_args(trained, out)))
    assert line.startswith(f"error: not enough space for this run in {out}: it needs about ")
    assert line.endswith("and the disk has 0.0 MB free: free space, or pass another --out_dir")
    assert not os.path.exists(out)


# ------------------------------------------------------------------ what is refused


def test_a_finished_result_is_replaced_only_with_overwrite_and_user_files_survive(
        trained, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    args = sample_args(trained, out, "--save_images", True)
    assert run_inprocess("image_sample", args) == 0
    pngs = out / "samples_64x8x8x3"
    (pngs / "notes.txt").write_text("mine")
    capsys.readouterr()
    line = error_line(capsys, run_inprocess("image_sample", args + ["--seed", 1]))
    assert line == (f"error: {out} already holds a finished result ({out / NPZ}): pass "
                    "--overwrite True to replace it, or another --out_dir")
    assert (out / NPZ).read_bytes() == uninterrupted
    # Replaced: the npz and the sample files; the user's file stays.
    assert run_inprocess("image_sample", args + ["--seed", 1, "--overwrite", True]) == 0
    assert (out / NPZ).read_bytes() != uninterrupted
    assert (pngs / "notes.txt").read_text() == "mine"
    assert len([n for n in os.listdir(pngs) if n.endswith(".png")]) == 64


def test_another_commands_kept_batches_are_refused_and_kept_unless_overwrite(
        trained, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_in_round(monkeypatch, 1)
    assert run_inprocess("image_sample", sample_args(trained, out)) == 75
    monkeypatch.undo()
    before = {name: (out / "partial" / name).read_bytes() for name in kept_files(out)}
    capsys.readouterr()
    line = error_line(capsys, run_inprocess("image_sample", sample_args(
        trained, out, "--seed", 1, "--use_ddim", True)))
    assert line == (
        f"error: {out / 'partial'} holds 2 kept batch(es) of another command (--seed 0 there, 1 "
        "here; --use_ddim False there, True here): run that command again to finish them, or "
        "pass --overwrite True to discard them, or another --out_dir")
    assert {name: (out / "partial" / name).read_bytes() for name in kept_files(out)} == before
    # A rerun of the first command still continues them exactly.
    assert run_inprocess("image_sample", sample_args(trained, out)) == 0
    assert (out / NPZ).read_bytes() == uninterrupted


def test_a_second_live_job_on_the_folder_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "run"
    lock = out / "partial" / "job.lock"
    lock.parent.mkdir(parents=True)
    # Another process holds the folder's lock, as a live sampling job does.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB); f.write('pid 4242 on node7'); "
         "f.flush(); print('locked', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = error_line(capsys, run_inprocess("image_sample", sample_args(trained, out)))
    finally:
        holder.kill()
        holder.wait()
    assert line == (
        f"error: the output folder {out} is in use by another job (pid 4242 on node7; lock file "
        f"{lock}): two jobs in one folder would mix or replace each other's results: wait for "
        "that job to end (or stop it), or pass another --out_dir")
    assert sorted(os.listdir(out / "partial")) == ["job.lock"]


# ------------------------------------------------------------------ the other script families


def test_vae_sample_stopped_and_continued_gives_the_same_bytes(trained, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    train = tmp_path / "vae"
    assert run_inprocess("vae_train", [
        "--data_dir", trained["data"], "--image_size", 8, "--hidden_size", 32, "--latent_size", 2,
        "--class_cond", True, "--num_classes", NUM_CLASSES, "--batch_size", 4, "--max_steps", 2,
        "--save_interval", 2, "--log_dir", train]) == 0
    args = lambda out: ["--model_path", train / "vae000002.pt", "--num_samples", 64,
                        "--batch_size", 8, "--out_dir", out, "--log_dir", out]
    assert run_inprocess("vae_sample", args(tmp_path / "a")) == 0
    signal_in_round(monkeypatch, 4, signal.SIGUSR1)
    assert run_inprocess("vae_sample", args(tmp_path / "b")) == 75
    assert len(kept_files(tmp_path / "b")) == 2 + 5
    monkeypatch.undo()
    assert run_inprocess("vae_sample", args(tmp_path / "b")) == 0
    assert (tmp_path / "b" / NPZ).read_bytes() == (tmp_path / "a" / NPZ).read_bytes()
    with np.load(tmp_path / "a" / NPZ) as npz:
        assert npz["arr_1"].shape == (64,)  # the labels drawn before each batch


def test_image_edit_stopped_and_continued_gives_the_same_files(trained, tmp_path, monkeypatch):
    # Inputs a/x.png, b/x.png and c/x_1.png: three distinct output names.
    inputs = tmp_path / "in"
    names = sorted(os.listdir(trained["data"]))
    for i, name in enumerate(names[:9]):
        folder = inputs / "abc"[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        target = {0: "x.png", 1: "x.png", 2: "x_1.png"}.get(i, f"y{i}.png")
        (folder / target).write_bytes((trained["data"] / name).read_bytes())
    args = lambda out: ["--model_path", trained["model"], *MODEL, "--input", inputs, "--batch_size", 2,
                        "--timestep_respacing", 4, "--edit_strength", 0.5, "--class_label", 1,
                        "--progress", False, "--out_dir", out, "--log_dir", out]
    assert run_inprocess("image_edit", args(tmp_path / "a")) == 0
    signal_in_round(monkeypatch, 1)
    assert run_inprocess("image_edit", args(tmp_path / "b")) == 75
    monkeypatch.undo()
    assert run_inprocess("image_edit", args(tmp_path / "b")) == 0
    edited = sorted(os.listdir(tmp_path / "a" / "edited"))
    assert len([n for n in edited if n.endswith(".png")]) == 9
    assert {"x.png", "x_1.png", "x_2.png", "sources.json"} <= set(edited)
    for name in [*edited, "samples_9x8x8x3.npz"]:
        path = os.path.join("edited", name) if name in edited else name
        assert (tmp_path / "b" / path).read_bytes() == (tmp_path / "a" / path).read_bytes(), name
    # Replacing the result with one of fewer inputs removes the earlier images, not the user's.
    (tmp_path / "b" / "edited" / "mine.txt").write_text("mine")
    for name in os.listdir(inputs / "c"):
        os.remove(inputs / "c" / name)
    assert run_inprocess("image_edit", args(tmp_path / "b") + ["--overwrite", True]) == 0
    left = sorted(os.listdir(tmp_path / "b" / "edited"))
    assert "mine.txt" in left and len([n for n in left if n.endswith(".png")]) == 6
    assert "x_1.png" in left and "x_2.png" not in left  # b/x.png is x_1 now


def test_ddim_consistency_stopped_and_continued_gives_the_same_bytes(trained, tmp_path,
                                                                      monkeypatch):
    args = lambda out: ["--model_path", trained["model"], "--num_samples", 4, "--batch_size", 2,
                        "--steps", "2,3", "--progress", False, "--out_dir", out, "--log_dir", out]
    assert run_inprocess("ddim_consistency", args(tmp_path / "a")) == 0
    signal_in_round(monkeypatch, 2)  # the first batch of the second pass (3 steps)
    assert run_inprocess("ddim_consistency", args(tmp_path / "b")) == 75
    monkeypatch.undo()
    assert run_inprocess("ddim_consistency", args(tmp_path / "b")) == 0
    for name in ("consistency.npz", "consistency.png", "consistency.json"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def reference_two_rank_samples(model_path, batch, rounds):
    """What two ranks draw: rank r seeds with 0 + r and draws labels, then noise, each batch;
    the batches are gathered round by round in rank order."""
    args = run_config.parse_args(load_script("image_sample").create_argparser(),
                                 ["--model_path", str(model_path), "--timestep_respacing", "3"])
    model, diffusion, _ = loop.load_diffusion_model(args)
    model.eval()
    per_rank = []
    for rank in (0, 1):
        torch.manual_seed(rank)
        batches = []
        for _ in range(rounds):
            y = torch.randint(0, NUM_CLASSES, (batch,))
            x = diffusion.p_sample_loop(model, (batch, 3, 8, 8), model_kwargs={"y": y})
            batches.append((to_uint8(x).numpy(), y.numpy()))
        per_rank.append(batches)
    order = [per_rank[rank][r] for r in range(rounds) for rank in (0, 1)]
    return np.concatenate([b[0] for b in order]), np.concatenate([b[1] for b in order])


def test_mpiexec_a_signal_to_one_rank_stops_both_and_the_rerun_continues(trained, tmp_path):
    prefix = [*mpiexec_prefix(2), sys.executable]  # skips without a matching mpiexec
    out = tmp_path / "run"
    args = [str(a) for a in sample_args(trained, out)[:-4]] + [
        "--num_samples", "24", "--batch_size", "4", "--out_dir", str(out), "--log_dir", str(out)]
    driver = os.path.join(REPO, "tests", "_faults.py")
    script = os.path.join(REPO, "scripts", "image_sample.py")
    fault = '{"signal": "round", "n": 1, "rank": 1, "to": "self"}'
    stopped = subprocess.run([*prefix, driver, script, *args], capture_output=True, text=True,
                             env=child_env(cpu=True, GD_TEST_FAULT=fault, GD_DIST_TIMEOUT="60"),
                             timeout=240)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert "preempted by SIGTERM: stopped after batch 1 of 3: 8 of 24 samples are kept" in \
        stopped.stdout
    assert "preempted by SIGTERM: stopped after batch 1 of 3" in (out / "log-rank001.txt").read_text()
    resumed = subprocess.run([*prefix, script, *args], capture_output=True, text=True,
                             env=child_env(cpu=True, GD_DIST_TIMEOUT="60"), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    images, labels = reference_two_rank_samples(trained["model"], 4, 3)
    with np.load(out / "samples_24x8x8x3.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], images[:24])
        np.testing.assert_array_equal(npz["arr_1"], labels[:24])


# ------------------------------------------------------------------ Ctrl-C in training


def press_ctrl_c_at_step(monkeypatch, step):
    real = engine.Trainer.take_step

    def take_step(self, batch, cond):
        if self.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, cond)

    monkeypatch.setattr(engine.Trainer, "take_step", take_step)


def train_args(trained, log_dir):
    return ["--data_dir", trained["data"], *MODEL, "--batch_size", 2, "--save_interval", 1000,
            "--log_dir", log_dir]


def test_ctrl_c_in_training_saves_a_checkpoint_and_exits_130(trained, tmp_path, monkeypatch,
                                                            capsys):
    press_ctrl_c_at_step(monkeypatch, 3)
    assert run_inprocess("image_train", train_args(trained, tmp_path)) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err
    line = (f"interrupted by SIGINT (Ctrl-C): stopped after step 3 with a complete checkpoint "
            f"{tmp_path / 'model000003.pt'}; continue with --resume_checkpoint auto --log_dir "
            f"{tmp_path} (exit status 130)")
    assert [x for x in captured.out.splitlines() if "SIGINT" in x] == [line]
    for name in ("model000003.pt", "ema_0.9999_000003.pt", "opt000003.pt", "state000003.pt"):
        torch.load(tmp_path / name, weights_only=True)


def test_a_second_ctrl_c_during_a_save_leaves_no_file_of_that_step(trained, tmp_path,
                                                                  monkeypatch, capsys):
    real_save = checkpoints.save_atomic
    saved = []

    def save_atomic(obj, path):
        result = real_save(obj, path)
        saved.append(path)
        if len(saved) in (1, 2):  # Ctrl-C after the first file of the set, then after the second
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(checkpoints, "save_atomic", save_atomic)
    assert run_inprocess("image_train", train_args(trained, tmp_path) + ["--max_steps", 3]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: stopped at once by Ctrl-C"), err
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pt") or n.endswith(".tmp")]
