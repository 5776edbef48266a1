"""Exact resume and preemption of the five training scripts, in this process on CPU.

For each script: an uninterrupted run saves every step; a second run receives SIGTERM or SIGUSR1
while it reads a batch, finishes that step, saves and leaves with exit status 75; a third run
continues with --resume_checkpoint auto. The third run's final checkpoint must equal the
uninterrupted run's bit for bit (one thread, so CPU kernels are deterministic). The signal is sent
by the data stream itself, so the step it lands in is known. Storage failures (a full disk, an
unwritable log folder) end in one line with the previous checkpoint intact.
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.runtime import checkpoints, preemption
from guided_diffusion.cli.main import run_main

from _launch import child_env
from test_scripts import load_script

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = (
    "--num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
    "--num_head_channels 16 --diffusion_steps 50 --dropout 0.1"
).split()
DIFFUSION = ["--image_size", "16", *UNET, "--batch_size", "4"]
SUPER_RES = ["--large_size", "16", "--small_size", "8", *UNET, "--batch_size", "4"]
CLASSIFIER = (
    "--image_size 16 --classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2 "
    "--classifier_attention_resolutions 8 --num_classes 10 --diffusion_steps 50 --batch_size 4"
).split()
CGAN = ["--image_size", "8", "--batch_size", "4", "--random_flip", "True"]
VAE = ["--image_size", "8", "--hidden_size", "32", "--latent_size", "2", "--batch_size", "4",
       "--random_flip", "True"]
# Every optional feature that carries state or a schedule across a resume: microbatches, the
# fp16 loss scale, several EMA rates, validation every third step (the preempted run stops
# after step 4, off that schedule), the paper's SGD schedule, labels.
FEATURES = {
    "image_train": "--microbatch 2 --use_fp16 True --ema_rate 0.9,0.99".split(),
    "super_res_train": "--microbatch 2 --ema_rate 0.9,0.99 --class_cond True --num_classes 10".split(),
    "classifier_train": "--microbatch 2 --classifier_use_fp16 True --eval_interval 3".split(),
    "cgan_train": "--optimizer sgd".split(),
    "vae_train": "--class_cond True --num_classes 10 --beta 0.5".split(),
}
TOTAL = 5  # steps of the uninterrupted runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 12 labelled digits: 3 batches of 4 per epoch, so every run crosses epoch boundaries.
    return write_digits(str(tmp_path_factory.mktemp("digits") / "d"), image_size=16, limit=12)


class SignalOnBatch:
    """A data stream that sends `sig` to this process while handing out batch number `at`."""

    def __init__(self, stream, at, sig):
        self.stream, self.at, self.sig, self.count = stream, at, sig, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.stream)
        if self.count == self.at:
            os.kill(os.getpid(), self.sig)
        self.count += 1
        return batch

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def run(name, args, log_dir, monkeypatch, signal_at=None, sig=signal.SIGTERM):
    """
    Run a training script's main here; returns its exit status. With signal_at, the first data
    stream it opens sends `sig` while handing out that batch.
    """
    module = load_script(name)
    source = {"cgan_train": "cgan_training_batches",
              "super_res_train": "load_superres_data"}.get(name, "load_data")
    if signal_at is not None:
        original = getattr(module, source)
        opened = []

        def wrapped(*a, **kw):
            stream = original(*a, **kw)
            opened.append(stream)
            return SignalOnBatch(stream, signal_at, sig) if len(opened) == 1 else stream

        monkeypatch.setattr(module, source, wrapped)
    received = []
    # A safety net: if training did not catch the signal, the test fails instead of dying.
    previous = signal.signal(sig, lambda *a: received.append(a[0]))
    try:
        try:
            status = run_main(module.main, [*map(str, args), "--log_dir", str(log_dir)]) or 0
        except SystemExit as exc:
            status = exc.code
    finally:
        signal.signal(sig, previous)
    assert not received, "the training loop did not handle the signal"
    return status


def tensors_equal(a, b):
    """
    Bitwise equality of nested checkpoint contents, except the training state's "settings" (the
    runs' flags: they differ on purpose, e.g. --save_interval).
    """
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        if a.get("format") == b.get("format") == "guided_diffusion.train_state/1":
            a, b = ({k: v for k, v in x.items() if k != "settings"} for x in (a, b))
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


# The files of the diffusion scripts' checkpoint of step N (two EMA rates), the marker last.
DIFFUSION_FILES = ["ema_0.9_{:06d}.pt", "ema_0.99_{:06d}.pt", "opt{:06d}.pt", "state{:06d}.pt",
                   "model{:06d}.pt"]
# name: flags, total-steps flag, checkpoint files of step N (the marker last), signal
SCRIPTS = {
    "image_train": (DIFFUSION, "--lr_anneal_steps", DIFFUSION_FILES, signal.SIGTERM),
    "super_res_train": (SUPER_RES, "--lr_anneal_steps", DIFFUSION_FILES, signal.SIGUSR1),
    "classifier_train": (CLASSIFIER, "--iterations",
                         ["opt{:06d}.pt", "state{:06d}.pt", "model{:06d}.pt"], signal.SIGUSR1),
    "cgan_train": (CGAN, "--iterations", ["cgan{:06d}.pt"], signal.SIGTERM),
    "vae_train": (VAE, "--iterations", ["vae{:06d}.pt"], signal.SIGUSR1),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_preempted_then_resumed_run_equals_the_uninterrupted_one(name, data, tmp_path, monkeypatch):
    flags, total_flag, files, sig = SCRIPTS[name]
    common = ["--data_dir", data, *flags, *FEATURES[name], "--log_interval", 1]
    if name == "classifier_train":
        common += ["--val_data_dir", data]
    full, parts = tmp_path / "full", tmp_path / "parts"

    assert run(name, [*common, total_flag, TOTAL, "--save_interval", 1], full, monkeypatch) == 0

    # The signal arrives while batch 3 (the first of the second epoch) is read: step 4 finishes,
    # is saved, and the run stops although it was asked for TOTAL steps.
    status = run(name, [*common, total_flag, TOTAL, "--save_interval", 100], parts, monkeypatch,
                 signal_at=3, sig=sig)
    assert status == preemption.EXIT_PREEMPTED == 75
    names = sorted(n for n in os.listdir(parts) if n.endswith(".pt"))
    assert names == sorted(f.format(4) for f in files)  # only the preemption checkpoint
    log = (parts / "log.txt").read_text()
    assert f"preempted by {sig.name}: stopped after step 4 with a complete checkpoint" in log
    assert f"{parts / files[-1].format(4)}; continue with --resume_checkpoint auto --log_dir {parts}" in log

    assert run(name, [*common, total_flag, TOTAL, "--resume_checkpoint", "auto"], parts,
               monkeypatch) == 0
    for pattern in files:
        want, got = load(full / pattern.format(TOTAL)), load(parts / pattern.format(TOTAL))
        assert tensors_equal(want, got), f"{pattern.format(TOTAL)} differs after resuming"


def test_the_validation_schedule_follows_the_global_step(data, tmp_path, monkeypatch):
    # With --eval_interval 3, steps 0 and 3 (counting from 0) validate; a run resumed after
    # step 4 validates at step 6 (the uninterrupted run's schedule), not at its own first step.
    common = ["--data_dir", data, "--val_data_dir", data, *CLASSIFIER, "--eval_interval", 3,
              "--log_interval", 1]
    assert run("classifier_train", [*common, "--iterations", 4], tmp_path, monkeypatch) == 0
    assert run("classifier_train", [*common, "--iterations", 7, "--resume_checkpoint", "auto"],
               tmp_path, monkeypatch) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    validated = [int(row["step"]) for row in rows if row.get("val_loss")]
    assert validated == [7]  # logged steps count the steps taken: step index 6 is the 7th


def test_state_file_holds_rng_and_data_position(data, tmp_path, monkeypatch):
    assert run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 4], tmp_path,
               monkeypatch) == 0
    state = load(tmp_path / "state000004.pt")
    assert state["format"] == "guided_diffusion.train_state/1" and state["step"] == 4
    assert state["world_size"] == 1 and len(state["ranks"]) == 1
    (rank,) = state["ranks"]
    assert set(rank["rng"]) == {"torch", "cuda", "numpy", "random"}
    assert rank["rng"]["torch"].dtype == torch.uint8
    assert rank["rng"]["numpy"]["keys"].shape == (624,)
    position = rank["data"]["train"]
    # 4 batches of a 3-batch epoch: epoch 1, one batch into it.
    assert (position["epoch"], position["offset"], position["num_items"]) == (1, 1, 12)
    assert state["shared"]["lg_loss_scale"] == 20.0
    # The reference files stay plain state dicts.
    model = load(tmp_path / "model000004.pt")
    assert all(isinstance(v, torch.Tensor) for v in model.values())


def test_checkpoint_without_state_resumes_with_a_warning(data, tmp_path, monkeypatch):
    args = ["--data_dir", data, *DIFFUSION]
    assert run("image_train", [*args, "--max_steps", 2], tmp_path, monkeypatch) == 0
    os.remove(tmp_path / "state000002.pt")  # as written before exact resume, or by the reference
    assert run("image_train", [*args, "--max_steps", 1, "--resume_checkpoint", "auto"], tmp_path,
               monkeypatch) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "warning: no state000002.pt beside" in log and "the data order restart" in log
    assert (tmp_path / "model000003.pt").exists() and (tmp_path / "state000003.pt").exists()


def test_state_file_is_not_a_resume_checkpoint(data, tmp_path, monkeypatch, capsys):
    args = ["--data_dir", data, *DIFFUSION, "--max_steps", 1]
    assert run("image_train", args, tmp_path, monkeypatch) == 0
    capsys.readouterr()
    status = run("image_train", [*args, "--resume_checkpoint", tmp_path / "state000001.pt"],
                 tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "takes the modelNNNNNN.pt file, not state000001.pt" in err[0]


# ----------------------------------------------------------------------------- storage failures


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def save_until_full(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 6:  # the second checkpoint's second file (its optimizer state)
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_full)
    status = run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 3,
                                 "--save_interval", 1], tmp_path, monkeypatch)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: cannot write checkpoint file ")
    assert "opt000002.pt: No space left on device" in err[0]
    assert f"the previous checkpoint {tmp_path / 'model000001.pt'} is intact" in err[0]
    names = sorted(os.listdir(tmp_path))
    # Step 2's EMA file was written, then removed with the failed checkpoint; no temporary file.
    assert [n for n in names if n.endswith(".pt")] == [
        "ema_0.9999_000001.pt", "model000001.pt", "opt000001.pt", "state000001.pt"]
    assert not [n for n in names if n.endswith(".tmp")]
    for name in names:
        if name.endswith(".pt"):
            load(tmp_path / name)
    assert checkpoints.find_latest_checkpoint(tmp_path, "model") == str(tmp_path / "model000001.pt")


REAL_DISK_FULL = textwrap.dedent(
    """
    import json, os, sys
    sys.argv[0] = "image_train.py"
    from guided_diffusion.runtime import checkpoints
    from guided_diffusion.cli.main import run_main
    import runpy
    module = runpy.run_path(os.path.join(sys.argv[1], "scripts", "image_train.py"))
    log_dir = sys.argv[2]
    try:
        status = run_main(module["main"], sys.argv[3:] + ["--log_dir", log_dir])
    except SystemExit as exc:
        status = exc.code
    latest = checkpoints.find_latest_checkpoint(log_dir, "model")
    names = sorted(os.listdir(log_dir))
    loadable = []
    for name in names:
        if name.endswith(".pt"):
            checkpoints.load_checkpoint(os.path.join(log_dir, name))
            loadable.append(name)
    print(json.dumps({"status": status, "latest": latest, "names": names, "loadable": loadable}))
    """
)


def run_on_small_disk(data, tmp_path, *extra):
    """Train 3 steps, saving each, into a 20 MB tmpfs in a private mount namespace (skipped
    where user namespaces are off): (the driver's JSON, the stderr's error lines, the folder)."""
    import json

    try:
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot create a user and mount namespace here (unshare -rm)")
    log_dir = tmp_path / "small_disk"
    log_dir.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(REAL_DISK_FULL)
    # One step's files take about 12 MB: the second checkpoint does not fit in 20 MB.
    command = (
        f"mount -t tmpfs -o size=20m tmpfs {log_dir} && exec {sys.executable} {script} {REPO} "
        f"{log_dir} --data_dir {data} {' '.join(DIFFUSION)} --max_steps 3 --save_interval 1 "
        + " ".join(extra)
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=child_env(cpu=True),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert out["status"] == 2 and len(errors) == 1, proc.stderr[-2000:]
    return out, errors, log_dir


def test_a_real_full_disk(data, tmp_path):
    out, errors, log_dir = run_on_small_disk(data, tmp_path)
    assert "No space left on device" in errors[0] and "model000001.pt is intact" in errors[0]
    assert out["latest"] == str(log_dir / "model000001.pt")
    assert [n for n in out["names"] if n.endswith(".pt")] == out["loadable"]
    assert not [n for n in out["names"] if "000002" in n or n.endswith(".tmp")]


def test_unwritable_log_folder_is_one_line(data, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    folders = [blocker / "logs"]  # under a file: no one can create it, root included
    if os.geteuid() != 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        folders.append(readonly / "logs")
    elif os.path.isdir("/sys"):
        folders.append("/sys/gd_logs")  # sysfs refuses new folders even to root
    for folder in folders:
        status = run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 1], folder,
                     monkeypatch)
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: cannot write to the log folder {folder} (")
        assert "pass --log_dir" in err[0]


def test_fp16_loss_scale_and_loss_aware_sampler_history_resume(tmp_path):
    from guided_diffusion.resample import LossSecondMomentResampler
    from guided_diffusion.script_util import create_gaussian_diffusion
    from test_train_util import make_loop, tiny_model

    def loop(**kwargs):
        diffusion = create_gaussian_diffusion(steps=100)
        return make_loop(tmp_path, model=tiny_model(use_fp16=True), diffusion=diffusion,
                         use_fp16=True, fp16_scale_growth=0.25,
                         schedule_sampler=LossSecondMomentResampler(diffusion), **kwargs)

    first = loop(max_steps=2)
    first.run_loop()
    assert first.mp_trainer.lg_loss_scale == 20.5
    history = first.schedule_sampler.state_dict()
    assert int(history["loss_counts"].sum()) == 8  # two steps of four timesteps
    resumed = loop(resume_checkpoint="auto", max_steps=1)
    assert resumed.mp_trainer.lg_loss_scale == 20.0  # restored when the loop starts
    resumed.run_loop()
    assert resumed.mp_trainer.lg_loss_scale == 20.75
    assert int(resumed.schedule_sampler.state_dict()["loss_counts"].sum()) == 12
    state = load(tmp_path / "state000003.pt")["shared"]
    assert state["lg_loss_scale"] == 20.75
    assert int(state["schedule_sampler"]["loss_counts"].sum()) == 12


# ----------------------------------------------------------------------------- auto resume


def test_auto_refuses_a_folder_whose_checkpoints_are_all_unreadable(data, tmp_path, monkeypatch,
                                                                     capsys):
    cut = tmp_path / "model000003.pt"
    cut.write_bytes(b"PK\x03\x04 cut short by a crash")
    status = run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 1,
                                 "--resume_checkpoint", "auto"], tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume_checkpoint auto: {tmp_path} holds model000003.pt, "
                             "but none can be read")
    assert cut.read_bytes() == b"PK\x03\x04 cut short by a crash"
    assert checkpoints.checkpoint_candidates(tmp_path, "model") == [str(cut)]  # nothing trained


def test_auto_skips_unreadable_newer_checkpoints_with_a_warning(data, tmp_path, monkeypatch):
    args = ["--data_dir", data, *DIFFUSION]
    assert run("image_train", [*args, "--max_steps", 1], tmp_path, monkeypatch) == 0
    (tmp_path / "model000002.pt").write_bytes(b"PK\x03\x04 cut short")
    assert run("image_train", [*args, "--max_steps", 1, "--resume_checkpoint", "auto"], tmp_path,
               monkeypatch) == 0
    log = (tmp_path / "log.txt").read_text()
    assert f"warning: --resume_checkpoint auto skipped model000002.pt in {tmp_path}" in log
    assert f"resuming from {tmp_path / 'model000001.pt'}" in log


def test_auto_without_a_fixed_log_folder_is_refused(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where a dated folder would go
    module = load_script("image_train")
    try:
        status = run_main(module.main, ["--data_dir", data, *DIFFUSION, "--max_steps", "1",
                                        "--resume_checkpoint", "auto"])
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "without --log_dir (or $OPENAI_LOGDIR) every run writes to a new dated folder" in err[0]
    assert "pass --log_dir DIR, the same in every run" in err[0]
    assert os.listdir(tmp_path) == []  # refused before any folder was made


# ----------------------------------------------------------------------------- changed flags


def last_lr(name, path):
    state = load(path)
    opt = {"cgan_train": lambda s: s["opt_g"], "vae_train": lambda s: s["opt"]}.get(
        name, lambda s: s)(state)
    return opt["param_groups"][0]["lr"]


RESUME_LR = {
    # name: (flags, total-steps flag, file holding the optimizer state of step N)
    "image_train": (DIFFUSION, "--lr_anneal_steps", "opt{:06d}.pt"),
    "classifier_train": (CLASSIFIER, "--iterations", "opt{:06d}.pt"),
    "cgan_train": (CGAN, "--iterations", "cgan{:06d}.pt"),
    "vae_train": (VAE, "--iterations", "vae{:06d}.pt"),
}


@pytest.mark.parametrize("name", list(RESUME_LR))
def test_lr_and_intervals_given_on_resume_take_effect_and_are_logged(name, data, tmp_path,
                                                                      monkeypatch):
    flags, total_flag, opt_file = RESUME_LR[name]
    common = ["--data_dir", data, *flags]
    if name != "image_train":  # image_train's --lr_anneal_steps would anneal the rate
        common += [total_flag, 4]
    assert run(name, [*common, "--lr", 1e-4, "--max_steps", 1], tmp_path, monkeypatch) == 0
    assert last_lr(name, tmp_path / opt_file.format(1)) == 1e-4
    assert run(name, [*common, "--lr", 5e-5, "--max_steps", 1, "--save_interval", 7,
                      "--resume_checkpoint", "auto"], tmp_path, monkeypatch) == 0
    assert last_lr(name, tmp_path / opt_file.format(2)) == 5e-5
    log = (tmp_path / "log.txt").read_text()
    changed = [line for line in log.splitlines() if line.startswith("resuming with changed")]
    assert changed == [f"resuming with changed settings: --save_interval "
                       f"{default_save_interval(name)} -> 7, --lr 0.0001 -> 5e-05"]


def default_save_interval(name):
    return load_script(name).create_argparser().get_default("save_interval")


def test_a_batch_size_changed_on_resume_is_warned_in_one_line(data, tmp_path, monkeypatch):
    args = ["--data_dir", data, *DIFFUSION, "--max_steps", 1]
    assert run("image_train", args, tmp_path, monkeypatch) == 0
    assert run("image_train", [*args, "--batch_size", 2, "--resume_checkpoint", "auto"],
               tmp_path, monkeypatch) == 0
    warnings = [line for line in (tmp_path / "log.txt").read_text().splitlines()
                if line.startswith("warning") and "batch_size" in line]
    assert warnings == ["warning: the saved data position is for batch_size=4 but this run has "
                        "batch_size=2: the train data order restarts"]


# ----------------------------------------------------------------------------- leftovers


def test_temporary_files_of_an_interrupted_save_are_removed_at_the_next_start(data, tmp_path,
                                                                            monkeypatch):
    # What a save killed mid-write leaves (runtime.files.atomic_write's temporary names).
    strays = [".model000002.pt.k3j_x9a1.tmp", ".opt000002.pt.zq81mbb0.tmp"]
    for name in strays:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 1], tmp_path,
               monkeypatch) == 0
    names = os.listdir(tmp_path)
    assert not set(strays) & set(names) and "notes.tmp" in names
    assert (f"removed 2 temporary file(s) that an interrupted save left in {tmp_path}: "
            f"{', '.join(sorted(strays))}") in (tmp_path / "log.txt").read_text()
