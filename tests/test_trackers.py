"""Experiment trackers (issue 30, point 3): --log_format wandb (offline) and tensorboard.

Both are read back with readers independent of our writers: TensorBoard's EventAccumulator, and
for W&B the run's own offline files (the .wandb transaction log decoded with W&B's protobuf
schema, the media files beside it). What they hold is compared with progress.csv and the
samples_stepNNNNNN.png grid that the same run wrote.
"""

import csv
import glob
import io
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from _launch import child_env
from test_resume import DIFFUSION, data, run  # noqa: F401  (data: a fixture)

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCHED = ["--max_steps", 2, "--log_interval", 1, "--save_interval", 100, "--sample_interval", 2,
           "--sample_steps", 2]


def csv_rows(folder):
    with open(os.path.join(folder, "progress.csv")) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def grid_pixels(folder, step):
    with Image.open(os.path.join(folder, f"samples_step{step:06d}.png")) as grid:
        return np.asarray(grid.convert("RGB"))


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_the_scalars_and_the_sample_grid(data, tmp_path, monkeypatch):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args = ["--data_dir", data, *DIFFUSION, *WATCHED, "--log_format", "csv,tensorboard"]
    assert run("image_train", args, tmp_path, monkeypatch) == 0
    events = accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    rows = csv_rows(tmp_path)
    for key in ("loss", "mse", "grad_norm", "step", "samples"):
        logged = [e.value for e in events.Scalars(key)]
        assert logged == [float(np.float32(row[key])) for row in rows], key  # stored as float32
    (image,) = events.Images("samples")
    assert image.step == 2
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, grid_pixels(tmp_path, 2))


# ----------------------------------------------------------------------------- W&B


def wandb_records(path):
    """
    The records of a .wandb file: after a 7-byte file header (":W&B", a magic number, a
    version), blocks of 32 KiB hold chunks of (crc32, length, kind) + bytes, as in LevelDB's log
    format; a record is one FULL chunk or FIRST, MIDDLE..., LAST. Each is a wandb Record message.
    """
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_gets_the_scalars_and_the_sample_grid(data, tmp_path):
    pytest.importorskip("wandb")
    log_dir, wandb_dir = tmp_path / "logs", tmp_path / "wandb_home"
    # Offline and in tmp: the test never reaches for the network or the user's W&B folder.
    env = child_env(cpu=True, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir),
                    WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(
                        tmp_path / "wandb_cache"))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "image_train.py"), "--data_dir", data,
         *map(str, DIFFUSION), *map(str, WATCHED), "--log_format", "csv,wandb", "--log_dir",
         str(log_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))
    (log_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    records = wandb_records(log_file)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            history[row["_step"]] = row
    rows = csv_rows(log_dir)
    assert sorted(history) == [row["step"] for row in rows] == [1, 2]
    for row in rows:
        logged = history[int(row["step"])]
        for key, value in row.items():
            assert logged[key] == value, key  # the same float64 as in progress.csv
    image = history[2]
    assert image["images/samples/_type"] == "image-file"
    with Image.open(os.path.join(run_dir, "files", image["images/samples/path"])) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), grid_pixels(log_dir, 2))
    config = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    flags = {item.key: json.loads(item.value_json) for c in config for item in c.update}
    assert flags["sample_interval"] == 2 and flags["log_format"] == "csv,wandb"
    assert open(log_dir / "wandb-run-id.txt").read().strip() in log_file


def wandb_history(run_dir):
    """{step: the logged row} of one offline run folder, and whether the run ended cleanly."""
    (log_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    rows, ended = {}, False
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            rows[row["_step"]] = row
        ended = ended or kind == "exit"
    return rows, ended


def test_a_preempted_wandb_run_resumes_into_the_same_run(data, tmp_path):
    """SIGTERM during the first save (tests/_faults.py): the job stops with status 75 and its
    W&B run is closed; --resume_checkpoint auto continues the same W&B run at the next step."""
    pytest.importorskip("wandb")
    log_dir, wandb_dir = tmp_path / "logs", tmp_path / "wandb_home"
    base = dict(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir),
                WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    command = [sys.executable, os.path.join(REPO, "tests", "_faults.py"),
               os.path.join(REPO, "scripts", "image_train.py"), "--data_dir", data,
               *map(str, DIFFUSION), "--log_interval", "1", "--save_interval", "1",
               "--log_format", "csv,wandb", "--log_dir", str(log_dir)]
    # A session of its own: the fault signals the job's whole process group, not pytest.
    first = subprocess.run(command + ["--max_steps", "3"], capture_output=True, text=True,
                           timeout=300, start_new_session=True, env=child_env(
                               cpu=True, GD_TEST_FAULT='{"signal": "save", "n": 1}', **base))
    assert first.returncode == 75, first.stderr[-3000:]
    run_id = open(log_dir / "wandb-run-id.txt").read().strip()
    second = subprocess.run(command + ["--max_steps", "2", "--resume_checkpoint", "auto"],
                            capture_output=True, text=True, timeout=300,
                            env=child_env(cpu=True, **base))
    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)
    (stopped, stopped_ended), (resumed, resumed_ended) = map(wandb_history, runs)
    assert sorted(stopped) == [1] and sorted(resumed) == [2, 3]
    assert stopped_ended and resumed_ended  # both runs' logs were closed, not cut off
    # progress.csv now holds the resumed run's rows (it is rewritten at a run's first row).
    rows = {int(row["step"]): row for row in csv_rows(log_dir)}
    assert sorted(rows) == [2, 3]
    for step, logged in resumed.items():
        assert logged["loss"] == rows[step]["loss"]


# ----------------------------------------------------------------------------- missing packages


HIDDEN = textwrap.dedent(
    """
    import runpy, sys
    for name in sys.argv[1].split(","):
        sys.modules[name] = None  # as if it were not installed
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_hiding(tmp_path, hidden, script, *args):
    driver = tmp_path / "hide.py"
    driver.write_text(HIDDEN)
    return subprocess.run([sys.executable, str(driver), hidden, script, *map(str, args)],
                          env=child_env(cpu=True, WANDB_MODE="offline"), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("fmt, hidden", [
    ("wandb", "wandb"),
    ("tensorboard", "tensorboard,torch.utils.tensorboard"),
])
def test_a_tracker_without_its_package_is_named_in_one_line(fmt, hidden, data, tmp_path):
    proc = run_hiding(tmp_path, hidden, os.path.join(REPO, "scripts", "image_train.py"),
                      "--data_dir", data, *DIFFUSION, "--max_steps", 1, "--log_format",
                      f"csv,{fmt}", "--log_dir", tmp_path / "logs")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"the '{fmt}' log format needs the {fmt} package: pip install " \
           f"'guided-diffusion[{fmt}]'" in lines[0]
    assert "drop it from --log_format" in lines[0]


CORE_IMPORTS = textwrap.dedent(
    """
    import guided_diffusion.train_util, guided_diffusion.script_util, guided_diffusion.logger
    import guided_diffusion.runtime.checkpoints, guided_diffusion.sampling.loop
    import guided_diffusion.training.engine
    print("imported")
    """
)


def test_the_core_imports_without_any_optional_package(tmp_path):
    script = tmp_path / "core.py"
    script.write_text(CORE_IMPORTS)
    proc = run_hiding(tmp_path, "safetensors,safetensors.torch,wandb,tensorboard,diffusers,"
                      "torch.utils.tensorboard", str(script))
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]


def test_the_optional_packages_are_extras_never_core_requirements():
    import ast

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                if k.arg in ("install_requires", "extras_require")}
    core = " ".join(keywords["install_requires"])
    extras = keywords["extras_require"]
    for package in ("safetensors", "diffusers", "wandb", "tensorboard"):
        assert package not in core
        assert package in extras["dev"]
    assert extras["diffusers"] == ["diffusers", "safetensors"]
    assert extras["safetensors"] == ["safetensors"]
    assert extras["wandb"] == ["wandb"] and extras["tensorboard"] == ["tensorboard"]
