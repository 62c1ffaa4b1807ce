"""File-level helpers: decoding images and label maps with clear errors, atomic writes.

Everything written here appears under its final name only once complete: files are written
to a temporary name beside the destination and renamed, folders are built in a staging
folder beside the destination and renamed into place. Temporary names carry the writer's
pid (``.NAME.PID.XXXX.tmp``, ``.NAME.PID.XXXX.partial``), so that what a killed process
left behind is recognised and removed (:func:`remove_leftovers`); what a live process is
writing is kept. Files and folders get the permissions the user's umask gives, as a plain
``open`` would (``mkstemp`` alone would make them private).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cts.processes import pid_alive

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class CorruptFileError(ValueError):
    """A file exists but cannot be decoded (truncated, not an image, wrong format)."""


def _read_bytes(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    if data.size == 0:
        raise CorruptFileError(f"{path}: empty file")
    return data


def _check_complete(path: Path, data: np.ndarray) -> None:
    # A truncated JPEG or PNG still decodes (the missing rows come back grey, with only a
    # warning on stderr), so check the signature, then look for the end marker: JPEG's EOI
    # cannot occur inside the entropy-coded data, PNG ends with an IEND chunk. Some writers
    # append a few bytes after EOI, hence the search over the tail.
    head, tail = data[:8].tobytes(), data[-1024:].tobytes()
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        if not head.startswith(b"\xff\xd8"):
            raise CorruptFileError(f"{path}: not a JPEG file")
        if b"\xff\xd9" not in tail:
            raise CorruptFileError(f"{path}: truncated JPEG (no end-of-image marker)")
    elif suffix == ".png":
        if not head.startswith(b"\x89PNG"):
            raise CorruptFileError(f"{path}: not a PNG file")
        if b"IEND" not in tail[-64:]:
            raise CorruptFileError(f"{path}: truncated PNG (no IEND chunk)")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array."""
    path = Path(path)
    data = _read_bytes(path)
    _check_complete(path, data)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise CorruptFileError(f"{path}: cannot decode image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _palette_indices(path: Path, data: np.ndarray) -> np.ndarray | None:
    """The pixel values (palette indices) of a palette image, or None for any other file.

    OpenCV decodes a palette image to its colours; Pillow keeps the indices, whatever the
    bit depth (VOC writes 8 bits, other writers 1, 2 or 4)."""
    try:
        image = Image.open(io.BytesIO(data.tobytes()))  # reads the header only
    except OSError:
        return None  # not an image Pillow knows: OpenCV decides
    with image:
        if image.mode != "P":
            return None
        try:
            return np.asarray(image, np.uint8)
        except (OSError, SyntaxError, ValueError):
            raise CorruptFileError(f"{path}: cannot decode label map") from None


def read_mask(path: str | os.PathLike, label_map: np.ndarray | None = None) -> np.ndarray:
    """Decode a single-channel 8-bit label map to ``(H, W)`` uint8, optionally through a LUT.

    A palette PNG (Pascal VOC's format, ``cts predict``'s ``_labels.png``) gives its pixel
    values, the palette indices, not the colours.

    Args:
        path: PNG label map.
        label_map: optional ``(256,)`` uint8 lookup table applied to the raw values.
    """
    path = Path(path)
    data = _read_bytes(path)
    _check_complete(path, data)
    mask = _palette_indices(path, data)
    if mask is None:
        mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise CorruptFileError(f"{path}: cannot decode label map")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise CorruptFileError(
            f"{path}: label map must be single-channel 8-bit, got shape {mask.shape} {mask.dtype}"
        )
    return mask if label_map is None else label_map[mask]


def encode_palette_png(ids: np.ndarray, colours: np.ndarray) -> bytes:
    """``(H, W)`` uint8 ids -> an 8-bit palette PNG: the pixel values stay the ids and viewers
    show them in ``colours``, ``(N, 3)`` uint8 RGB with ``N <= 256``; ids without a colour
    (as 255, ignore) are shown black."""
    if ids.ndim != 2 or ids.dtype != np.uint8 or 0 in ids.shape:
        raise ValueError(
            f"palette PNG: need a non-empty (H, W) uint8 array, got {ids.shape} {ids.dtype}"
        )
    if colours.ndim != 2 or colours.shape[1] != 3 or not 0 < len(colours) <= 256:
        raise ValueError(f"palette PNG: need (N <= 256, 3) colours, got {colours.shape}")
    # A full table: every uint8 value is a valid index, and Pillow writes 8 bits per pixel.
    table = np.zeros((256, 3), np.uint8)
    table[: len(colours)] = colours
    image = Image.fromarray(ids)  # mode L; the palette makes it P with the same pixels
    image.putpalette(table.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_label_png(path: str | os.PathLike, ids: np.ndarray, colours: np.ndarray) -> Path:
    """Write class ids ``(H, W)`` atomically as a PNG: a palette PNG in ``colours`` when they
    fit in uint8 (at most 256 classes, :func:`encode_palette_png`); otherwise 16-bit grey
    (a palette holds only 256 entries), the ids as grey values."""
    if len(colours) <= 256:
        return write_bytes_atomic(path, encode_palette_png(ids.astype(np.uint8), colours))
    return write_image(path, ids.astype(np.uint16))


def encode_image(array: np.ndarray, suffix: str, jpeg_quality: int = 90) -> bytes:
    """Encode an RGB ``(H, W, 3)`` or single-channel ``(H, W)`` uint8 array as JPEG or PNG."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix in (".jpg", ".jpeg") else []
    ok, buffer = cv2.imencode(suffix, array, params)
    if not ok:
        raise ValueError(f"cannot encode a {array.shape} {array.dtype} array as {suffix}")
    return buffer.tobytes()


@functools.cache
def umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(path: str | os.PathLike) -> tuple[int, str]:
    """``mkstemp`` beside ``path``, named ``.NAME.PID.XXXX.tmp``, with umask permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


_LEFTOVER = re.compile(r"^\..+\.(\d+)\.[^.]+\.(tmp|partial)$")


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and staging folders in ``folder`` whose writer is dead
    (a process killed mid-write); returns them. A live writer's are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class DiskFullError(OSError):
    """A write ran out of space; its message is one line: what, where, needed and free."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds ``path`` (its nearest existing folder)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_error(
    path: str | os.PathLike,
    needed: int,
    error: BaseException,
    tmp: str | os.PathLike,
    what: str = "the file",
) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``error`` if it came from a full disk, else None.

    Call it before the temporary file ``tmp`` is removed: the space free for a retry is
    what is free now plus what ``tmp`` holds (measured after its removal it could still be
    held: torch's writer keeps the file open until the error is gone). ``needed`` is the
    size of what was being written (bytes, an estimate).
    An ``OSError`` says ENOSPC itself; other errors are counted as a full disk when less
    than ``needed`` (plus a margin) is free: torch's zip writer reports a short write as
    ``[enforce fail at inline_container.cc] unexpected pos ...`` without the cause.
    """
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
        free += os.stat(tmp).st_blocks * 512 if os.path.exists(tmp) else 0
    except OSError:
        return None
    if isinstance(error, OSError):
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    else:
        full = free < needed * 1.05 + (1 << 20)  # filesystem overhead: blocks, metadata
    if not full:
        return None
    mb = 1 << 20
    return DiskFullError(
        f"{path}: disk full writing {what} (needed about {needed / mb:.1f} MB, "
        f"{free / mb:.1f} MB free on {mount_point(folder)})"
    )


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as error:
        full = disk_full_error(path, len(data), error, tmp) if isinstance(error, OSError) else None
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from error
        raise
    return path


def write_image(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Encode ``array`` by the suffix of ``path`` (JPEG or PNG) and write it atomically."""
    path = Path(path)
    return write_bytes_atomic(path, encode_image(array, path.suffix.lower()))


@contextlib.contextmanager
def staging_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``dest``; rename it to ``dest`` when the block succeeds.

    On any error the staging folder is deleted and ``dest`` is left untouched, so ``dest``
    exists only when complete.
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; delete it to build it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial")
    )
    os.chmod(staging, 0o777 & ~umask())
    try:
        yield staging
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def place_file(src: Path, dst: Path, move: bool) -> None:
    """Move ``src`` to ``dst`` (our own temporary files), or hard-link it (a user's files,
    left untouched), falling back to a copy across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
