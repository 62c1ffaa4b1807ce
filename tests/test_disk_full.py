"""A checkpoint write that runs out of space says so in one line (path, needed, free, mount)
and keeps the atomic write's promises: the previous file intact, no temporary file left."""

from __future__ import annotations

import errno
import re
import shutil
from collections import namedtuple

import pytest
import torch

from cts.checkpoint import load_checkpoint, save_checkpoint
from cts.data.io import write_bytes_atomic

Usage = namedtuple("Usage", "total used free")
MB = 1 << 20


def _full_disk(monkeypatch, error: Exception, free: int = MB) -> None:
    """torch.save writes 1 MB, then fails as it does on a full disk; ``free`` bytes left
    besides (the message counts the temporary file's 1 MB as free: it is removed)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\0" * MB)
        raise error

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(40 * MB, 40 * MB - free, free))
    return real_save


@pytest.mark.parametrize(
    "error",
    [
        # What torch 2.x says when the zip writer's write comes up short (ENOSPC on tmpfs).
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 6766720 vs 6766608"
        ),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["torch-zip-writer", "oserror"],
)
def test_checkpoint_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"weights": torch.zeros(10)})
    _full_disk(monkeypatch, error)
    payload = {"weights": torch.zeros(3 * MB // 4, dtype=torch.float32)}  # 3 MB of tensors
    with pytest.raises(OSError) as raised:
        save_checkpoint(path, payload)
    message = str(raised.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"{re.escape(str(path))}: disk full writing the checkpoint "
        r"\(needed about 3\.0 MB, 2\.0 MB free on /\S*\)",
        message,
    ), message
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.zeros(10))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_another_torch_save_error_is_not_called_disk_full(tmp_path, monkeypatch):
    """Plenty of space: the error is torch's own, unchanged."""
    path = tmp_path / "last.pt"
    _full_disk(monkeypatch, RuntimeError("something else"), free=1 << 40)
    with pytest.raises(RuntimeError, match="^something else$"):
        save_checkpoint(path, {"weights": torch.zeros(10)})
    assert list(tmp_path.iterdir()) == []


def test_atomic_byte_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(40 * MB, 40 * MB, 0))

    real_fdopen = __import__("os").fdopen

    class Full:
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cts.data.io.os.fdopen", Full)
    with pytest.raises(
        OSError,
        match=r"image\.png: disk full writing the file \(needed about 2\.0 MB, 0\.0 MB free",
    ):
        write_bytes_atomic(path, b"x" * (2 * MB))
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
