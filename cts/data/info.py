"""Dataset description: ``classes.txt`` and ``dataset.yaml`` of a prepared dataset folder.

Canonical layout of every dataset::

    <root>/images/{train,val}/<name>.jpg|.png
    <root>/masks/{train,val}/<name>.png   # uint8, class ids 0..C-1, 255 = ignore
    <root>/classes.txt                     # line i = name of class i
    <root>/dataset.yaml                    # optional for a user's folder, see DatasetInfo
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cts.data.io import write_bytes_atomic
from cts.sharing import IGNORE_INDEX

SPLITS = ("train", "val")
CLASSES_FILE = "classes.txt"
INFO_FILE = "dataset.yaml"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder (or one of its required parts) does not exist."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the loaders need to know about a prepared dataset.

    Attributes:
        name: dataset name (``ade20k``, ``synthetic``, ...).
        class_names: one name per class id; ``num_classes = len(class_names)``.
        ignore_index: label value without a class (no loss, not scored).
        base_size: short side images are resized to (training scales are relative to it).
        max_ratio: the long side is capped at ``max_ratio * base_size`` (mmsegmentation's
            keep-ratio ``Resize`` to ``img_scale = (max_ratio * base_size, base_size)``).
        crop_size: square training crop.
        window, stride: sliding-window inference (``stride <= window``).
        label_map: optional 256-entry LUT applied to raw mask values when loading, so a
            release can be used in place (ADE20K: 0 -> 255, k -> k - 1).
        source: free-form provenance (generator parameters, archive names).
    """

    name: str
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    base_size: int = 512
    max_ratio: int = 4
    crop_size: int = 512
    window: int = 512
    stride: int = 512
    label_map: tuple[int, ...] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError(f"dataset {self.name!r}: no classes")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(
                f"dataset {self.name!r}: ignore_index {self.ignore_index} not in 0..255"
            )
        if self.num_classes > self.ignore_index:
            raise ValueError(
                f"dataset {self.name!r}: {self.num_classes} classes collide with "
                f"ignore_index {self.ignore_index}"
            )
        for key in ("base_size", "max_ratio", "crop_size", "window", "stride"):
            if getattr(self, key) <= 0:
                raise ValueError(f"dataset {self.name!r}: {key} must be positive")
        if self.stride > self.window:
            raise ValueError(
                f"dataset {self.name!r}: stride {self.stride} is larger than window "
                f"{self.window}: pixels between windows would never be scored"
            )
        if self.label_map is not None and (
            len(self.label_map) != 256 or not all(0 <= v <= 255 for v in self.label_map)
        ):
            raise ValueError(f"dataset {self.name!r}: label_map must be 256 ints in 0..255")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def lut(self) -> np.ndarray | None:
        """``label_map`` as a ``(256,)`` uint8 array, or None."""
        return None if self.label_map is None else np.asarray(self.label_map, dtype=np.uint8)


def missing_dataset_message(root: Path) -> str:
    return (
        f"dataset folder {root} not found: run `cts download` with this data_root and the "
        f"dataset you want (or cts.data.prepare_dataset(name, {str(root)!r}))"
    )


def _read_classes(root: Path) -> tuple[str, ...]:
    path = root / CLASSES_FILE
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} not found: one class name per line is required")
    return read_class_names(path)


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names, one per line, from a text file or a dataset folder's ``classes.txt``."""
    path = Path(path)
    if path.is_dir():
        return _read_classes(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a dataset folder or a file of class names)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}): class names are "
            "a text file, one name per line, or a dataset folder holding classes.txt"
        ) from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def load_dataset_info(root: str | os.PathLike) -> DatasetInfo:
    """Read ``classes.txt`` and, when present, ``dataset.yaml`` of a dataset folder.

    Without ``dataset.yaml`` (a user's own folder) the defaults apply: name = folder name,
    ignore 255, base and crop 512, window 512 stride 512, no label map.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(missing_dataset_message(root))
    class_names = _read_classes(root)
    path = root / INFO_FILE
    fields: dict[str, Any] = {}
    if path.is_file():
        try:
            fields = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
    num_classes = fields.pop("num_classes", len(class_names))
    if num_classes != len(class_names):
        raise ValueError(
            f"{path}: num_classes is {num_classes} but {root / CLASSES_FILE} lists "
            f"{len(class_names)} classes"
        )
    allowed = {f.name for f in dataclasses.fields(DatasetInfo)} - {"class_names"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    fields.setdefault("name", root.name)
    if fields.get("label_map") is not None:
        fields["label_map"] = tuple(int(v) for v in fields["label_map"])
    try:
        return DatasetInfo(class_names=class_names, **fields)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def write_dataset_info(root: str | os.PathLike, info: DatasetInfo) -> None:
    """Write ``classes.txt`` and ``dataset.yaml`` (atomically) into ``root``."""
    root = Path(root)
    write_bytes_atomic(root / CLASSES_FILE, "".join(f"{n}\n" for n in info.class_names).encode())
    fields = {
        "name": info.name,
        "num_classes": info.num_classes,
        "ignore_index": info.ignore_index,
        "base_size": info.base_size,
        "max_ratio": info.max_ratio,
        "crop_size": info.crop_size,
        "window": info.window,
        "stride": info.stride,
    }
    if info.label_map is not None:
        fields["label_map"] = list(info.label_map)
    if info.source:
        fields["source"] = info.source
    text = yaml.safe_dump(fields, sort_keys=False, default_flow_style=None, width=100)
    write_bytes_atomic(root / INFO_FILE, text.encode())
