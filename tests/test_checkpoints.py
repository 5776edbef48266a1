"""Atomic checkpoint saves, safe loading and finding the newest complete checkpoint."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from guided_diffusion.runtime import checkpoints
from guided_diffusion.runtime.checkpoints import (
    find_latest_checkpoint,
    load_checkpoint,
    parse_step,
    save_atomic,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def state(value):
    return {"weight": torch.full((3, 3), float(value)), "bias": torch.zeros(3)}


def test_round_trip(tmp_path):
    path = tmp_path / "model000005.pt"
    assert save_atomic(state(5), str(path)) == str(path)
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["weight"], torch.full((3, 3), 5.0))
    assert sorted(os.listdir(tmp_path)) == ["model000005.pt"]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model000001.pt"
    save_atomic(state(1), str(path))

    def save_then_die(obj, f):
        f.write(b"PK\x03\x04 half of a zip file")  # some bytes reach the disk, then the crash
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoints.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(state(2), str(path))
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["model000001.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(str(path))["weight"], torch.full((3, 3), 1.0))


KILLER = textwrap.dedent(
    """
    import os, sys
    import torch
    from guided_diffusion.runtime.checkpoints import save_atomic

    class DieWhilePickled:
        # torch.save pickles this after the tensors before it were written: the process
        # disappears mid-write without any chance to clean up, like a SIGKILL.
        def __reduce__(self):
            os._exit(3)

    save_atomic({"big": torch.ones(100_000), "then": DieWhilePickled()}, sys.argv[1])
    """
)


def test_process_killed_mid_save_leaves_previous_file(tmp_path):
    path = tmp_path / "model000010.pt"
    save_atomic(state(10), str(path))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script), str(path)], env=env, timeout=60, capture_output=True
    )
    assert proc.returncode == 3, proc.stderr
    names = sorted(os.listdir(tmp_path))
    leftovers = [n for n in names if n not in ("model000010.pt", "killer.py")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the abandoned partial write
    assert torch.equal(load_checkpoint(str(path))["weight"], torch.full((3, 3), 10.0))
    assert find_latest_checkpoint(str(tmp_path), "model") == str(path)


def test_find_latest_skips_temporary_and_incomplete_files(tmp_path):
    for step in (10, 20, 300):
        save_atomic(state(step), str(tmp_path / f"model{step:06d}.pt"))
    full = (tmp_path / "model000300.pt").read_bytes()
    # A crash of a non-atomic writer: the newest file is cut short.
    (tmp_path / "model000300.pt").write_bytes(full[: len(full) // 2])
    (tmp_path / "model000400.pt.tmp").write_bytes(full)
    (tmp_path / ".model000500.pt.abc.tmp").write_bytes(full)
    (tmp_path / "modelbest.pt").write_bytes(full)
    save_atomic(state(60), str(tmp_path / "ema_0.9999_000060.pt"))
    save_atomic(state(70), str(tmp_path / "opt000070.pt"))

    assert find_latest_checkpoint(str(tmp_path), "model") == str(tmp_path / "model000020.pt")
    assert find_latest_checkpoint(tmp_path, "ema_0.9999_") == str(tmp_path / "ema_0.9999_000060.pt")
    assert find_latest_checkpoint(str(tmp_path), "opt") == str(tmp_path / "opt000070.pt")
    assert find_latest_checkpoint(str(tmp_path), "ema_0.5_") is None
    assert find_latest_checkpoint(str(tmp_path / "missing"), "model") is None
    assert find_latest_checkpoint(None, "model") is None


def test_highest_step_wins_not_newest_mtime(tmp_path):
    save_atomic(state(2), str(tmp_path / "model000200.pt"))
    save_atomic(state(1), str(tmp_path / "model000100.pt"))  # written later, lower step
    assert find_latest_checkpoint(str(tmp_path), "model") == str(tmp_path / "model000200.pt")


def test_parse_step():
    assert parse_step("logs/model000123.pt", "model") == 123
    assert parse_step("ema_0.9999_004000.pt", "ema_0.9999_") == 4000
    assert parse_step(Path("/x/opt1000000.pt"), "opt") == 1000000
    with pytest.raises(ValueError, match="model"):
        parse_step("logs/ema_0.9999_000100.pt", "model")
    with pytest.raises(ValueError):
        parse_step("logs/model000100.pt.tmp", "model")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(str(tmp_path / "nothing.pt"))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a torch file")
    with pytest.raises(ValueError, match="garbage.pt.*truncated or corrupt"):
        load_checkpoint(str(garbage))

    save_atomic(state(1), str(tmp_path / "whole.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(str(truncated))


class NotATensor:
    pass


def test_only_tensor_checkpoints_are_loaded(tmp_path):
    path = tmp_path / "pickled_object.pt"
    torch.save({"obj": NotATensor()}, path)
    with pytest.raises(ValueError, match="other than tensors"):
        load_checkpoint(str(path))


def test_saved_files_get_the_permissions_of_a_plain_open(tmp_path):
    # The atomic write goes through mkstemp, which creates files readable by the owner only;
    # a checkpoint must be readable by the group/others as the umask allows, like open() gives.
    old = os.umask(0o022)
    try:
        path = tmp_path / "model000001.pt"
        save_atomic({"w": torch.zeros(1)}, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o077)
        save_atomic({"w": torch.zeros(1)}, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)
