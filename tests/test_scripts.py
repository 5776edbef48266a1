"""The seven reference scripts end to end on tiny models: flags and defaults, distributed training
(mpiexec and torchrun), resuming, the seeding contract of the samplers, rank-ordered gathering,
classifier training and guidance, super-resolution with DDIM, NLL files, and one-line errors.

All on CPU, wherever the tests run: samples are compared bit for bit with references computed here
on the CPU, and several ranks share the machine (with a GPU, NCCL would refuse two ranks on it).
In-process runs get the cpu_only fixture, child processes CUDA_VISIBLE_DEVICES="". The scripts on
a GPU are exercised in test_cuda.py."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.cli.main import run_main
from guided_diffusion.script_util import (
    create_classifier,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model,
)

from _launch import child_env, find_mpiexec, mpiexec_prefix, torchrun_prefix
from conftest import conformance_dir

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
SCRIPT_NAMES = (
    "image_train", "image_sample", "classifier_train", "classifier_sample", "super_res_train",
    "super_res_sample", "image_nll",
)
NUM_CLASSES = 10
MODEL = (
    "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 8 --num_head_channels 16 --diffusion_steps 100 "
    f"--learn_sigma True --class_cond True --num_classes {NUM_CLASSES}"
).split()
CLASSIFIER = (
    "--classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2 "
    "--classifier_attention_resolutions 8"
).split()
SR = (
    "--large_size 16 --small_size 8 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 "
    "--attention_resolutions 8 --num_head_channels 16 --diffusion_steps 100"
).split()


def launch(launcher, name, args, timeout=150):
    """
    Run a script as a child on CPU: "python" (one process), "mpiexec" or "torchrun" (two ranks),
    or "two_ranks" (mpiexec where one matches mpi4py, else torchrun).
    """
    if launcher == "two_ranks":
        launcher = "mpiexec" if find_mpiexec()[0] else "torchrun"
    if launcher == "mpiexec":
        prefix = [*mpiexec_prefix(2), sys.executable]
    elif launcher == "torchrun":
        prefix = torchrun_prefix(2)
    else:
        prefix = [sys.executable]
    result = subprocess.run(
        prefix + [script_path(name)] + [str(a) for a in args],
        env=child_env(cpu=True), capture_output=True, text=True, timeout=timeout,
    )
    return result


def script_path(name):
    """scripts/<name>.py, or experiments/<name>.py for the experiments."""
    path = os.path.join(SCRIPTS, name + ".py")
    return path if os.path.exists(path) else os.path.join(REPO, "experiments", name + ".py")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", script_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_inprocess(name, args):
    """Run a script's main in this process through run_main; returns the exit status."""
    try:
        run_main(load_script(name).main, [str(a) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Digits at 16x16 and a class-conditional model trained for 4 steps on 2 ranks."""
    root = tmp_path_factory.mktemp("scripts")
    data = write_digits(str(root / "digits"), image_size=16, limit=60)
    train_dir = root / "train"
    result = launch("two_ranks", "image_train", [
        "--data_dir", data, *MODEL, "--batch_size", 4, "--lr_anneal_steps", 4,
        "--save_interval", 2, "--log_interval", 1, "--log_dir", train_dir,
        # rank 0 draws a grid at step 4 (the weights are those of a run without it)
        "--sample_interval", 4, "--sample_steps", 5,
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "data": data, "train": train_dir}


# ----------------------------------------------------------------------------- flags


def test_every_reference_flag_and_default_is_kept():
    folder = conformance_dir()
    if folder is None:
        pytest.skip("conformance vectors not found")
    reference = json.loads((folder / "defaults.json").read_text())
    for name in SCRIPT_NAMES:
        parsed = vars(load_script(name).create_argparser().parse_args([]))
        for flag, default in reference[name].items():
            assert flag in parsed, f"{name} lacks --{flag}"
            assert parsed[flag] == default and type(parsed[flag]) is type(default), (
                f"{name} --{flag}: {parsed[flag]!r} != {default!r}"
            )
        # Added flags keep the reference behaviour by default.
        assert parsed["seed"] == 0 and parsed["num_classes"] == 1000 and parsed["log_dir"] == ""
    sample = load_script("image_sample").create_argparser()
    assert sample.parse_args(["--use_ddim", "YES", "--class_cond", "f"]).use_ddim is True
    assert sample.parse_args(["--class_cond", "0"]).class_cond is False


# ----------------------------------------------------------------------------- training


def test_two_rank_training_writes_checkpoints_and_logs(work):
    names = set(os.listdir(work["train"]))
    for step in (2, 4):
        assert {f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt"} <= names
    assert {"progress.csv", "log.txt", "log-rank001.txt"} <= names
    state = torch.load(work["train"] / "ema_0.9999_000004.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "label_emb.weight" in state and state["label_emb.weight"].shape[0] == NUM_CLASSES
    header, *rows = (work["train"] / "progress.csv").read_text().splitlines()
    columns = header.split(",")
    for key in ("loss", "mse", "vb", "loss_q0", "grad_norm", "param_norm", "step", "samples"):
        assert key in columns
    steps = [float(r.split(",")[columns.index("step")]) for r in rows]
    samples = [float(r.split(",")[columns.index("samples")]) for r in rows]
    # The logged step counts the steps taken, as the checkpoint names do.
    assert steps == [1, 2, 3, 4] and samples == [8, 16, 24, 32]  # 2 ranks x batch 4
    # args.json, written by rank 0 alone, names the job's size and launcher.
    record = json.loads((work["train"] / "args.json").read_text())
    launcher = "mpiexec" if find_mpiexec()[0] else "torchrun"
    assert record["world_size"] == 2 and record["launcher"].split()[0] == launcher
    assert not [n for n in names if n.startswith("args-")]
    assert [n for n in names if n.endswith(".png")] == ["samples_step000004.png"]


def test_resume_from_path_and_auto(work, tmp_path):
    for name in ("model000004.pt", "ema_0.9999_000004.pt", "opt000004.pt"):
        shutil.copy(work["train"] / name, tmp_path / name)
    common = ["--data_dir", work["data"], *MODEL, "--batch_size", 2, "--log_interval", 1,
              "--log_dir", tmp_path]
    def logged_steps():
        header, *rows = (tmp_path / "progress.csv").read_text().splitlines()
        return [float(r.split(",")[header.split(",").index("step")]) for r in rows]

    assert run_inprocess("image_train", [
        *common, "--resume_checkpoint", tmp_path / "model000004.pt", "--lr_anneal_steps", 5]) == 0
    assert logged_steps() == [5]  # the run continued where the checkpoint left off
    assert run_inprocess("image_train", [
        *common, "--resume_checkpoint", "auto", "--lr_anneal_steps", 6]) == 0
    assert logged_steps() == [6]
    names = os.listdir(tmp_path)
    assert {"model000005.pt", "model000006.pt", "ema_0.9999_000006.pt", "opt000006.pt"} <= set(names)
    opt = torch.load(tmp_path / "opt000006.pt", weights_only=True)
    assert all(float(s["step"]) == 6 for s in opt["state"].values())


def test_torchrun_training(work, tmp_path):
    result = launch("torchrun", "image_train", [
        "--data_dir", work["data"], *MODEL, "--batch_size", 2, "--max_steps", 2,
        "--log_dir", tmp_path, "--log_interval", 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model000002.pt", "log-rank001.txt", "progress.csv"} <= set(os.listdir(tmp_path))
    record = json.loads((tmp_path / "args.json").read_text())
    assert (record["world_size"], record["launcher"]) == (2, "torchrun")


# ----------------------------------------------------------------------------- sampling


def reference_samples(checkpoint, seed, batch, respacing, use_ddim=False):
    """What the reference computes after torch.manual_seed(seed): labels first, then the loop."""
    flags = model_and_diffusion_defaults()
    parsed = vars(load_script("image_sample").create_argparser().parse_args(
        [*MODEL, "--timestep_respacing", respacing]))
    flags = {k: parsed[k] for k in flags}
    model, diffusion = create_model_and_diffusion(**flags, num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    torch.manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    sample = loop(model, (batch, 3, 16, 16), clip_denoised=True, model_kwargs={"y": labels})
    return to_uint8(sample).numpy(), labels.numpy()


def sample_args(work, out, seed, num, batch, respacing="5"):
    return ["--model_path", work["train"] / "ema_0.9999_000004.pt", *MODEL, "--seed", seed,
            "--num_samples", num, "--batch_size", batch, "--timestep_respacing", respacing,
            "--log_dir", out, "--progress", "False"]


def test_image_sample_seed_contract_one_process(work, tmp_path):
    assert run_inprocess("image_sample", sample_args(work, tmp_path, 7, 3, 3)) == 0
    with np.load(tmp_path / "samples_3x16x16x3.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    expected, expected_labels = reference_samples(work["train"] / "ema_0.9999_000004.pt", 7, 3, "5")
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(images, expected)
    assert (tmp_path / "samples_3x16x16x3.png").exists()


def test_two_rank_sampling_gathers_distinct_batches_in_rank_order(work, tmp_path):
    result = launch("mpiexec", "image_sample", sample_args(work, tmp_path, 3, 5, 2, "ddim4")
                    + ["--use_ddim", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "samples_5x16x16x3.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert not np.array_equal(images[0:2], images[2:4])
    # Round one holds rank 0's first batch (seed 3), then rank 1's (seed 4); round two starts
    # with rank 0's second batch.
    for rank in (0, 1):
        ref, ref_labels = reference_samples(
            work["train"] / "ema_0.9999_000004.pt", 3 + rank, 2, "ddim4", use_ddim=True)
        np.testing.assert_array_equal(images[2 * rank : 2 * rank + 2], ref)
        np.testing.assert_array_equal(labels[2 * rank : 2 * rank + 2], ref_labels)


@pytest.fixture(scope="module")
def classifier_dir(work):
    out = work["root"] / "classifier"
    result = launch("two_ranks", "classifier_train", [
        "--data_dir", work["data"], "--val_data_dir", work["data"], "--image_size", 16,
        *CLASSIFIER, "--num_classes", NUM_CLASSES, "--diffusion_steps", 100, "--batch_size", 4,
        "--iterations", 3, "--save_interval", 2, "--log_interval", 1, "--log_dir", out])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_classifier_train_two_cpu_ranks(classifier_dir):
    names = set(os.listdir(classifier_dir))
    assert {"model000002.pt", "opt000002.pt", "model000003.pt", "log-rank001.txt"} <= names
    header = (classifier_dir / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "grad_norm",
                "samples_per_sec"):
        assert key in header
    # A progress line per log interval: steps taken of the total, the training loss, the speed.
    lines = [l for l in (classifier_dir / "log.txt").read_text().splitlines()
             if l.startswith("step ")]
    assert [l.split(" | ")[0] for l in lines] == ["step 1/3 (33%)", "step 2/3 (67%)",
                                                  "step 3/3 (100%)"]
    for line in lines:
        loss = float(line.split(" | ")[1].removeprefix("loss "))
        assert 0 < loss < 10 and "samples/s" in line


def test_classifier_sample_writes_labels(work, classifier_dir, tmp_path):
    args = [*sample_args(work, tmp_path, 1, 2, 2, "ddim3"), "--use_ddim", "True", *CLASSIFIER,
            "--classifier_path", classifier_dir / "model000003.pt", "--classifier_scale", 10.0]
    assert run_inprocess("classifier_sample", args) == 0
    with np.load(tmp_path / "samples_2x16x16x3.npz") as npz:
        assert npz["arr_0"].shape == (2, 16, 16, 3) and npz["arr_1"].shape == (2,)
        assert npz["arr_1"].max() < NUM_CLASSES
        guided = npz["arr_0"]
    # Without guidance (scale 0) the same seed gives other images: the gradient was used.
    assert run_inprocess("classifier_sample", args[:-1] + [0.0, "--overwrite", True]) == 0
    with np.load(tmp_path / "samples_2x16x16x3.npz") as npz:
        assert not np.array_equal(npz["arr_0"], guided)


def test_super_res_train_and_ddim_sample(work, tmp_path):
    assert run_inprocess("super_res_train", [
        "--data_dir", work["data"], *SR, "--batch_size", 2, "--max_steps", 2,
        "--log_dir", tmp_path]) == 0
    base = (np.arange(3 * 8 * 8 * 3) % 256).astype(np.uint8).reshape(3, 8, 8, 3)
    np.savez(tmp_path / "base.npz", base)
    assert run_inprocess("super_res_sample", [
        "--model_path", tmp_path / "model000002.pt", *SR, "--base_samples", tmp_path / "base.npz",
        "--num_samples", 3, "--batch_size", 3, "--timestep_respacing", "ddim4", "--use_ddim", "True",
        "--seed", 2, "--log_dir", tmp_path, "--progress", "False"]) == 0
    with np.load(tmp_path / "samples_3x16x16x3.npz") as npz:
        images = npz["arr_0"]
    # Recompute with ddim_sample_loop directly: the script must have honoured --use_ddim.
    from guided_diffusion.script_util import sr_create_model_and_diffusion

    flags = vars(load_script("super_res_sample").create_argparser().parse_args(
        [*SR, "--timestep_respacing", "ddim4"]))
    from guided_diffusion.script_util import sr_model_and_diffusion_defaults

    keys = list(sr_model_and_diffusion_defaults()) + ["num_classes", "channel_mult"]
    model, diffusion = sr_create_model_and_diffusion(**{k: flags[k] for k in keys})
    model.load_state_dict(torch.load(tmp_path / "model000002.pt", weights_only=True))
    model.eval()
    low_res = torch.from_numpy(base).float().permute(0, 3, 1, 2) / 127.5 - 1
    torch.manual_seed(2)
    expected = diffusion.ddim_sample_loop(model, (3, 3, 16, 16), model_kwargs={"low_res": low_res})
    np.testing.assert_array_equal(images, to_uint8(expected).numpy())


def test_image_nll_writes_terms(work, tmp_path, capsys):
    assert run_inprocess("image_nll", [
        "--data_dir", work["data"], "--model_path", work["train"] / "model000004.pt", *MODEL,
        "--num_samples", 2, "--batch_size", 2, "--log_dir", tmp_path, "--progress", "False"]) == 0
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(tmp_path / f"{name}_terms.npz") as npz:
            terms = npz["arr_0"]
        assert terms.shape == (100,) and np.isfinite(terms).all()
    assert "bpd=" in (tmp_path / "log.txt").read_text()


# ----------------------------------------------------------------------------- bad input


def error_line(capsys, status):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_data_dirs(work, tmp_path, capsys):
    base = [*MODEL, "--batch_size", 2, "--max_steps", 1, "--log_dir", tmp_path / "log"]
    line = error_line(capsys, run_inprocess("image_train", ["--data_dir", tmp_path / "nope", *base]))
    assert "nope" in line
    (tmp_path / "empty").mkdir()
    line = error_line(capsys, run_inprocess("image_train", ["--data_dir", tmp_path / "empty", *base]))
    assert "no images" in line
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(work["data"], unlabelled)
    shutil.copy(unlabelled / "0_0000.png", unlabelled / "plain.png")
    line = error_line(capsys, run_inprocess("image_train", ["--data_dir", unlabelled, *base]))
    assert "plain.png" in line and "--class_cond False" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(4):
        shutil.copy(os.path.join(work["data"], f"{i}_000{i}.png"), broken / f"{i}_000{i}.png")
        (broken / f"{i}_bad.png").write_bytes(b"not a png")
    # Four steps of two images read the whole shuffled folder, so a bad file is met whatever
    # the order.
    line = error_line(capsys, run_inprocess("image_train", ["--data_dir", broken, *base,
                                                             "--max_steps", 4]))
    assert "_bad.png" in line


def test_checkpoint_flag_hints(work, tmp_path, capsys):
    checkpoint = work["train"] / "ema_0.9999_000004.pt"

    def hint(*changes):
        args = sample_args(work, tmp_path, 0, 1, 1) + [str(c) for c in changes]
        return error_line(capsys, run_inprocess("image_sample", args))

    assert "--class_cond True" in hint("--class_cond", "False")
    assert "--learn_sigma True" in hint("--learn_sigma", "False")
    assert "--num_channels 32" in hint("--num_channels", "64")
    assert "--num_res_blocks 1" in hint("--num_res_blocks", "2")
    assert "--attention_resolutions 8" in hint("--attention_resolutions", "4")
    assert "--use_scale_shift_norm True" in hint("--use_scale_shift_norm", "False")
    assert "--resblock_updown False" in hint("--resblock_updown", "True")
    assert "--num_classes 10" in hint("--num_classes", "7")
    line = hint("--model_path", work["train"] / "opt000004.pt")
    assert "optimizer checkpoint" in line
    assert checkpoint.exists()


def test_classifier_of_another_image_size(work, classifier_dir, tmp_path, capsys):
    model_flags = dict(channel_mult="1,2", attention_resolutions="8", num_head_channels=16,
                       learn_sigma=True, class_cond=True, num_classes=NUM_CLASSES,
                       use_scale_shift_norm=True)
    torch.save(create_model(32, 32, 1, **model_flags).state_dict(), tmp_path / "model32.pt")
    args = ["--model_path", tmp_path / "model32.pt", *MODEL, "--image_size", 32, *CLASSIFIER,
            "--classifier_path", classifier_dir / "model000003.pt", "--num_samples", 1,
            "--batch_size", 1, "--timestep_respacing", "2", "--log_dir", tmp_path]
    line = error_line(capsys, run_inprocess("classifier_sample", args))
    assert "image size" in line and "--image_size 16" in line


def test_a_checkpoint_that_differs_in_several_flags_gets_one_complete_fix(tmp_path, capsys):
    """The newcomer's two cases, on untrained toy checkpoints: a 4-class classifier sampled with
    the default --num_classes 1000, and a diffusion model trained with three other flags."""
    model_flags = dict(model_and_diffusion_defaults(), image_size=16, num_channels=32,
                       num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                       num_head_channels=16)
    torch.save(create_model_and_diffusion(**model_flags)[0].state_dict(), tmp_path / "uncond.pt")
    classifier = create_classifier(16, False, 32, 1, "8", True, True, "attention", num_classes=4,
                                   classifier_channel_mult="1,2")
    torch.save(classifier.state_dict(), tmp_path / "classifier4.pt")
    model_args = ["--image_size", 16, "--num_channels", 32, "--num_res_blocks", 1,
                  "--channel_mult", "1,2", "--attention_resolutions", 8, "--num_head_channels", 16]
    refused = tmp_path / "refused"
    base = ["--num_samples", 1, "--batch_size", 1, "--timestep_respacing", "2", "--log_dir", refused]
    line = error_line(capsys, run_inprocess("classifier_sample", [
        "--model_path", tmp_path / "uncond.pt", *model_args, *CLASSIFIER,
        "--classifier_path", tmp_path / "classifier4.pt", *base]))
    assert "classifier4.pt does not fit the classifier flags: pass --num_classes 4 (" in line
    assert not refused.exists()  # refused on its flags before the log folder was made

    # Trained with --num_res_blocks 2 --resblock_updown True --attention_resolutions 16,8.
    other = dict(model_flags, num_res_blocks=2, resblock_updown=True, attention_resolutions="16,8")
    torch.save(create_model_and_diffusion(**other)[0].state_dict(), tmp_path / "other.pt")
    line = error_line(capsys, run_inprocess("image_sample", [
        "--model_path", tmp_path / "other.pt", *model_args, *base]))
    fix = line.split(": pass ", 1)[1].split(" (")[0]
    assert "other flags may differ" not in line and " or pass " not in fix
    assert sorted(fix.split(" --")) == sorted(
        "--num_res_blocks 2 --resblock_updown True --attention_resolutions 16,8".split(" --"))
    assert not refused.exists()
    # The fix, applied, loads; the sampling folder holds no empty progress.csv.
    args = [*model_args, *fix.split()]
    assert run_inprocess("image_sample", ["--model_path", tmp_path / "other.pt", *args, *base,
                                          "--progress", "False"]) == 0
    assert sorted(os.listdir(refused)) == ["log.txt", "samples_1x16x16x3.npz", "samples_1x16x16x3.png"]


def test_runs_refused_on_their_flags_leave_no_log_folder(tmp_path, capsys):
    flags = dict(model_and_diffusion_defaults(), image_size=16, num_channels=32, num_res_blocks=1,
                 channel_mult="1,2", attention_resolutions="8", num_head_channels=16)
    torch.save(create_model_and_diffusion(**flags)[0].state_dict(), tmp_path / "toy.pt")
    model_args = ["--model_path", tmp_path / "toy.pt", "--image_size", 16, "--num_channels", 32,
                  "--num_res_blocks", 1, "--channel_mult", "1,2", "--attention_resolutions", 8,
                  "--num_head_channels", 16]
    log = tmp_path / "log"
    cases = [
        ("image_nll", [*model_args, "--data_dir", tmp_path / "missing", "--log_dir", log], "missing"),
        ("image_sample", [*model_args, "--num_channels", 64, "--log_dir", log], "--num_channels 32"),
        ("super_res_sample", [*model_args[:2], *SR, "--log_dir", log], "does not fit"),
    ]
    for script, args, words in cases:
        line = error_line(capsys, run_inprocess(script, args))
        assert words in line and not log.exists(), (script, line)


def test_base_samples_of_the_wrong_shape(tmp_path, capsys):
    model = sr_create_model(16, 8, 32, 1, learn_sigma=False, class_cond=False,
                            use_checkpoint=False, attention_resolutions="8", num_heads=4,
                            num_head_channels=16, num_heads_upsample=-1,
                            use_scale_shift_norm=True, dropout=0.0, resblock_updown=False,
                            use_fp16=False, channel_mult="1,2")
    torch.save(model.state_dict(), tmp_path / "sr.pt")
    np.savez(tmp_path / "base.npz", np.zeros((2, 16, 16, 3), np.uint8))
    line = error_line(capsys, run_inprocess("super_res_sample", [
        "--model_path", tmp_path / "sr.pt", *SR, "--base_samples", tmp_path / "base.npz",
        "--log_dir", tmp_path]))
    assert "--small_size 16" in line


def test_cli_exit_status_and_single_line(tmp_path):
    result = launch("python", "image_sample", ["--model_path", tmp_path / "missing.pt",
                                               "--log_dir", tmp_path])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.pt" in lines[0]
    assert "Traceback" not in result.stderr
