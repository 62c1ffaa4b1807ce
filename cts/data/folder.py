"""``SegmentationFolder``: the one dataset class, reading any folder in the canonical layout."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cts.data.info import SPLITS, DatasetNotFoundError, load_dataset_info, missing_dataset_message
from cts.data.io import IMAGE_SUFFIXES, read_image, read_mask
from cts.data.loader import SampleKey, sample_rng

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], dict[str, Tensor]]


def split_dirs(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(images/<split>, masks/<split>)`` of a dataset folder; raises if either is missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(missing_dataset_message(root))
    dirs = root / "images" / split, root / "masks" / split
    for folder in dirs:
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"{folder} not found: not a dataset folder in the "
                "canonical layout (images/<split>, masks/<split>)"
            )
    return dirs


def list_images(image_dir: Path) -> dict[str, Path]:
    """Image files of a split folder by name (file stem), sorted."""
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return {p.stem: p for p in files}


def list_masks(mask_dir: Path) -> dict[str, Path]:
    """Label maps of a split folder by name (file stem), sorted."""
    return {p.stem: p for p in sorted(mask_dir.glob("*.png"))}


def to_tensors(image: np.ndarray, label: np.ndarray) -> dict[str, Tensor]:
    """Untransformed sample: image ``(3, H, W)`` float32 in [0, 1], label ``(H, W)`` int64."""
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255
    return {"image": image_t, "label": torch.from_numpy(label.astype(np.int64))}


class SegmentationFolder(Dataset):
    """Image / label-map pairs of one split of a canonical dataset folder.

    Items are dicts ``{"image": (3, H, W) float32, "label": (H, W) int64, "name": str}``
    (or whatever keys ``transform`` returns, plus ``"name"``). Label maps go through the
    dataset's ``label_map`` when it has one.

    Args:
        root: dataset folder.
        split: ``"train"`` or ``"val"``.
        transform: ``transform(image (H, W, 3) uint8 RGB, label (H, W) uint8, rng) -> dict``;
            None gives :func:`to_tensors`. ``rng`` is derived from the sample key, see
            :func:`cts.data.loader.sample_rng`.

    Index with an ``int`` or a :class:`~cts.data.loader.SampleKey` (what
    :func:`~cts.data.loader.build_loader` yields), which also carries seed and epoch.

    Attributes:
        info: the dataset's :class:`~cts.data.info.DatasetInfo`.
        samples: ``(name, image_path, mask_path)`` per sample, sorted by name.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, transform: Transform | None = None
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.info = load_dataset_info(self.root)
        image_dir, mask_dir = split_dirs(self.root, split)
        images, masks = list_images(image_dir), list_masks(mask_dir)
        if not images:
            raise ValueError(f"{image_dir}: empty split, no .jpg/.png images")
        missing = [name for name in images if name not in masks]
        if missing:
            raise FileNotFoundError(
                f"{mask_dir}: no label map for {len(missing)} image(s), e.g. {missing[0]}.png"
            )
        self.samples = [(name, path, masks[name]) for name, path in images.items()]
        self.transform = transform
        self._lut = self.info.lut()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw sample ``index``: image ``(H, W, 3)`` uint8 RGB, label ``(H, W)`` uint8."""
        _, image_path, mask_path = self.samples[index]
        image, label = read_image(image_path), read_mask(mask_path, self._lut)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{image_path} is {image.shape[1]}x{image.shape[0]} but its label map "
                f"{mask_path} is {label.shape[1]}x{label.shape[0]}"
            )
        return image, label

    def __getitem__(self, key: int | SampleKey) -> dict[str, Tensor | str]:
        key = key if isinstance(key, SampleKey) else SampleKey(int(key))
        image, label = self.load(key.index)
        if self.transform is None:
            sample: dict[str, Tensor | str] = dict(to_tensors(image, label))
        else:
            sample = dict(self.transform(image, label, sample_rng(key)))
        sample["name"] = self.samples[key.index][0]
        return sample
