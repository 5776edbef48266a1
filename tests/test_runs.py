"""
Runs a researcher can live in (docs/runs.md), in this process on CPU with tiny models:

- args.json: every training script records its flags, versions, commit, world size and launcher;
  the sampling scripts take the model's flags from it (beside --model_path or --config), the
  command line winning, and refuse another family's record or a missing --config in one line;
- watching: --sample_interval grids and --val_data_dir losses leave the training bit for bit as
  it was; --log_format; images reach TensorBoard's writer;
- the EMA warm-up, --keep_checkpoints (also across a process killed while saving), --grad_clip;
- fine-tuning a checkpoint with the released layout's key names (--init_checkpoint,
  --init_num_classes, --init_add_null_class), then sampling it with --guidance_scale.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import guided_diffusion
from guided_diffusion import logger
from guided_diffusion.cli import run_config
from guided_diffusion.data.digits import write_digits
from guided_diffusion.errors import ScriptError
from guided_diffusion.fp16_util import MixedPrecisionTrainer, make_adamw
from guided_diffusion.runtime.run_record import describe_run, write_run_record
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.training.ema import ema_decay
from guided_diffusion.training.engine import KEEP_ALL

from _launch import child_env
from conftest import conformance_dir
from test_resume import CGAN, CLASSIFIER, DIFFUSION, SUPER_RES, VAE, load, run, tensors_equal
from test_scripts import load_script
from test_train_util import make_loop, tiny_model

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("digits") / "d"), image_size=16, limit=12)


def error_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def pt_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".pt"))


# ----------------------------------------------------------------------------- args.json

TRAINING = {
    "image_train": [*DIFFUSION],
    "super_res_train": [*SUPER_RES],
    "classifier_train": [*CLASSIFIER],
    "cgan_train": [*CGAN],
    "vae_train": [*VAE],
}
FAMILY = {"image_train": "diffusion", "super_res_train": "super_res",
          "classifier_train": "classifier", "cgan_train": "cgan", "vae_train": "vae"}


def git_head():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@pytest.mark.parametrize("name", list(TRAINING))
def test_every_training_script_records_its_run(name, data, tmp_path, monkeypatch):
    argv = ["--data_dir", data, *TRAINING[name], "--max_steps", 1]
    assert run(name, argv, tmp_path, monkeypatch) == 0
    record = json.loads((tmp_path / "args.json").read_text())
    parser = load_script(name).create_argparser()
    expected = vars(parser.parse_args([*map(str, argv), "--log_dir", str(tmp_path)]))
    # Every flag after parsing, with its parsed value.
    assert record["flags"] == json.loads(json.dumps(expected))
    assert record["script"] == f"{name}.py" and record["family"] == FAMILY[name]
    assert record["command_line"] == [*map(str, argv), "--log_dir", str(tmp_path)]
    assert record["package_version"] == guided_diffusion.__version__
    assert record["git_commit"] == git_head()
    assert record["torch_version"] == torch.__version__
    assert record["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert record["world_size"] == 1 and record["launcher"] == "python"


def test_a_second_run_keeps_the_first_record_and_the_version_is_setup_pys(data, tmp_path,
                                                                          monkeypatch):
    argv = ["--data_dir", data, *VAE]
    assert run("vae_train", [*argv, "--max_steps", 1], tmp_path, monkeypatch) == 0
    first = (tmp_path / "args.json").read_text()
    assert run("vae_train", [*argv, "--max_steps", 1, "--resume_checkpoint", "auto"], tmp_path,
               monkeypatch) == 0
    assert (tmp_path / "args-001.json").read_text() == first
    assert json.loads((tmp_path / "args.json").read_text())["flags"]["resume_checkpoint"] == "auto"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    with open(os.path.join(REPO, "setup.py")) as f:
        version = re.search(r'version="([^"]+)"', f.read()).group(1)
    assert version == guided_diffusion.__version__


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 2-step unconditional run of image_train (its folder holds args.json)."""
    folder = tmp_path_factory.mktemp("trained")
    mp = pytest.MonkeyPatch()
    try:
        status = run("image_train", ["--data_dir", data, *DIFFUSION, "--max_steps", 2,
                                     "--ema_rate", "0.9"], folder, mp)
    finally:
        mp.undo()
    assert status == 0
    return folder


def sample(args, log_dir):
    module = load_script("image_sample")
    from guided_diffusion.cli.main import run_main

    try:
        return run_main(module.main, [*map(str, args), "--log_dir", str(log_dir)]) or 0
    except SystemExit as exc:
        return exc.code


SAMPLING = ["--num_samples", 2, "--batch_size", 2, "--timestep_respacing", 4, "--seed", 3]


def test_sampling_takes_the_model_flags_from_the_runs_args_json(trained, tmp_path, capsys):
    checkpoint = trained / "ema_0.9_000002.pt"
    assert sample(["--model_path", checkpoint, *SAMPLING], tmp_path / "auto") == 0
    # The same samples as with every model flag spelled out.
    assert sample(["--model_path", checkpoint, *SAMPLING, *DIFFUSION[:-2], "--config", "none"],
                  tmp_path / "explicit") == 0
    auto = np.load(tmp_path / "auto" / "samples_2x16x16x3.npz")["arr_0"]
    explicit = np.load(tmp_path / "explicit" / "samples_2x16x16x3.npz")["arr_0"]
    assert np.array_equal(auto, explicit)
    # One line says where each flag came from.
    log = (tmp_path / "auto" / "log.txt").read_text().splitlines()
    (line,) = [x for x in log if x.startswith("flags from ")]
    assert f"from {trained / 'args.json'}: " in line and "--num_channels 32" in line
    assert "--diffusion_steps 50" in line and "--timestep_respacing" not in line.split(";")[0]
    assert "from the command line: --batch_size --log_dir --model_path" in line
    assert "flags from" not in (tmp_path / "explicit" / "log.txt").read_text()

    # --config names the record explicitly, for a checkpoint kept elsewhere.
    elsewhere = tmp_path / "copy.pt"
    elsewhere.write_bytes(checkpoint.read_bytes())
    assert sample(["--model_path", elsewhere, *SAMPLING, "--config", trained / "args.json"],
                  tmp_path / "config") == 0
    assert np.array_equal(np.load(tmp_path / "config" / "samples_2x16x16x3.npz")["arr_0"], auto)


def test_a_released_checkpoint_without_args_json_behaves_as_before(trained, tmp_path, capsys):
    released = tmp_path / "released" / "model.pt"
    released.parent.mkdir()
    released.write_bytes((trained / "ema_0.9_000002.pt").read_bytes())
    # Nothing is taken from anywhere: a flag left out is the default, and the message says so.
    without_width = [a for a in DIFFUSION[:-2] if a not in ("--num_channels", "32")]
    assert sample(["--model_path", released, *SAMPLING, *without_width], tmp_path / "a") == 2
    (line,) = error_lines(capsys)
    assert "does not fit the model flags" in line and "pass --num_channels 32" in line
    assert sample(["--model_path", released, *SAMPLING, *DIFFUSION[:-2]], tmp_path / "b") == 0
    assert "flags from" not in (tmp_path / "b" / "log.txt").read_text()


def test_command_line_flags_win_and_a_contradiction_gets_the_flag_hint(trained, tmp_path, capsys):
    checkpoint = trained / "ema_0.9_000002.pt"
    assert sample(["--model_path", checkpoint, *SAMPLING, "--num_channels", 64], tmp_path) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: checkpoint ") and "pass --num_channels 32" in line


def test_bad_configs_are_one_line(trained, data, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "args.json"
    assert sample(["--model_path", trained / "model000002.pt", "--config", missing],
                  tmp_path / "a") == 2
    (line,) = error_lines(capsys)
    assert line == (f"error: --config {missing} does not exist: pass the args.json in a training "
                    "run's log folder")
    assert not (tmp_path / "a").exists()
    # The record of another model family beside the checkpoint.
    vae_dir = tmp_path / "vae"
    assert run("vae_train", ["--data_dir", data, *VAE, "--max_steps", 1], vae_dir,
               monkeypatch) == 0
    capsys.readouterr()
    (vae_dir / "model.pt").write_bytes((trained / "model000002.pt").read_bytes())
    assert sample(["--model_path", vae_dir / "model.pt", *SAMPLING], tmp_path / "b") == 2
    (line,) = error_lines(capsys)
    assert f"{vae_dir / 'args.json'} records a VAE (vae_train.py)" in line
    assert "takes a diffusion model (image_train.py)" in line and "--config none" in line
    assert not (tmp_path / "b").exists()
    # A JSON file that is not a record.
    other = tmp_path / "other.json"
    other.write_text('{"image_size": 16}')
    assert sample(["--model_path", trained / "model000002.pt", "--config", other],
                  tmp_path / "c") == 2
    (line,) = error_lines(capsys)
    assert "is not an args.json written by a training script" in line


def record_for(folder, script, argv):
    parser = load_script(script).create_argparser()
    folder.mkdir(parents=True, exist_ok=True)
    write_run_record(str(folder), describe_run(vars(parser.parse_args(argv)), f"{script}.py", argv))
    return folder / "args.json"


def test_classifier_sample_reads_both_records_and_refuses_disagreeing_sizes(tmp_path):
    model_argv = "--image_size 32 --num_channels 64 --class_cond True --num_classes 10".split()
    record_for(tmp_path / "m", "image_train", model_argv)
    record_for(tmp_path / "c", "classifier_train",
               "--image_size 32 --classifier_width 48 --num_classes 10".split())
    parser = load_script("classifier_sample").create_argparser()
    argv = ["--model_path", str(tmp_path / "m" / "x.pt"), "--classifier_path",
            str(tmp_path / "c" / "y.pt"), "--classifier_scale", "2"]
    args = run_config.parse_args(parser, argv)
    assert (args.image_size, args.num_channels, args.class_cond) == (32, 64, True)
    assert (args.classifier_width, args.num_classes, args.classifier_scale) == (48, 10, 2.0)
    record_for(tmp_path / "c", "classifier_train", "--image_size 16 --num_classes 10".split())
    with pytest.raises(ScriptError, match=r"has --image_size 32 but .*c/args.json has "
                                          r"--image_size 16"):
        run_config.parse_args(parser, argv)
    # A flag on the command line settles it.
    assert run_config.parse_args(parser, [*argv, "--image_size", "16"]).image_size == 16
    logger.hold_lines([])


@pytest.mark.parametrize("script", ["super_res_sample", "image_nll", "ddim_invert",
                                    "ddim_interpolate", "ddim_consistency"])
def test_every_sampling_tool_takes_the_flags(script, tmp_path):
    trainer = "super_res_train" if script == "super_res_sample" else "image_train"
    size = ["--large_size", "32"] if trainer == "super_res_train" else ["--image_size", "32"]
    record_for(tmp_path, trainer, [*size, "--num_channels", "64", "--learn_sigma", "True"])
    parser = load_script(script).create_argparser()
    args = run_config.parse_args(parser, ["--model_path", str(tmp_path / "m.pt")])
    assert (getattr(args, size[0][2:]), args.num_channels, args.learn_sigma) == (32, 64, True)
    logger.hold_lines([])


# ----------------------------------------------------------------------------- watching a run

WATCH = ["--sample_interval", 1, "--sample_steps", 5, "--val_interval", 2, "--val_num_images", 6]


@pytest.mark.parametrize("name", ["image_train", "super_res_train"])
def test_sample_grids_and_validation_leave_the_training_bit_for_bit(name, data, tmp_path,
                                                                   monkeypatch):
    flags = {"image_train": DIFFUSION, "super_res_train": SUPER_RES}[name]
    # A fast-moving EMA, so that the grids show the weights changing.
    common = ["--data_dir", data, *flags, "--max_steps", 3, "--log_interval", 1, "--lr", 1e-3,
              "--ema_rate", 0.5]
    assert run(name, common, tmp_path / "plain", monkeypatch) == 0
    assert run(name, [*common, *WATCH, "--val_data_dir", data], tmp_path / "watched",
               monkeypatch) == 0
    for file in pt_files(tmp_path / "plain"):
        assert tensors_equal(load(tmp_path / "plain" / file), load(tmp_path / "watched" / file)), file
    grids = sorted(n for n in os.listdir(tmp_path / "watched") if n.endswith(".png"))
    assert grids == ["samples_step000001.png", "samples_step000002.png", "samples_step000003.png"]
    from PIL import Image

    first, last = (np.asarray(Image.open(tmp_path / "watched" / g)) for g in (grids[0], grids[-1]))
    assert first.shape == last.shape and not np.array_equal(first, last)  # the weights moved
    columns, *rows = (tmp_path / "watched" / "progress.csv").read_text().splitlines()
    columns = columns.split(",")
    for key in ("val_loss", "val_mse", "val_loss_q0", "val_mse_q3"):
        assert key in columns
    logged = [r.split(",")[columns.index("val_loss")] for r in rows]
    assert [v != "" for v in logged] == [False, True, False]  # step 2 only (--val_interval 2)
    log = (tmp_path / "watched" / "log.txt").read_text()
    count = 16 if name == "image_train" else 4  # super-res: the first batch's low-res images
    assert f"step 3: {count} samples (5 DDIM steps, EMA 0.5 weights) in " in log


def test_validation_uses_a_fixed_subset(data, tmp_path, monkeypatch):
    # With lr 0 the weights never move, so two validations must give the same numbers.
    common = ["--data_dir", data, *DIFFUSION, "--max_steps", 2, "--lr", 0, "--log_interval", 1,
              "--val_data_dir", data, "--val_interval", 1, "--val_num_images", 5]
    assert run("image_train", common, tmp_path, monkeypatch) == 0
    columns, *rows = (tmp_path / "progress.csv").read_text().splitlines()
    index = [i for i, c in enumerate(columns.split(",")) if c.startswith("val_")]
    first, second = ([r.split(",")[i] for i in index] for r in rows)
    assert first == second and all(first)


def test_log_format_flag_and_the_environment_variable(data, tmp_path, monkeypatch, capsys):
    common = ["--data_dir", data, *VAE, "--max_steps", 1, "--log_interval", 1]
    assert run("vae_train", [*common, "--log_format", "json,log"], tmp_path / "a", monkeypatch) == 0
    names = set(os.listdir(tmp_path / "a"))
    assert {"progress.json", "log.txt"} <= names and "progress.csv" not in names
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "csv")
    assert run("vae_train", common, tmp_path / "b", monkeypatch) == 0
    names = set(os.listdir(tmp_path / "b"))
    assert "progress.csv" in names and "log.txt" not in names
    capsys.readouterr()
    assert run("vae_train", [*common, "--log_format", "csv,html"], tmp_path / "c",
               monkeypatch) == 2
    (line,) = error_lines(capsys)
    assert "--log_format csv,html: unknown format html" in line
    assert not (tmp_path / "c").exists()


def test_sample_grids_reach_tensorboard(monkeypatch, tmp_path):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            pass

        def add_image(self, key, image, step, dataformats):
            written.append((key, image.shape, image.dtype, step, dataformats))

        def flush(self):
            pass

        def close(self):
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    logger.configure(dir=str(tmp_path), format_strs=["log", "tensorboard"])
    try:
        logger.log_image("samples", np.zeros((20, 30, 3), np.uint8), 7)
    finally:
        logger.Logger.CURRENT.close()
    assert written == [("samples", (20, 30, 3), np.uint8, 7, "HWC")]


# ----------------------------------------------------------------------------- EMA warm-up


def test_ema_decay_follows_the_inverse_gamma_form():
    assert ema_decay(0.9999, 5) == 0.9999  # off by default: the reference's constant rate
    for step in (0, 1, 10, 1000):
        want = min(0.999, 1 - (1 + step / 2.0) ** -0.75)
        assert ema_decay(0.999, step, 0.75, 2.0) == want
    assert ema_decay(0.999, 0, 0.75) == 0.0  # the first update copies the weights
    assert ema_decay(0.999, 10**9, 0.75) == 0.999


def test_ema_warmup_in_training(tmp_path):
    loop = make_loop(tmp_path, ema_rate="0.99", ema_warmup_power=1.0, ema_inv_gamma=1.0)
    weights = lambda: [p.detach().clone().double() for p in loop.mp_trainer.master_params]  # noqa
    loop.run_step(*next(loop.data))
    # decay 0 at step index 0: the EMA is the weights. lerp with weight 1 computes
    # end - (end - start) * 0, so the copy is exact.
    assert all(torch.equal(e.double(), w) for e, w in zip(loop.ema_params[0], weights()))
    previous = [e.detach().clone().double() for e in loop.ema_params[0]]
    loop.step += 1
    loop.run_step(*next(loop.data))
    decay = 1 - (1 + 1) ** -1.0  # 0.5 at step index 1
    for ema, old, new in zip(loop.ema_params[0], previous, weights()):
        want = decay * old + (1 - decay) * new
        # one float32 lerp (a subtraction, a product, a sum): a few ulps of the larger operand
        bound = 4 * 2**-24 * torch.maximum(old.abs(), new.abs()).max()
        assert torch.allclose(ema.double(), want, rtol=0, atol=float(bound))


# ----------------------------------------------------------------------------- keep_checkpoints


def test_keep_checkpoints_keeps_the_newest_sets_and_the_resumed_one(data, tmp_path, monkeypatch):
    common = ["--data_dir", data, *DIFFUSION, "--save_interval", 1]
    assert run("image_train", [*common, "--max_steps", 4, "--keep_checkpoints", 2], tmp_path,
               monkeypatch) == 0
    assert pt_files(tmp_path) == sorted(f.format(s) for s in (3, 4) for f in (
        "ema_0.9999_{:06d}.pt", "model{:06d}.pt", "opt{:06d}.pt", "state{:06d}.pt"))
    # Resumed from step 4 with K=1: step 4's set stays although it is no longer the newest.
    assert run("image_train", [*common, "--max_steps", 2, "--keep_checkpoints", 1,
                               "--resume_checkpoint", "auto"], tmp_path, monkeypatch) == 0
    markers = [n for n in pt_files(tmp_path) if n.startswith("model")]
    assert markers == ["model000004.pt", "model000006.pt"]
    assert len(pt_files(tmp_path)) == 8
    log = (tmp_path / "log.txt").read_text()
    assert "--keep_checkpoints 1: deleted the checkpoint set of step 5 (model000005.pt," in log


def test_keep_checkpoints_for_one_file_checkpoints(data, tmp_path, monkeypatch):
    assert run("vae_train", ["--data_dir", data, *VAE, "--max_steps", 3, "--save_interval", 1,
                             "--keep_checkpoints", 1], tmp_path, monkeypatch) == 0
    assert pt_files(tmp_path) == ["vae000003.pt"]


def test_keep_checkpoints_zero_is_refused_before_anything_is_made(data, tmp_path, monkeypatch,
                                                                  capsys):
    for name in ("image_train", "cgan_train"):
        assert run(name, ["--data_dir", data, *TRAINING[name], "--keep_checkpoints", 0],
                   tmp_path / name, monkeypatch) == 2
        (line,) = error_lines(capsys)
        assert line.startswith("error: --keep_checkpoints 0 would delete every checkpoint")
        assert not (tmp_path / name).exists()
    assert KEEP_ALL == -1


KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import os, runpy, signal, sys
    sys.argv[0] = "image_train.py"
    from guided_diffusion.runtime import checkpoints
    from guided_diffusion.cli.main import run_main
    real = checkpoints.save_atomic

    def save(obj, path):
        if os.path.basename(path) == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)  # the machine dies while writing the marker
        return real(obj, path)

    checkpoints.save_atomic = save
    module = runpy.run_path(os.path.join(sys.argv[1], "scripts", "image_train.py"))
    run_main(module["main"], sys.argv[3:])
    """
)


def test_a_run_killed_while_saving_loses_nothing_kept(data, tmp_path, monkeypatch):
    driver = tmp_path / "driver.py"
    driver.write_text(KILLED_WHILE_SAVING)
    common = ["--data_dir", data, *DIFFUSION, "--save_interval", 1, "--keep_checkpoints", 2,
              "--lr_anneal_steps", 5]
    folder = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(driver), REPO, "model000003.pt", *map(str, common), "--log_dir",
         str(folder)], env=child_env(cpu=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Step 3's set was cut short before its marker; the two kept sets are whole.
    markers = [n for n in pt_files(folder) if n.startswith("model")]
    assert markers == ["model000001.pt", "model000002.pt"]
    for name in pt_files(folder):
        if not name.endswith("000003.pt"):
            load(folder / name)
    assert run("image_train", [*common, "--resume_checkpoint", "auto"], folder, monkeypatch) == 0
    assert [n for n in pt_files(folder) if n.startswith("model")] == [
        "model000002.pt", "model000004.pt", "model000005.pt"]  # 2 was resumed from: never deleted
    # And the result is the uninterrupted run's.
    full = tmp_path / "full"
    assert run("image_train", common, full, monkeypatch) == 0
    for name in ("model000005.pt", "ema_0.9999_000005.pt", "opt000005.pt"):
        assert tensors_equal(load(full / name), load(folder / name)), name


# ----------------------------------------------------------------------------- grad_clip


def _captured_step(trainer, opt):
    """Run optimize_no_sync and return the master gradients the optimizer step saw."""
    seen = []
    real = opt.step

    def step(*a, **kw):
        seen.extend(p.grad.detach().clone() for p in trainer.master_params)
        return real(*a, **kw)

    opt.step = step
    trainer.optimize_no_sync(opt)
    return seen


@pytest.mark.parametrize("use_fp16", [False, True])
def test_grad_clip_scales_the_true_gradient_norm(use_fp16, tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    norms = {}
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        model = tiny_model(use_fp16=use_fp16)
        # A loss scale of 2**8 keeps these gradients inside float16's range.
        trainer = MixedPrecisionTrainer(model=model, use_fp16=use_fp16, grad_clip=clip,
                                        initial_lg_loss_scale=8)
        opt = make_adamw(trainer.master_params, lr=1e-3)
        x, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
        trainer.zero_grad()
        trainer.backward((model(x, torch.tensor([3, 40])).float() - target).pow(2).mean())
        grads = _captured_step(trainer, opt)
        scale = 2.0**8 if use_fp16 else 1.0  # fp16 gradients still carry the loss scale here
        norm = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads])) / scale
        norms[clip] = (norm.item(), grads, logger.getkvs().get("grad_norm_clipped"))
        logger.dumpkvs()
    unclipped, raw, logged = norms[0.0]
    assert logged is None and unclipped > 1e-3  # off by default; the test needs a clip that bites
    clipped, cut, logged = norms[1e-3]
    # min(1, c / (n + 1e-6)) * n = c * n / (n + 1e-6): relative 1e-6 / n below c, plus float32 sums
    assert clipped == pytest.approx(1e-3, rel=2e-6 / unclipped + 1e-5)
    assert logged == pytest.approx(clipped, rel=1e-5)
    # Only the length changes, not the direction.
    ratio = clipped / unclipped
    for a, b in zip(raw, cut):
        assert torch.allclose(b.double(), a.double() * ratio, rtol=1e-5, atol=1e-12 * scale)


# script: its flags, and the (norm, clipped norm) columns of each network it clips
CLIPPED = {
    "image_train": (DIFFUSION, [("grad_norm", "grad_norm_clipped")]),
    "vae_train": (VAE, [("grad_norm", "grad_norm_clipped")]),
    "cgan_train": (CGAN, [("grad_norm_d", "grad_norm_d_clipped"),
                          ("grad_norm_g", "grad_norm_g_clipped")]),
}


@pytest.mark.parametrize("name", list(CLIPPED))
def test_grad_clip_in_a_training_run_is_logged(name, data, tmp_path, monkeypatch):
    flags, pairs = CLIPPED[name]
    assert run(name, ["--data_dir", data, *flags, "--max_steps", 2, "--grad_clip", 0.05,
                      "--log_interval", 1], tmp_path, monkeypatch) == 0
    columns, *rows = (tmp_path / "progress.csv").read_text().splitlines()
    columns = columns.split(",")
    assert len(rows) == 2
    for row in rows:
        values = dict(zip(columns, row.split(",")))
        for norm_key, clipped_key in pairs:
            norm, clipped = float(values[norm_key]), float(values[clipped_key])
            assert clipped == pytest.approx(min(norm, 0.05), rel=1e-4)


def test_cgan_ema_warmup_starts_from_the_generator(tmp_path, monkeypatch):
    # With the warm-up the first update's decay is 1 - (1 + 0)^-power = 0: the EMA becomes the
    # generator itself; without it, the EMA keeps 0.99 of the initial weights.
    from guided_diffusion.cgan import CGANTrainLoop, cgan_defaults, create_cgan

    monkeypatch.chdir(tmp_path)
    logger.configure(dir=str(tmp_path), format_strs=[])
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    labels = torch.arange(4) % 10
    results = []
    for power in (0.0, 1.0):
        torch.manual_seed(0)
        generator, discriminator = create_cgan(**{**cgan_defaults(), "image_size": 8})
        loop = CGANTrainLoop(generator=generator, discriminator=discriminator, data=iter(()),
                             arch="mlp", batch_size=4, ema_rate=0.99, ema_warmup_power=power)
        loop.run_step(images, labels)
        results.append(all(torch.equal(e, g) for e, g in
                           zip(loop.ema.parameters(), loop.generator.parameters())))
    assert results == [False, True]


# ----------------------------------------------------------------------------- fine-tuning

# The released 64x64 class-conditional model's flags at toy widths and size: the same levels,
# blocks and attention layers (64 // 32, 64 // 16, 64 // 8 = 16 // 8, 16 // 4, 16 // 2), hence
# the same state-dict keys.
RELEASED_64 = (
    "--attention_resolutions 8,4,2 --class_cond True --diffusion_steps 50 --image_size 16 "
    "--learn_sigma True --noise_schedule cosine --num_channels 32 --num_head_channels 32 "
    "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True "
    "--use_scale_shift_norm True --channel_mult 1,2,3,4"
).split()


def _model_flags(argv):
    parser = load_script("image_train").create_argparser()
    args = parser.parse_args(argv)
    from guided_diffusion.script_util import args_to_dict, model_and_diffusion_defaults

    return args_to_dict(args, model_and_diffusion_defaults().keys())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A toy checkpoint with the key names of the released 64x64_diffusion.pt (1000 classes)."""
    torch.manual_seed(123)
    model, _ = create_model_and_diffusion(**_model_flags(RELEASED_64), num_classes=1000)
    path = tmp_path_factory.mktemp("released") / "64x64_diffusion.pt"
    torch.save(model.state_dict(), path)
    return path


def test_the_toy_has_the_released_layouts_key_names(released):
    folder = conformance_dir()
    if folder is None:
        if os.environ.get("GD_REQUIRE_CONFORMANCE"):
            pytest.fail("GD_REQUIRE_CONFORMANCE is set but the conformance folder is missing")
        pytest.skip("conformance vectors not found")
    manifest = json.loads((folder / "manifest.json").read_text())["64x64_diffusion"]
    assert list(load(released)) == [key for key, _ in manifest["state_dict"]]


@pytest.mark.parametrize("how", ["null_class", "new_classes"])
def test_init_checkpoint_loads_everything_else_bit_for_bit(how, released, tmp_path, capsys):
    from guided_diffusion.train_util import TrainLoop

    state = load(released)
    classes = 1000 if how == "null_class" else 10
    model, diffusion = create_model_and_diffusion(**_model_flags(RELEASED_64),
                                                  num_classes=classes, class_dropout_prob=0.1)
    fresh = model.state_dict()["label_emb.weight"].clone()
    logger.configure(dir=str(tmp_path), format_strs=["stdout"])
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=iter(()), batch_size=2, microbatch=-1, lr=1e-4,
        ema_rate="0.999", log_interval=1, save_interval=10, resume_checkpoint="",
        init_checkpoint=str(released), init_num_classes=0 if how == "null_class" else 10,
        init_add_null_class=how == "null_class",
    )
    loaded = model.state_dict()
    for key, value in state.items():
        if key != "label_emb.weight":
            assert torch.equal(loaded[key], value), key
    label = loaded["label_emb.weight"]
    if how == "null_class":
        assert label.shape == (1001, 128)
        assert torch.equal(label[:1000], state["label_emb.weight"])
        assert torch.equal(label[1000], fresh[1000])
    else:
        assert torch.equal(label, fresh) and label.shape == (11, 128)
    # Step 0, a fresh optimizer, the EMA equal to the weights.
    assert loop.trainer.global_step == 0 and not loop.opt.state
    assert all(torch.equal(e, p) for e, p in zip(loop.ema_params[0], model.parameters()))
    out = capsys.readouterr().out
    if how == "null_class":
        assert ("re-initialised label_emb.weight: row 1000 (the null class of classifier-free "
                "guidance; rows 0..999 loaded)") in out
    else:
        assert ("re-initialised label_emb.weight: all 11 rows (10 classes plus the null class; "
                "the checkpoint's 1000 rows dropped)") in out
    assert out.count("re-initialised") == 1


def test_classifier_fine_tuning_starts_only_the_head_afresh(data, tmp_path, monkeypatch, capsys):
    from guided_diffusion.errors import ScriptError
    from guided_diffusion.script_util import (
        args_to_dict, classifier_and_diffusion_defaults, create_classifier_and_diffusion)
    from guided_diffusion.training.classifier import ClassifierTrainLoop

    # A 10-class classifier checkpoint, then a run of the script that starts from it.
    assert run("classifier_train", ["--data_dir", data, *CLASSIFIER, "--max_steps", 1],
               tmp_path / "a", monkeypatch) == 0
    ckpt = tmp_path / "a" / "model000001.pt"
    assert run("classifier_train", ["--data_dir", data, *CLASSIFIER, "--max_steps", 1,
                                    "--init_checkpoint", ckpt], tmp_path / "b", monkeypatch) == 0
    assert "re-initialised nothing" in (tmp_path / "b" / "log.txt").read_text()

    def loop_for(classes, log):
        args = load_script("classifier_train").create_argparser().parse_args(
            ["--data_dir", data, *CLASSIFIER, "--num_classes", str(classes)])
        flags = args_to_dict(args, classifier_and_diffusion_defaults().keys())
        flags.update(num_classes=classes, classifier_channel_mult=args.classifier_channel_mult)
        model, diffusion = create_classifier_and_diffusion(**flags)
        logger.configure(dir=str(log), format_strs=["stdout"])
        loop = ClassifierTrainLoop(
            model=model, diffusion=diffusion, data=iter(()), batch_size=4, microbatch=-1,
            lr=1e-4, iterations=0, log_interval=1, save_interval=10, init_checkpoint=str(ckpt),
            init_num_classes=classes)
        return model, loop

    state = load(ckpt)
    capsys.readouterr()
    model, loop = loop_for(4, tmp_path / "c")
    loaded = model.state_dict()
    head = sorted(k for k in state if loaded[k].shape != state[k].shape)
    assert head and all(k.startswith("out.") for k in head)
    assert all(torch.equal(loaded[k], state[k]) for k in state if k not in head)
    assert all(loaded[k].shape[0] == 4 for k in head)
    assert loop.trainer.global_step == 0 and not loop.opt.state
    assert capsys.readouterr().out.count("re-initialised out.") == len(head)
    with pytest.raises(ScriptError, match="already has 10 classes: drop --init_num_classes"):
        loop_for(10, tmp_path / "d")


def test_fine_tune_then_sample_with_guidance(released, data, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "finetune"
    assert run("image_train", ["--data_dir", data, *RELEASED_64, "--batch_size", 2,
                               "--init_checkpoint", released, "--init_num_classes", 10,
                               "--class_dropout_prob", 0.1, "--max_steps", 2, "--lr", 1e-4,
                               "--ema_rate", 0.999, "--ema_warmup_power", 0.6667], run_dir,
               monkeypatch) == 0
    assert json.loads((run_dir / "args.json").read_text())["flags"]["num_classes"] == 10
    out = tmp_path / "samples"
    assert sample(["--model_path", run_dir / "ema_0.999_000002.pt", "--guidance_scale", 3,
                   "--num_samples", 4, "--batch_size", 4, "--timestep_respacing", 3], out) == 0
    result = np.load(out / "samples_4x16x16x3.npz")
    assert result["arr_0"].shape == (4, 16, 16, 3) and result["arr_1"].max() < 10
    # Resuming the fine-tuning run ignores --init_checkpoint.
    assert run("image_train", ["--data_dir", data, *RELEASED_64, "--batch_size", 2,
                               "--init_checkpoint", released, "--init_num_classes", 10,
                               "--class_dropout_prob", 0.1, "--max_steps", 1,
                               "--resume_checkpoint", "auto"], run_dir, monkeypatch) == 0
    assert "model000003.pt" in pt_files(run_dir)
    assert f"--init_checkpoint {released} is not used: the run resumes from" in \
        (run_dir / "log.txt").read_text()


def test_fine_tuning_refusals_are_one_line(released, data, tmp_path, monkeypatch, capsys):
    common = ["--data_dir", data, *RELEASED_64, "--batch_size", 2, "--max_steps", 1,
              "--init_checkpoint", released]
    # Shapes that do not fit even after re-initialising the label embedding.
    assert run("image_train", [*common, "--init_num_classes", 10, "--num_channels", 64],
               tmp_path / "a", monkeypatch) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: --init_checkpoint: checkpoint {released} does not fit")
    assert "--num_channels 32" in line
    assert not (tmp_path / "a").exists()  # a start refused before its first step leaves no folder
    # Another class count without a re-initialisation: the fix names both ways.
    assert run("image_train", [*common, "--num_classes", 10], tmp_path / "b", monkeypatch) == 2
    (line,) = error_lines(capsys)
    assert "--num_classes 1000" in line and "--init_num_classes K" in line
    # Flags checked before anything is made.
    for extra, words in (
        (["--init_add_null_class", True], "pass --class_dropout_prob 0.1"),
        (["--init_num_classes", 10, "--num_classes", 20], "disagree"),
        (["--init_checkpoint", tmp_path / "missing.pt"], "does not exist"),
    ):
        assert run("image_train", [*common, *extra], tmp_path / "c", monkeypatch) == 2
        (line,) = error_lines(capsys)
        assert words in line
        assert not (tmp_path / "c").exists()
