"""Downloads against a local HTTP server: verified, refused on mismatch, resumed; extraction."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from cts.data.download import ChecksumError, download_file, extract_archive
from cts.data.io import CorruptFileError


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("release/data/a.txt", "a" * 5000)
        zf.writestr("release/data/b.bin", bytes(range(256)) * 40)
        zf.writestr("release/README", "read me")
    return buffer.getvalue()


@pytest.fixture
def served(file_server):
    file_server.files["release.zip"] = small_zip()
    return file_server


def test_download_verified(served, tmp_path):
    data = served.files["release.zip"]
    dest = download_file(
        f"{served.url}/release.zip",
        tmp_path / "dl" / "release.zip",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        progress=False,
        md5=hashlib.md5(data).hexdigest(),
    )
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["release.zip"]
    # Already in place and valid: no second request.
    download_file(f"{served.url}/release.zip", dest, sha256=hashlib.sha256(data).hexdigest())
    assert len(served.requests) == 1


def test_checksum_mismatch_leaves_nothing(served, tmp_path):
    dest = tmp_path / "release.zip"
    with pytest.raises(ChecksumError, match="sha256 .* expected 0000"):
        download_file(f"{served.url}/release.zip", dest, sha256="0" * 64, progress=False)
    with pytest.raises(ChecksumError, match="size"):
        download_file(f"{served.url}/release.zip", dest, size=10, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes(served, tmp_path):
    data = served.files["release.zip"]
    served.drop_after = 1000
    dest = download_file(
        f"{served.url}/release.zip",
        tmp_path / "release.zip",
        sha1=hashlib.sha1(data).hexdigest(),
        progress=False,
    )
    assert dest.read_bytes() == data
    assert served.requests == [("release.zip", None), ("release.zip", "bytes=1000-")]


def test_partial_file_from_earlier_run_resumes(served, tmp_path):
    data = served.files["release.zip"]
    (tmp_path / "release.zip.part").write_bytes(data[:777])
    dest = download_file(
        f"{served.url}/release.zip", tmp_path / "release.zip", size=len(data), progress=False
    )
    assert dest.read_bytes() == data
    assert served.requests == [("release.zip", "bytes=777-")]


def test_http_error_is_clear(served, tmp_path):
    with pytest.raises(OSError, match="HTTP 404"):
        download_file(f"{served.url}/missing.zip", tmp_path / "m.zip", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_extract_all_or_selected(tmp_path):
    archive = tmp_path / "release.zip"
    archive.write_bytes(small_zip())
    everything = extract_archive(archive, tmp_path / "all")
    assert (everything / "release" / "README").read_text() == "read me"
    selected = extract_archive(archive, tmp_path / "data", lambda name: "/data/" in name)
    assert sorted(p.name for p in selected.rglob("*") if p.is_file()) == ["a.txt", "b.bin"]


def test_corrupt_archive_leaves_nothing(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(small_zip()[:-200])
    with pytest.raises(CorruptFileError, match="broken.zip"):
        extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zip"]
