"""
Issue 23, the paper on one page: the released-checkpoint table agrees with the layouts the
reference produces, docs/reproduce.md carries its generated text, and download_checkpoints.py
resumes, verifies and fails in one line, tested against an HTTP server on 127.0.0.1 only."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from guided_diffusion.data import released
from guided_diffusion.runtime.download import DownloadError, download

from _launch import child_env
from conftest import conformance_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = b"PK\x03\x04" + bytes(range(256)) * 40  # starts as torch.save's zip files do


GUIDED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"


def guided_checkpoints():
    """The reference's (guided-diffusion's) entries; improved-diffusion's are tested in
    tests/test_improved_diffusion.py against their own oracle."""
    return {n: e for n, e in released.checkpoints().items() if e["url"].startswith(GUIDED_URL)}


def test_every_reference_checkpoint_is_listed_with_its_address():
    entries = guided_checkpoints()
    names = ["64x64_classifier", "64x64_diffusion", "128x128_classifier", "128x128_diffusion",
             "256x256_classifier", "256x256_diffusion", "256x256_diffusion_uncond",
             "512x512_classifier", "512x512_diffusion", "64_256_upsampler", "128_512_upsampler",
             "lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout"]
    assert list(entries) == names  # the reference README's list, in its order
    for name, entry in entries.items():
        assert entry["url"] == ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
                                f"{name}.pt")
        assert entry["bytes"] is None and entry["sha256"] is None  # none published


def test_the_table_agrees_with_the_reference_manifest():
    folder = conformance_dir()
    if folder is None:
        pytest.skip("conformance vectors not found")
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in guided_checkpoints().values():
        layout = manifest[entry["layout"]]
        assert entry["num_params"] == layout["num_params"] and entry["kind"] == layout["kind"]
        flags = entry["flags"]
        if entry["name"] == "lsun_horse_nodropout":
            flags = flags.replace("--dropout 0.0", "--dropout 0.1")  # same layout, no dropout
        assert flags == layout["flags"], entry["name"]
    # The paper's model sizes (transcribed, in millions; the paper's LSUN 552M is the
    # 552.8M layout, so its rounding is not uniform) agree with the released parameter counts.
    for row in released.released_table()["training"]:
        count = manifest[row["model"]]["num_params"]
        assert abs(count / 1e6 - row["model_size_m"]) < 1.0, row["config"]


def test_docs_reproduce_md_carries_the_current_generated_text():
    with open(os.path.join(REPO, "docs", "reproduce.md")) as f:
        text = f.read()
    assert released.replace_generated(text) == text, (
        "docs/reproduce.md is stale: run python -m guided_diffusion.data.released --update "
        "docs/reproduce.md")
    for entry in released.checkpoints().values():
        assert entry["url"] in text and entry["flags"] in text
    with open(os.path.join(REPO, "README.md")) as f:
        assert "docs/reproduce.md" in f.read()


# ------------------------------------------------------------------ downloads, on 127.0.0.1


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}
    honour_range = True
    cut_after = None  # send only this many bytes of a full answer (a broken connection)
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and self.honour_range:
            start = int(wanted.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            body = body[: self.cut_after]
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.files = {"64x64_classifier.pt": FAKE, "lsun_cat.pt": b"PK" + FAKE[::-1],
                      "page.pt": b"<html>not found</html>"}
    _Handler.honour_range, _Handler.cut_after, _Handler.requests = True, None, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_a_part_file_with_a_range_request(server, tmp_path):
    dest = tmp_path / "64x64_classifier.pt"
    (tmp_path / "64x64_classifier.pt.part").write_bytes(FAKE[:1000])
    download(f"{server}/64x64_classifier.pt", dest, sha256=hashlib.sha256(FAKE).hexdigest())
    assert dest.read_bytes() == FAKE and not (tmp_path / "64x64_classifier.pt.part").exists()
    assert _Handler.requests == [("/64x64_classifier.pt", "bytes=1000-")]
    # A server without ranges sends everything again: the part file starts over.
    _Handler.honour_range = False
    dest.unlink()
    (tmp_path / "64x64_classifier.pt.part").write_bytes(b"junk" * 10)
    download(f"{server}/64x64_classifier.pt", dest)
    assert dest.read_bytes() == FAKE


def test_download_keeps_a_broken_transfer_as_part_and_refuses_a_bad_file(server, tmp_path):
    dest = tmp_path / "f.pt"
    _Handler.cut_after = 500
    with pytest.raises(DownloadError, match="run the same command again"):
        download(f"{server}/64x64_classifier.pt", dest)
    assert not dest.exists() and (tmp_path / "f.pt.part").stat().st_size == 500
    _Handler.cut_after = None
    with pytest.raises(DownloadError, match="SHA-256"):
        download(f"{server}/64x64_classifier.pt", dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / "f.pt.part").exists()
    with pytest.raises(DownloadError, match="not a PyTorch checkpoint"):
        download(f"{server}/page.pt", dest, check=released.check_torch_file)
    with pytest.raises(DownloadError, match="404"):
        download(f"{server}/missing.pt", dest)
    assert os.listdir(tmp_path) == []


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "download_checkpoints.py"),
                           *map(str, args)], env=child_env(cpu=True), capture_output=True,
                          text=True, timeout=120)


def test_cli_downloads_by_name_from_a_mirror(server, tmp_path):
    ok = run_cli("64x64_classifier", "lsun_cat.pt", "--out_dir", tmp_path / "models",
                 "--base_url", server, "--progress", False)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "models" / "64x64_classifier.pt").read_bytes() == FAKE
    assert (tmp_path / "models" / "lsun_cat.pt").read_bytes() == b"PK" + FAKE[::-1]
    again = run_cli("64x64_classifier", "--out_dir", tmp_path / "models", "--base_url", server)
    assert again.returncode == 0 and "already there" in again.stdout


def test_cli_one_line_for_an_unknown_name_and_when_offline(server, tmp_path):
    bad = run_cli("64x64_classifier", "64x64_difusion", "--out_dir", tmp_path / "m",
                  "--base_url", server)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1
    assert "no released checkpoint named 64x64_difusion" in lines[0] and "64x64_diffusion" in lines[0]
    assert not (tmp_path / "m").exists()  # nothing was fetched before the names were checked
    # A port nothing listens on: the same answer as a machine without network.
    closed = server.rsplit(":", 1)[0] + ":9"
    offline = run_cli("64x64_classifier", "--out_dir", tmp_path / "m", "--base_url", closed,
                      "--progress", False)
    lines = offline.stderr.strip().splitlines()
    assert offline.returncode == 2 and len(lines) == 1 and "offline" in lines[0]
    assert not (tmp_path / "m").exists()
