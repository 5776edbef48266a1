"""
The surfaces added after the training core, as hard as the core (issue 29, the findings N1-N13
of the reliability review of the new surfaces): run records (args.json), sample grids and
validation while training, --keep_checkpoints, fine-tuning's --init_checkpoint, the editing
scripts' image reader, and the flags every message names. Each test is a reproduction of a
finding or a neighbouring case of its fault class, run in this process on CPU with tiny models.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.training import engine
from test_scripts import run_inprocess

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

MODEL = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
         "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 50").split()
SAMPLE = "--batch_size 2 --num_samples 2 --timestep_respacing 5 --progress False".split()


def write_images(folder, count=8, classes=2, size=8, seed=0):
    os.makedirs(folder, exist_ok=True)
    r = np.random.RandomState(seed)
    for i in range(count):
        Image.fromarray(r.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"c{i % classes}_{i}.png"))
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("surfaces") / "data")


def train(data, log_dir, *extra):
    return run_inprocess("image_train", ["--data_dir", data, *MODEL, "--batch_size", "2",
                                         "--log_dir", log_dir, *map(str, extra)])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run of 4 steps with checkpoint sets at steps 2 and 4."""
    folder = str(tmp_path_factory.mktemp("surfaces") / "ck")
    assert train(data, folder, "--max_steps", 4, "--save_interval", 2) == 0
    return folder


def copy_run(trained, dest):
    shutil.copytree(trained, dest)
    return str(dest)


def sample(model_path, log_dir, *extra):
    return run_inprocess("image_sample", ["--model_path", model_path, *SAMPLE, "--log_dir",
                                          log_dir, *map(str, extra)])


def error_line(capsys):
    """The one line a refused run printed (and that it is one line)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


def records(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("args"))


# ----------------------------------------------------------------------------- N1: the record


@pytest.mark.parametrize("fault", ["model flag", "data folder", "val folder", "resume file"])
def test_n1_a_refused_start_leaves_args_json_as_it_was(fault, trained, data, tmp_path, capsys):
    folder = copy_run(trained, tmp_path / "run")
    before = open(os.path.join(folder, "args.json"), "rb").read()
    model = list(MODEL)
    extra = ["--resume_checkpoint", "auto", "--max_steps", 2]
    if fault == "model flag":
        model[model.index("--num_channels") + 1] = "64"
    elif fault == "data folder":
        data = str(tmp_path / "no_such_folder")
    elif fault == "val folder":
        extra += ["--val_data_dir", str(tmp_path / "no_val")]
    else:
        extra = ["--resume_checkpoint", str(tmp_path / "model000009.pt"), "--max_steps", 2]
    status = run_inprocess("image_train", ["--data_dir", data, *model, "--batch_size", "2",
                                           "--log_dir", folder, *map(str, extra)])
    assert status == 2
    error_line(capsys)
    assert records(folder) == ["args.json"]
    assert open(os.path.join(folder, "args.json"), "rb").read() == before
    # Nor does the refused run's record wait in this process for the next Trainer to write it
    # (a library run after the refused script wrote it over this folder's record).
    assert engine.write_pending_record() is None
    assert open(os.path.join(folder, "args.json"), "rb").read() == before
    # The folder's own checkpoints still sample with the flags of their record.
    assert sample(os.path.join(folder, "model000004.pt"), str(tmp_path / "s")) == 0


def test_n1_the_record_is_written_once_the_run_starts(trained, data, tmp_path):
    folder = copy_run(trained, tmp_path / "run")
    assert train(data, folder, "--resume_checkpoint", "auto", "--max_steps", 2,
                 "--save_interval", 2) == 0
    assert records(folder) == ["args-001.json", "args.json"]
    with open(os.path.join(folder, "args.json")) as f:
        assert json.load(f)["flags"]["resume_checkpoint"] == "auto"


def test_a_training_run_refused_on_a_model_flag_leaves_no_log_folder(data, tmp_path, capsys):
    folder = tmp_path / "new_run"
    model = list(MODEL)
    model[model.index("--num_channels") + 1] = "30"  # not divisible into 32 groups
    status = run_inprocess("image_train", ["--data_dir", data, *model, "--batch_size", "2",
                                           "--log_dir", folder, "--max_steps", "1"])
    assert status == 2
    assert "num_channels" in error_line(capsys)
    assert not folder.exists()


def test_a_refused_start_keeps_a_folder_that_already_existed(data, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    status = run_inprocess("image_train", ["--data_dir", str(tmp_path / "none"), *MODEL,
                                           "--batch_size", "2", "--log_dir", folder])
    assert status == 2
    error_line(capsys)
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (folder / "args.json").exists()


# ----------------------------------------------------------------------------- N2, N3: reading it


def edit_record(folder, **changes):
    path = os.path.join(folder, "args.json")
    with open(path) as f:
        record = json.load(f)
    record["flags"].update(changes)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


@pytest.mark.parametrize("key, value", [
    ("num_channels", "abc"), ("num_channels", None), ("num_channels", 32.5),
    ("num_channels", True), ("num_channels", [32]), ("num_channels", {"a": 1}),
    ("learn_sigma", "maybe"), ("learn_sigma", 3), ("channel_mult", {"x": 1}),
    ("diffusion_steps", "fifty"),
])
def test_n2_a_wrong_type_in_args_json_is_one_line_naming_the_key_and_the_file(
        key, value, trained, tmp_path, capsys):
    folder = copy_run(trained, tmp_path / "run")
    path = edit_record(folder, **{key: value})
    assert sample(os.path.join(folder, "model000004.pt"), str(tmp_path / "s")) == 2
    line = error_line(capsys)
    assert f'"{key}"' in line and path in line and f"--{key}" in line
    assert "--config none" in line


@pytest.mark.parametrize("key, value, expected", [
    ("learn_sigma", "False", False), ("learn_sigma", "false", False), ("class_cond", "False", False),
    ("attention_resolutions", 4, "4"), ("num_channels", "32", 32), ("channel_mult", "1,2", "1,2"),
    ("image_size", [8, 8], 8), ("image_size", "8", 8),
])
def test_n2_args_json_values_are_converted_as_the_command_line_converts_them(
        key, value, expected, trained, tmp_path, capsys):
    """Each value reads as the same text on the command line would (the parser's own type)."""
    from guided_diffusion.cli import run_config
    from test_scripts import load_script

    folder = copy_run(trained, tmp_path / "run")
    edit_record(folder, **{key: value})
    parser = load_script("image_sample").create_argparser()
    model = os.path.join(folder, "model000004.pt")
    args = run_config.parse_args(parser, ["--model_path", model])
    assert getattr(args, key) == expected
    # The oracle: the parser given the same value as text on the command line.
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    assert getattr(parser.parse_args(["--model_path", model, f"--{key}", text]), key) == expected
    assert sample(model, str(tmp_path / "s")) == 0


def test_n2_a_string_false_for_a_true_checkpoint_gets_the_flag_hint_in_flag_terms(
        trained, tmp_path, capsys):
    folder = copy_run(trained, tmp_path / "run")
    edit_record(folder, learn_sigma="True")  # the checkpoint has no learned sigma
    assert sample(os.path.join(folder, "model000004.pt"), str(tmp_path / "s")) == 2
    assert "--learn_sigma False" in error_line(capsys)


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", '{"flags": {}}',
                                     '{"format": "guided_diffusion.args/1", "flags": 3}', "\x00\xff"])
@pytest.mark.parametrize("where", ["beside", "config"])
def test_n3_an_unreadable_record_is_one_line_naming_the_fix(content, where, trained, tmp_path,
                                                             capsys):
    folder = copy_run(trained, tmp_path / "run")
    record = os.path.join(folder, "args.json")
    if where == "config":
        record = str(tmp_path / "other.json")
    with open(record, "w", encoding="latin-1") as f:
        f.write(content)
    extra = ["--config", record] if where == "config" else []
    model = os.path.join(folder, "model000004.pt")
    assert sample(model, str(tmp_path / "s"), *extra) == 2
    line = error_line(capsys)
    assert record in line and "--config none" in line
    # The named fix works: the model's flags by hand, the record ignored.
    assert sample(model, str(tmp_path / "s2"), "--config", "none", *MODEL) == 0


# ----------------------------------------------------------------------------- --config (point 4)


@pytest.mark.parametrize("script, extra", [("image_edit", []), ("image_inpaint", ["--mask", "MASK"])])
def test_the_editing_scripts_honour_config(script, extra, trained, tmp_path, capsys):
    """The checkpoint alone in a folder (no args.json beside it): --config gives its flags."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(trained, "model000004.pt"), alone)
    inputs = write_images(tmp_path / "in", count=2)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    extra = [str(tmp_path / "mask.png") if a == "MASK" else a for a in extra]
    argv = ["--model_path", alone / "model000004.pt", "--timestep_respacing", "5", "--input",
            inputs, "--progress", "False", *extra]
    assert run_inprocess(script, [*argv, "--log_dir", tmp_path / "a",
                                  "--config", os.path.join(trained, "args.json")]) == 0
    # Without it the defaults (128 channels) do not fit: the flag hint names --num_channels.
    assert run_inprocess(script, [*argv, "--log_dir", tmp_path / "b"]) == 2
    assert "--num_channels 32" in error_line(capsys)


def test_n2_a_number_for_a_text_flag_reads_as_its_text_and_then_meets_the_flags_checks(
        trained, tmp_path, capsys):
    folder = copy_run(trained, tmp_path / "run")
    edit_record(folder, noise_schedule=7)
    assert sample(os.path.join(folder, "model000004.pt"), str(tmp_path / "s")) == 2
    assert "--noise_schedule '7'" in error_line(capsys)


# ----------------------------------------------------------------------------- N4, N5: validation


def copy_as(src, folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        shutil.copy(src, os.path.join(folder, name))
    return str(folder)


@pytest.mark.parametrize("case", ["missing", "empty", "a file", "too few", "foreign class",
                                  "unlabelled", "unreadable"])
def test_n4_n5_the_validation_folder_is_checked_at_the_start(case, data, tmp_path, capsys):
    png = os.path.join(data, "c0_0.png")
    val = tmp_path / "val"
    if case == "empty":
        val.mkdir()
    elif case == "a file":
        val = png
    elif case == "too few":
        copy_as(png, val, ["c0_1.png"])
    elif case == "foreign class":
        copy_as(png, val, [f"c{i % 3}_{i}.png" for i in range(6)])
    elif case == "unlabelled":
        copy_as(png, val, ["x.png", "y.png"])
    elif case == "unreadable":
        val.mkdir()
        for name in ("c0_1.png", "c1_2.png"):
            (val / name).write_bytes(b"not an image")
    log = tmp_path / "run"
    status = train(data, log, "--class_cond", "True", "--num_classes", 2, "--max_steps", 4,
                   "--save_interval", 2, "--val_data_dir", val, "--val_interval", 3)
    assert status == 2
    line = error_line(capsys)
    if case not in ("unlabelled", "unreadable"):
        assert "--val_data_dir" in line
    assert "--data_dir" not in line.replace("(--data_dir)", "")
    if case == "foreign class":
        assert "'c2'" in line and "pass --num_classes" not in line
    # Refused before the first step: nothing trained, nothing saved, no folder left.
    assert not log.exists()


def test_n5_a_validation_folder_with_some_of_the_classes_keeps_the_training_labels(data, tmp_path):
    """Labels of a validation folder holding only class c1 are 1 (the training folder's
    numbering), not 0 (its own)."""
    from guided_diffusion.image_datasets import check_dataset_classes, load_data

    val = copy_as(os.path.join(data, "c1_1.png"), tmp_path / "val", ["c1_a.png", "c1_b.png"])
    names = check_dataset_classes(data, 2)
    batch, cond = next(load_data(data_dir=val, batch_size=2, image_size=8, class_cond=True,
                                 deterministic=True, class_names=names))
    assert cond["y"].tolist() == [1, 1]


def test_n5_classifier_training_checks_its_validation_classes_against_the_training_folder(
        data, tmp_path, capsys):
    val = copy_as(os.path.join(data, "c0_0.png"), tmp_path / "val",
                  [f"c{i % 3}_{i}.png" for i in range(6)])
    argv = ["--data_dir", data, "--val_data_dir", val, "--image_size", "8", "--classifier_width",
            "32", "--classifier_depth", "1", "--classifier_channel_mult", "1,2",
            "--classifier_attention_resolutions", "4", "--num_classes", "2", "--diffusion_steps",
            "50", "--batch_size", "2", "--iterations", "2", "--log_dir", tmp_path / "run"]
    assert run_inprocess("classifier_train", argv) == 2
    line = error_line(capsys)
    assert "--val_data_dir" in line and "'c2'" in line and "pass --num_classes" not in line


# ----------------------------------------------------------------------------- N6: observers fail


def checkpoint_steps(folder, prefix="model"):
    return sorted(int(n[len(prefix):-3]) for n in os.listdir(folder)
                  if n.startswith(prefix) and n.endswith(".pt") and n[len(prefix):-3].isdigit())


@pytest.mark.parametrize("fault", ["grid path is a folder", "grid disk full", "grid bug",
                                   "validation disk full", "validation bug"])
def test_n6_a_failing_grid_or_validation_never_costs_a_checkpoint(fault, data, tmp_path, capsys,
                                                                  monkeypatch):
    import errno

    from guided_diffusion.training import watch

    log = tmp_path / "run"
    if fault == "grid path is a folder":
        (log / "samples_step000004.png").mkdir(parents=True)
        (log / "samples_step000004.png" / "x").write_text("")
    elif fault.startswith("grid"):
        original = watch.make_grid_png

        def failing(images, path):
            if path.endswith("samples_step000004.png"):
                if fault == "grid disk full":
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                raise RuntimeError("a bug in the grid")
            return original(images, path)
        monkeypatch.setattr(watch, "make_grid_png", failing)
    else:
        original = watch.Validation.__call__

        def failing(self, step):
            if step == 4:
                if fault == "validation disk full":
                    raise OSError(errno.ENOSPC, "No space left on device")
                raise RuntimeError("a bug in validation")
            return original(self, step)
        monkeypatch.setattr(watch.Validation, "__call__", failing)
    extra = (["--sample_interval", 2, "--sample_steps", 3] if fault.startswith("grid")
             else ["--val_data_dir", data, "--val_interval", 2, "--log_interval", 1])
    assert train(data, log, "--max_steps", 6, "--save_interval", 4, *extra) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 4: ")
    assert "--sample_interval" in warnings[0] if fault.startswith("grid") else \
        "--val_interval" in warnings[0]
    assert checkpoint_steps(log) == [4, 6]
    assert not [n for n in os.listdir(log) if n.endswith(".tmp")]
    if fault.startswith("grid"):
        # The grids before and after the failed one are written.
        assert os.path.isfile(log / "samples_step000006.png")
    else:
        # The validations before and after the failed one are logged.
        assert (log / "progress.csv").read_text().count(",") > 0
        assert "val_loss" in (log / "progress.csv").read_text().splitlines()[0]


def test_n6_a_grid_cut_short_by_a_kill_is_removed_at_the_next_start(data, tmp_path):
    """The grid's temporary file has atomic_write's name, which a start removes."""
    from guided_diffusion.training import watch

    log = tmp_path / "run"
    log.mkdir()
    seen = []
    original = watch.make_grid_png

    def spy(images, path):
        seen.append(path)
        return original(images, path)
    watch.make_grid_png, saved = spy, watch.make_grid_png
    try:
        assert train(data, log, "--max_steps", 2, "--sample_interval", 2, "--sample_steps", 2) == 0
    finally:
        watch.make_grid_png = saved
    assert seen == [str(log / "samples_step000002.png")]
    stray = log / ".samples_step000004.png.a1b2c3d4.tmp"  # as mkstemp names it
    stray.write_bytes(b"\x89PNG half")
    old_style = log / ".samples_step000006.png.tmp"  # the fixed name grids had before
    old_style.write_bytes(b"\x89PNG half")
    assert train(data, log, "--max_steps", 2, "--resume_checkpoint", "auto") == 0
    assert not stray.exists() and not old_style.exists()


# ----------------------------------------------------------------------------- N7, N8: retention


def set_files(folder, step):
    suffix = f"{step:06d}.pt"
    return sorted(n for n in os.listdir(folder) if n.endswith(suffix) and not n.startswith("."))


CRASH_AFTER_REMOVING = """
import os, runpy, signal, sys
target, real_remove = sys.argv[1], os.remove
def remove(path, *a, **kw):
    real_remove(path, *a, **kw)
    if os.path.basename(path) == target:
        os.kill(os.getpid(), signal.SIGKILL)
os.remove = remove
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("killed_after", ["model000002.pt", "ema_0.9999_000002.pt"])
def test_n7_a_deletion_killed_half_way_is_finished_at_the_next_start(killed_after, data,
                                                                     tmp_path):
    import subprocess
    import sys

    from _launch import child_env
    from test_scripts import script_path

    log = str(tmp_path / "k")
    argv = ["--data_dir", data, *MODEL, "--batch_size", "2", "--keep_checkpoints", "1",
            "--save_interval", "2", "--log_dir", log]
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_REMOVING, killed_after,
                           script_path("image_train"), *argv, "--max_steps", "4"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "model000002.pt" not in os.listdir(log) and set_files(log, 2)  # half deleted
    # The next start (which saves nothing: one step, a save interval of 2) finishes it.
    assert train(data, log, "--keep_checkpoints", 1, "--save_interval", 100, "--max_steps", 1,
                 "--resume_checkpoint", "auto") == 0
    assert set_files(log, 2) == []
    assert not [n for n in os.listdir(log) if n.startswith(".prune")]
    assert "model000004.pt" in os.listdir(log) and len(set_files(log, 4)) == 4


def test_n7_retention_deletes_whole_sets_also_those_whose_marker_is_gone(data, tmp_path):
    log = tmp_path / "k"
    assert train(data, log, "--max_steps", 4, "--save_interval", 1) == 0
    os.remove(log / "model000001.pt")  # a set half deleted by some earlier crash
    assert train(data, log, "--max_steps", 2, "--save_interval", 2, "--keep_checkpoints", 2,
                 "--resume_checkpoint", "auto") == 0
    assert [s for s in range(1, 7) if set_files(log, s)] == [4, 6]
    assert len(set_files(log, 4)) == len(set_files(log, 6)) == 4


@pytest.mark.parametrize("which", ["ema", "opt-set model", "resumed ema"])
def test_n8_retention_never_deletes_the_init_checkpoint_or_its_set(which, data, tmp_path):
    log = tmp_path / "k2"
    assert train(data, log, "--max_steps", 3, "--save_interval", 3) == 0
    init = log / ("ema_0.9999_000003.pt" if "ema" in which else "model000003.pt")
    before = init.read_bytes()
    assert train(data, log, "--max_steps", 4, "--save_interval", 2, "--keep_checkpoints", 1,
                 "--init_checkpoint", init) == 0
    if which == "resumed ema":
        # A resumed run does not load the init file again, but still never deletes it.
        assert train(data, log, "--max_steps", 4, "--save_interval", 2, "--keep_checkpoints", 1,
                     "--init_checkpoint", init, "--resume_checkpoint", "auto") == 0
    assert init.read_bytes() == before
    assert len(set_files(log, 3)) == 4  # its whole set stays


def test_n8_retention_keeps_the_set_a_run_resumed_from(data, tmp_path):
    log = tmp_path / "k"
    assert train(data, log, "--max_steps", 2, "--save_interval", 2) == 0
    assert train(data, log, "--max_steps", 4, "--save_interval", 1, "--keep_checkpoints", 1,
                 "--resume_checkpoint", log / "model000002.pt") == 0
    assert [s for s in range(1, 7) if set_files(log, s)] == [2, 6]


# ----------------------------------------------------------------------------- N9, N10: fine-tuning


@pytest.mark.parametrize("kind, words", [("png", "a PNG image"), ("npz", "an npz file"),
                                         ("npy", "a .npy array"), ("json", "a JSON text file")])
def test_n9_a_file_of_another_kind_as_init_checkpoint_is_named_and_not_to_be_deleted(
        kind, words, data, tmp_path, capsys):
    path = str(tmp_path / f"x.{kind}")
    if kind == "png":
        shutil.copy(os.path.join(data, "c0_0.png"), path)
    elif kind == "npz":
        np.savez(path, np.zeros(3))
    elif kind == "npy":
        np.save(path, np.zeros(3))
        path += ".npy" if not path.endswith(".npy") else ""
    else:
        with open(path, "w") as f:
            f.write('{"format": 1}')
    assert train(data, tmp_path / "run", "--init_checkpoint", path, "--max_steps", 1) == 2
    line = error_line(capsys)
    assert words in line and "--init_checkpoint" in line and "delete" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["moved", "deleted", "replaced by a folder"])
def test_n10_a_requeued_fine_tuning_run_resumes_without_its_init_file(how, trained, data,
                                                                      tmp_path, capsys):
    base = tmp_path / "base.pt"
    shutil.copy(os.path.join(trained, "ema_0.9999_000004.pt"), base)
    log = tmp_path / "ir"
    flags = ["--save_interval", 2, "--init_checkpoint", base, "--resume_checkpoint", "auto"]
    assert train(data, log, "--max_steps", 2, *flags) == 0
    if how == "moved":
        base.rename(tmp_path / "moved.pt")
    elif how == "deleted":
        base.unlink()
    else:
        base.unlink()
        base.mkdir()
    assert train(data, log, "--max_steps", 2, *flags) == 0
    assert "model000004.pt" in os.listdir(log)
    # A fresh run still needs it: one line naming the flag.
    assert train(data, tmp_path / "fresh", "--max_steps", 1, *flags) == 2
    assert "--init_checkpoint" in error_line(capsys)


# ----------------------------------------------------------------------------- N11: image modes


def _wide_cases():
    r = np.random.RandomState(3)
    v16 = r.randint(0, 65536, (8, 8)).astype(np.uint16)
    v32 = r.randint(0, 5000, (8, 8)).astype(np.int32)
    vf = r.rand(8, 8).astype(np.float32) * 7
    grey = lambda a, top: np.clip(np.round(a.astype(np.float64) * 255.0 / top), 0, 255)  # noqa: E731
    return {
        "I;16": (Image.fromarray(v16), grey(v16, 65535.0)),
        "I": (Image.fromarray(v32, mode="I"), grey(v32, float(v32.max()))),
        "F": (Image.fromarray(vf, mode="F"), grey(vf, float(vf.max()))),
    }


def test_n11_a_16_bit_grey_png_is_read_by_the_editing_reader_as_training_reads_it(tmp_path):
    from guided_diffusion.image_datasets import read_image
    from guided_diffusion.sampling.editing import read_edit_images

    image, expected = _wide_cases()["I;16"]
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "x.png"
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    edited, _ = read_edit_images(str(folder), 8)
    # The oracle: the values scaled by numpy, as grey in all three channels.
    assert np.array_equal(edited[0], np.repeat(expected[..., None], 3, axis=-1).astype(np.uint8))
    assert np.array_equal(np.asarray(read_image(str(path), 3)), edited[0])
    assert np.array_equal(np.asarray(read_image(str(path), 1)), expected.astype(np.uint8))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_n11_wide_grey_modes_become_scaled_grey_rgb_in_the_editing_reader(mode):
    from guided_diffusion.sampling import editing

    image, expected = _wide_cases()[mode]
    assert image.mode == mode
    rgb = np.asarray(editing._rgb(image, "x"))
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1).astype(np.uint8))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "YCbCr"])
def test_n11_other_valid_modes_read_as_training_reads_them(mode, data, tmp_path):
    from guided_diffusion.image_datasets import read_image
    from guided_diffusion.sampling.editing import read_edit_images

    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(os.path.join(data, "c0_0.png")) as rgb:
        image = rgb.convert(mode)
    path = folder / ("x.jpg" if mode == "YCbCr" else "x.png")
    image.save(path) if mode != "YCbCr" else image.save(path, quality=95)
    edited, _ = read_edit_images(str(folder), 8)
    assert np.array_equal(np.asarray(read_image(str(path), 3)), edited[0])


def test_n11_image_edit_takes_a_16_bit_grey_image(trained, tmp_path, capsys):
    folder = tmp_path / "g16"
    folder.mkdir()
    Image.fromarray(np.random.RandomState(0).randint(0, 65535, (8, 8)).astype(np.uint16)).save(
        folder / "x.png")
    assert run_inprocess("image_edit", ["--model_path", os.path.join(trained, "model000004.pt"),
                                        "--timestep_respacing", "5", "--input", folder,
                                        "--log_dir", tmp_path / "e", "--progress", "False"]) == 0
    assert os.path.isfile(tmp_path / "e" / "edited" / "x.png")


# ----------------------------------------------------------------------------- N13: flags named


def _module(path):
    import importlib.util

    from test_scripts import REPO

    spec = importlib.util.spec_from_file_location("surface_" + os.path.basename(path)[:-3],
                                                  os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags_of(module):
    return {s for action in module.create_argparser()._actions for s in action.option_strings}


def _named_flags(line):
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", line))


N13_CASES = {
    "image_edit empty --input": ("scripts/image_edit.py", ["--input", "EMPTY"]),
    "image_edit missing --input": ("scripts/image_edit.py", ["--input", "MISSING"]),
    "image_inpaint empty --mask": ("scripts/image_inpaint.py", ["--input", "IMAGES", "--mask", "EMPTY"]),
    "image_inpaint missing --mask": ("scripts/image_inpaint.py", ["--input", "IMAGES", "--mask", "MISSING"]),
    "ddim_invert empty --input": ("scripts/ddim_invert.py", ["--input", "EMPTY"]),
    "make_ref_batch empty folder": ("evaluations/make_ref_batch.py",
                                    ["EMPTY", "OUT/ref.npz", "--image_size", "8"]),
    "make_ref_batch missing output folder": ("evaluations/make_ref_batch.py",
                                             ["IMAGES", "MISSING/ref.npz", "--image_size", "8"]),
    "image_train empty --val_data_dir": ("scripts/image_train.py",
                                         ["--data_dir", "IMAGES", "--val_data_dir", "EMPTY",
                                          "--batch_size", "2", "--log_dir", "OUT/log"]),
    "image_train empty --data_dir": ("scripts/image_train.py", ["--data_dir", "EMPTY",
                                                                "--log_dir", "OUT/log"]),
}


@pytest.mark.parametrize("case", sorted(N13_CASES))
def test_n13_every_message_names_a_flag_the_script_has(case, trained, data, tmp_path, capsys):
    from guided_diffusion.cli.main import run_main

    path, argv = N13_CASES[case]
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "OUT").mkdir()
    images = write_images(tmp_path / "IMAGES", count=2)
    names = {"EMPTY": str(tmp_path / "EMPTY"), "MISSING": str(tmp_path / "MISSING"),
             "IMAGES": images, "OUT": str(tmp_path / "OUT")}

    def expand(arg):
        for key, value in names.items():
            if arg == key or arg.startswith(key + "/"):
                return value + arg[len(key):]
        return arg
    argv = [expand(a) for a in argv]
    if "super_res" in path:
        argv = ["--model_path", os.path.join(trained, "model000004.pt"), *argv]
    elif "scripts/" in path and "train" not in path:
        argv = ["--model_path", os.path.join(trained, "model000004.pt"), *MODEL, *argv]
    elif "train" in path:
        argv = [*MODEL, *argv, "--max_steps", "1"]
    module = _module(path)
    with pytest.raises(SystemExit) as stop:
        run_main(module.main, argv)
    assert stop.value.code == 2
    line = error_line(capsys)
    assert tmp_path.name in line  # the folder at fault is named
    assert _named_flags(line) <= _flags_of(module), line
    assert ".tmp" not in line  # never a hidden temporary file


@pytest.mark.parametrize("what", ["empty", "missing"])
def test_n13_the_evaluators_batch_check_names_no_flag_it_lacks(what, tmp_path):
    """The evaluator's positional ref_batch and sample_batch: a missing or empty folder."""
    from guided_diffusion.evaluation.batches import check_batch_path

    evaluator = _module("evaluations/evaluator.py")
    folder = tmp_path / "batch"
    if what == "empty":
        folder.mkdir()
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        check_batch_path(str(folder))
    assert _named_flags(str(error.value)) <= _flags_of(evaluator)
    assert str(folder) in str(error.value)


def test_n13_super_res_base_samples_name_their_flag(tmp_path):
    from guided_diffusion.sampling.files import read_low_res_images

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as error:
        read_low_res_images(str(tmp_path / "empty"), 8)
    flags = _flags_of(_module("scripts/super_res_sample.py"))
    assert "--base_samples" in str(error.value) and _named_flags(str(error.value)) <= flags


# ----------------------------------------------------------------------------- point 4: the CFG hint


def test_the_hint_for_a_guidance_checkpoint_sampled_without_classes_works_when_followed(
        data, tmp_path, capsys):
    import re

    log = tmp_path / "cfg"
    assert train(data, log, "--class_cond", "True", "--num_classes", 2, "--class_dropout_prob",
                 0.1, "--max_steps", 1) == 0
    model = str(log / "model000001.pt")
    assert sample(model, tmp_path / "a", "--config", "none", *MODEL) == 2
    line = error_line(capsys)
    guided = re.search(r"or (--class_cond True --num_classes 2 --class_dropout_prob [0-9.]+) if "
                       r"it was trained for classifier-free guidance", line)
    assert guided, line
    assert sample(model, tmp_path / "b", "--config", "none", *MODEL, *guided.group(1).split(),
                  "--guidance_scale", 2.0) == 0


# ----------------------------------------------------------------------------- point 4: --sampler


def test_sampler_docs_and_help_name_every_sampler():
    """docs/sampling.md's --sampler row and its unknown-name example, the flag's help and the
    refusal name every sampler of the solver table (a solver added there fails this test until
    the docs say so)."""
    import re

    from guided_diffusion.cli.flags import flag_help
    from guided_diffusion.diffusion.solvers import MIN_EVALUATIONS
    from guided_diffusion.sampling.loop import SAMPLER_NAMES, resolve_sampler
    from test_scripts import REPO

    text = open(os.path.join(REPO, "docs", "sampling.md")).read()
    row = next(line for line in text.splitlines() if line.startswith("| `--sampler NAME`"))
    example = re.search(r"Unknown names: `error: (.*?)`", text, re.S).group(1)
    with pytest.raises(ValueError) as refused:
        resolve_sampler("plms", False)
    assert " ".join(example.split()) == str(refused.value)
    for name in SAMPLER_NAMES:
        assert f"`{name}`" in row, name
        assert name in flag_help("sampler")[1], name
    # The least budgets the paragraph gives are the table's.
    paragraph = " ".join(text[text.index("Unknown names:"):].split("\n\n")[0].split())
    for name, least in MIN_EVALUATIONS.items():
        assert re.search(rf"`{name}`[^.]*? {least}\b|{name} needs at least {least}", paragraph), name


@pytest.mark.parametrize("script", ["classifier_train", "cgan_train"])
def test_n13_unlabelled_files_for_an_always_conditional_model_name_no_class_cond(script, tmp_path,
                                                                                 capsys):
    """The classifier and the cGAN have no --class_cond: the fix for unlabelled files is to
    rename them."""
    folder = tmp_path / "unlabelled"
    write_images(folder, count=4)
    for i, name in enumerate(sorted(os.listdir(folder))):
        os.rename(folder / name, folder / f"img{i}.png")
    argv = {"classifier_train": ["--image_size", "8", "--classifier_width", "32",
                                 "--classifier_depth", "1", "--classifier_channel_mult", "1,2",
                                 "--classifier_attention_resolutions", "4", "--num_classes", "2",
                                 "--batch_size", "2", "--iterations", "1"],
            "cgan_train": ["--image_size", "8", "--batch_size", "2", "--iterations", "1"]}[script]
    module = _module(f"scripts/{script}.py")
    assert run_inprocess(script, ["--data_dir", folder, *argv, "--log_dir", tmp_path / "run"]) == 2
    line = error_line(capsys)
    assert "rename them" in line and _named_flags(line) <= _flags_of(module), line
