"""The logger: output files per rank, averaging across ranks, CSV header growth, formats."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from _launch import child_env, mpiexec_prefix
from guided_diffusion import logger

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from guided_diffusion import dist_util, logger

    dist_util.setup_dist()
    logger.configure(dir=sys.argv[1])
    rank = dist_util.get_rank()
    logger.log("hello from rank %d" % rank)
    logger.logkv("step", 7)
    logger.logkv_mean("loss", float(rank))
    logger.logkv_mean("loss", float(rank) + 2.0)
    if rank == 1:
        logger.logkv_mean("only_rank1", 4.0)
    row = logger.dumpkvs()
    with open(os.path.join(sys.argv[1], "row%d.json" % rank), "w") as f:
        json.dump(row, f)
    """
)


def test_two_ranks_under_mpiexec(tmp_path):
    log_dir = tmp_path / "logs"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # CPU ranks: the averaging across ranks is what is tested, over gloo.
    env = child_env(cpu=True, OPENAI_LOGDIR=None, OPENAI_LOG_FORMAT=None, OPENAI_LOG_FORMAT_MPI=None)
    proc = subprocess.run(
        [*mpiexec_prefix(2), sys.executable, str(script), str(log_dir)],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    files = sorted(p.name for p in log_dir.iterdir())
    assert files == ["log-rank001.txt", "log.txt", "progress.csv", "row0.json", "row1.json"]
    assert "hello from rank 0" in (log_dir / "log.txt").read_text()
    assert "hello from rank 1" in (log_dir / "log-rank001.txt").read_text()
    assert "hello from rank 1" not in (log_dir / "log.txt").read_text()
    # Only rank 0 prints to the terminal.
    assert "hello from rank 0" in proc.stdout and "hello from rank 1" not in proc.stdout

    # loss: rank 0 logged 0 and 2, rank 1 logged 1 and 3 -> (0 + 2 + 1 + 3) / 4.
    for rank in (0, 1):
        row = json.loads((log_dir / f"row{rank}.json").read_text())
        assert row["loss"] == pytest.approx(1.5)
        assert row["step"] == pytest.approx(7)
        assert row["only_rank1"] == pytest.approx(4.0)
    (line,) = list(csv.DictReader(io.StringIO((log_dir / "progress.csv").read_text())))
    assert float(line["loss"]) == pytest.approx(1.5)


@pytest.fixture
def fresh_logger():
    previous = logger.Logger.CURRENT
    yield
    if logger.Logger.CURRENT is not previous:
        logger.Logger.CURRENT.close()
    logger.Logger.CURRENT = previous


def test_csv_rewrites_header_when_keys_appear(tmp_path, fresh_logger):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.logkv("a", 2)
    logger.logkv("b", 3)
    logger.dumpkvs()
    logger.logkv("b", 4)
    logger.dumpkvs()
    assert (tmp_path / "progress.csv").read_text().splitlines() == ["a,b", "1,", "2,3", ",4"]


def test_logkv_mean_and_human_table(tmp_path, fresh_logger):
    logger.configure(dir=str(tmp_path), format_strs=["log", "json"])
    for value in (1.0, 2.0, 6.0):
        logger.logkv_mean("loss", value)
    logger.logkv("step", 10)
    logger.logkv("step", 11)  # logkv keeps the last value
    row = logger.dumpkvs()
    assert row == {"loss": pytest.approx(3.0), "step": 11}
    text = (tmp_path / "log.txt").read_text()
    assert "Logging to" in text
    assert "| loss | 3        |" in text
    assert "| step | 11       |" in text
    assert json.loads((tmp_path / "progress.json").read_text()) == {"loss": 3.0, "step": 11}
    # The values were consumed: the next row starts empty.
    assert logger.getkvs() == {}


def test_table_shows_whole_numbers_in_full_and_csv_appears_with_the_first_row(tmp_path, fresh_logger):
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv"])
    # Nothing logged yet: no empty progress.csv (a sampling run never writes a row).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]
    logger.logkv("step", 2000)
    logger.logkv("samples", 1.28e5)  # an integer count that became a float (rank averages)
    logger.logkv("loss", 0.012345)
    logger.logkv("lr", 1e-4)
    logger.logkv("note", "done")
    logger.dumpkvs()
    text = (tmp_path / "log.txt").read_text()
    assert "| step    | 2000     |" in text and "| samples | 128000   |" in text
    assert "| loss    | 0.0123   |" in text and "| lr      | 0.0001   |" in text
    assert "e+03" not in text and "| note    | done     |" in text
    # The CSV keeps full values (only the table for people rounds).
    assert (tmp_path / "progress.csv").read_text().splitlines() == [
        "loss,lr,note,samples,step", "0.012345,0.0001,done,128000.0,2000"]
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # (root may write anywhere)
            with pytest.raises(OSError, match="cannot write to the log folder"):
                logger.configure(dir=str(tmp_path / "ro"), format_strs=["csv"])
    finally:
        os.chmod(tmp_path / "ro", 0o700)

def test_levels_and_env_dir(tmp_path, monkeypatch, fresh_logger):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "log")
    logger.configure()
    assert logger.get_dir() == str(tmp_path / "from_env")
    logger.set_level(logger.WARN)
    logger.info("quiet info")
    logger.warn("loud warning")
    logger.set_level(logger.DEBUG)
    logger.debug("debug now shown")
    text = (tmp_path / "from_env" / "log.txt").read_text()
    assert "quiet info" not in text
    assert "loud warning" in text and "debug now shown" in text
    assert not (tmp_path / "from_env" / "progress.csv").exists()


def test_default_dir_is_dated_in_tempdir(tmp_path, monkeypatch, fresh_logger):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    logger.configure(format_strs=[])
    (made,) = list(tmp_path.iterdir())
    assert made.name.startswith("openai-") and len(made.name) == len("openai-2021-01-01-00-00-00-000000")
    assert logger.get_dir() == str(made)


def test_rank_suffix_from_launcher_env(tmp_path, monkeypatch, fresh_logger):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.delenv("OPENAI_LOG_FORMAT_MPI", raising=False)
    logger.configure(dir=str(tmp_path))
    logger.log("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log-rank003.txt"]


def test_scoped_configure_restores_previous(tmp_path, fresh_logger):
    logger.configure(dir=str(tmp_path / "outer"), format_strs=["log"])
    outer = logger.get_current()
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["log"]):
        logger.log("inside")
        assert logger.get_dir() == str(tmp_path / "inner")
    assert logger.get_current() is outer
    assert "inside" in (tmp_path / "inner" / "log.txt").read_text()
    assert "inside" not in (tmp_path / "outer" / "log.txt").read_text()


def test_unknown_format_is_a_clear_error(tmp_path, fresh_logger):
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logger.configure(dir=str(tmp_path), format_strs=["xml"])


def test_stdout_output_follows_sys_stdout_and_survives_a_closed_redirect(tmp_path, fresh_logger):
    # A logger made while stdout was redirected must not keep writing to that stream after the
    # redirect ends and the stream is closed (pytest's capsys, notebooks, redirect_stdout).
    import contextlib

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        logger.configure(dir=str(tmp_path), format_strs=["stdout"])
        logger.log("while redirected")
    captured.close()
    later = io.StringIO()
    with contextlib.redirect_stdout(later):
        logger.log("after the redirect")
        logger.logkv("step", 3)
        logger.dumpkvs()
    assert "after the redirect" in later.getvalue() and "| step" in later.getvalue()
