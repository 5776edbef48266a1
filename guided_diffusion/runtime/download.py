"""
Downloading a large file so that an interrupted download continues where it stopped, and the
destination name only ever holds a complete, verified file.

The bytes go to "<file>.part" beside the destination; a later call asks the server for the rest
(an HTTP Range request) and starts again from zero when the server does not support ranges. When
all bytes are there the file is checked (the length the server announced, and the size and
SHA-256 when the caller knows them) and renamed into place. Only the standard library is used.
"""

import hashlib
import os
import socket
import urllib.error
import urllib.request

from ..errors import ScriptError, StorageError

CHUNK = 1 << 20
TIMEOUT_SECONDS = 30


class DownloadError(ScriptError):
    """A download that could not be made or did not verify; the message says what to do."""


def _offline_message(url, reason):
    host = urllib.request.urlparse(url).netloc or url
    return (
        f"cannot reach {host} ({reason}): this machine seems to be offline; download {url} "
        "by hand into the output folder, or pass --base_url with a mirror"
    )


def _open(url, start):
    request = urllib.request.Request(url, headers={"User-Agent": "guided-diffusion-port"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return None  # the part file already holds every byte
        raise DownloadError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(_offline_message(url, reason)) from None


def _total_length(response, start):
    """The whole file's length the response announces (None when it does not say)."""
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return int(length) + (start if response.status == 206 else 0)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, dest, *, expected_bytes=None, sha256=None, check=None, progress=None):
    """
    Download url to dest, resuming dest + ".part" when it exists.

    :param expected_bytes: the file's exact size when known (checked as well as the server's).
    :param sha256: its SHA-256 hex digest when known.
    :param check: a function(path) raising DownloadError when the complete file is not what
        was asked for (e.g. an error page instead of a checkpoint); called before the rename.
    :param progress: a function(done_bytes, total_bytes or None) called as bytes arrive.
    :return: dest.
    :raises DownloadError: offline, a server error, or a file that does not verify (the part
        file is then removed, so the next call starts afresh).
    :raises StorageError: when the destination folder cannot be written.
    """
    dest = os.fspath(dest)
    part = dest + ".part"
    folder = os.path.dirname(os.path.abspath(dest))
    start = os.path.getsize(part) if os.path.exists(part) else 0
    response = _open(url, start)
    try:
        # Only once the server answered: an offline run leaves no empty folder behind.
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if response is not None:
            response.close()
        raise StorageError(f"cannot create {folder}: {exc.strerror or exc}") from None
    total = start if response is None else None
    if response is not None:
        with response:
            if start and response.status != 206:
                start = 0  # the server ignored the range: it sends the whole file again
            total = _total_length(response, start)
            try:
                with open(part, "ab" if start else "wb") as out:
                    done = start
                    while True:
                        try:
                            block = response.read(CHUNK)
                        except (OSError, socket.timeout) as exc:
                            raise DownloadError(
                                f"{url}: the connection broke after {done} bytes ({exc}); run "
                                f"the same command again to continue from {part}"
                            ) from None
                        if not block:
                            break
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            except OSError as exc:
                raise StorageError(f"cannot write {part}: {exc.strerror or exc}") from None
    _verify(url, part, total, expected_bytes, sha256, check)
    os.replace(part, dest)
    return dest


def _verify(url, part, total, expected_bytes, sha256, check):
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise DownloadError(
            f"{url}: the server sent {size} of {total} bytes; run the same command again to "
            f"continue from {part}"
        )
    problems = []
    if total is not None and size != total:
        problems.append(f"{size} bytes where the server announced {total}")
    if expected_bytes is not None and size != expected_bytes:
        problems.append(f"{size} bytes where {expected_bytes} are expected")
    if not problems and sha256 is not None and sha256_of(part) != sha256.lower():
        problems.append("a SHA-256 that is not the published one")
    if not problems and check is not None:
        try:
            check(part)
        except DownloadError as exc:
            problems.append(str(exc))
    if problems:
        os.remove(part)
        raise DownloadError(
            f"{url} downloaded as {'; '.join(problems)}: removed it, run the command again (a "
            "mirror may be serving another file)"
        )
