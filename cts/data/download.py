"""Verified, resumable downloads and all-or-nothing archive extraction.

A download streams into ``<dest>.part``, resumes an existing part with an HTTP Range
request, and becomes ``dest`` only after its size and checksums match; on a mismatch the
part is deleted and nothing is left in place. An archive is extracted into a staging folder
that is renamed to the destination once every member is out.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from cts.data.io import CorruptFileError, staging_dir

CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A downloaded or given file does not have the published size or checksum."""


class TransferInterrupted(OSError):
    """The connection ended before the announced number of bytes arrived."""


def file_digests(path: Path, algorithms: list[str]) -> dict[str, str]:
    """Hex digests of a file for each hashlib algorithm name."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def verify_file(
    path: Path, size: int | None = None, digests: dict[str, str] | None = None
) -> str | None:
    """None when ``path`` has the expected size and digests, else what differs."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size {actual_size} bytes, expected {size}"
    digests = {k: v.lower() for k, v in (digests or {}).items() if v}
    for name, value in file_digests(path, list(digests)).items():
        if value != digests[name]:
            return f"{name} {value}, expected {digests[name]}"
    return None


def _expected_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Full file size announced by a 200 (Content-Length) or 206 (Content-Range)."""
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) + (offset if response.status == 206 else 0) if length else None


def _transfer(url: str, part: Path, label: str, progress: bool, timeout: float) -> int | None:
    """Append the rest of ``url`` to ``part``; returns the announced total size."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cts-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the part already holds the whole file
            return offset
        raise
    with response:
        if response.status != 206:  # server ignored the range: start over
            offset = 0
        total = _expected_total(response, offset)
        received, last_report = offset, 0.0
        with open(part, "ab" if offset else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                received += len(chunk)
                if progress and time.monotonic() - last_report > 1:
                    last_report = time.monotonic()
                    of = f" / {total / 1e6:.0f}" if total else ""
                    print(f"\r{label}: {received / 1e6:.0f}{of} MB", end="", file=sys.stderr)
        if last_report:
            print(file=sys.stderr)
    if total is not None and received < total:
        raise TransferInterrupted(f"{url}: connection closed after {received} of {total} bytes")
    return total


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    *,
    sha1: str | None = None,
    md5: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` and verify it; returns ``dest``.

    An existing ``dest`` is verified and kept. An interrupted transfer leaves
    ``<dest>.part``, resumed by the next attempt (``retries`` within this call, then the
    next call). Size and any of ``sha256`` / ``sha1`` / ``md5`` given are checked before the
    file is renamed into place; on a mismatch the part is deleted and ChecksumError raised.
    """
    dest = Path(dest)
    digests = {"sha256": sha256, "sha1": sha1, "md5": md5}
    if dest.exists():
        problem = verify_file(dest, size, digests)
        if problem:
            raise ChecksumError(f"{dest}: {problem}; delete it to download it again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            total = _transfer(url, part, dest.name, progress, timeout)
            break
        except urllib.error.HTTPError as err:
            raise OSError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from err
        except (OSError, http.client.HTTPException) as err:  # network errors: resume
            if attempt == retries:
                raise OSError(
                    f"downloading {url} failed after {retries + 1} attempts ({err}); "
                    f"run again to resume from {part}"
                ) from err
            time.sleep(min(0.5 * 2**attempt, 30))
    problem = verify_file(part, size if size is not None else total, digests)
    if problem:
        part.unlink()
        raise ChecksumError(f"{url}: downloaded file has {problem}; deleted it")
    os.replace(part, dest)
    return dest


def extract_archive(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    members: Callable[[str], bool] | None = None,
) -> Path:
    """Extract a .zip or .tar(.gz/.bz2/.xz) archive into ``dest`` (which must not exist).

    Only the members whose archive path passes ``members`` are extracted (all when None).
    Extraction happens in a staging folder renamed to ``dest`` when complete; member paths
    that would leave the folder are refused.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    keep = members or (lambda name: True)
    with staging_dir(dest) as staging:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    # ZipFile.extract sanitises absolute and ".." paths itself.
                    for name in zf.namelist():
                        if not name.endswith("/") and keep(name):
                            zf.extract(name, staging)
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as tf:
                    selected = [m for m in tf if m.isfile() and keep(m.name)]
                    tf.extractall(staging, members=selected, filter="data")
            else:
                raise CorruptFileError(f"{archive}: not a zip or tar archive")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
            raise CorruptFileError(f"{archive}: corrupt archive ({err})") from None
    return Path(dest)
