"""Checking a prepared dataset split, and its label statistics.

:func:`validate_split` reads every file of a split and returns every problem found (not
just the first). :func:`split_statistics` gives per-class pixel frequencies and the share of
uniform superpatches, the quantity CTS turns into saved tokens.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from cts.data.folder import SegmentationFolder, list_images, list_masks, split_dirs
from cts.data.info import load_dataset_info
from cts.data.io import read_image, read_mask, write_bytes_atomic
from cts.data.transforms import resize_short_side
from cts.sharing import policy_targets


def _threads() -> int:
    # Decoding releases the GIL, so threads scale without pickling arrays around.
    return min(os.cpu_count() or 1, 16)


def _check_pair(
    image_path: Path, mask_path: Path | None, lut: np.ndarray | None, num_classes: int, ignore: int
) -> list[str]:
    problems = []
    try:
        image_shape = read_image(image_path).shape[:2]
    except (OSError, ValueError) as err:
        problems.append(str(err))
        image_shape = None
    if mask_path is None:
        return problems + [f"{image_path}: label map missing"]
    try:
        mask = read_mask(mask_path, lut)
    except (OSError, ValueError) as err:
        return problems + [str(err)]
    if image_shape is not None and image_shape != mask.shape:
        problems.append(
            f"{mask_path}: size {mask.shape[1]}x{mask.shape[0]} differs from image {image_path} "
            f"{image_shape[1]}x{image_shape[0]}"
        )
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in values if v >= num_classes and v != ignore]
    if bad:
        mapped = " after label_map" if lut is not None else ""
        problems.append(
            f"{mask_path}: label values {bad} outside classes 0..{num_classes - 1}{mapped} "
            f"(ignore = {ignore})"
        )
    return problems


def validate_split(root: str | os.PathLike, split: str) -> list[str]:
    """Every problem of one split, one line each naming the file; empty when valid.

    Checks: dataset description readable, split folders present and not empty, each image
    decodable and complete, its label map present, decodable, single-channel 8-bit, of the
    image's size, with values in ``0..C-1`` or ignore (after ``label_map``); label maps
    without an image.
    """
    try:
        info = load_dataset_info(root)
        image_dir, mask_dir = split_dirs(root, split)
    except (OSError, ValueError) as err:
        return [str(err)]
    images, masks = list_images(image_dir), list_masks(mask_dir)
    if not images:
        return [f"{image_dir}: empty split, no .jpg/.png images"]
    lut = info.lut()
    with ThreadPoolExecutor(_threads()) as pool:
        reports = pool.map(
            lambda item: _check_pair(
                item[1], masks.get(item[0]), lut, info.num_classes, info.ignore_index
            ),
            images.items(),
        )
        problems = [problem for report in reports for problem in report]
    problems += [
        f"{path}: label map without an image" for n, path in masks.items() if n not in images
    ]
    return problems


@dataclass(frozen=True)
class SplitStatistics:
    """Label statistics of one split.

    Attributes:
        classes: one row per class: ``class_id, name, pixels, frequency`` (share of the
            labelled pixels), ``images`` (how many images contain it).
        num_images, ignore_fraction: images, and share of all pixels that are ignore.
        uniform_fraction: share of superpatches whose policy target is 1 (uniform), on
            label maps resized to the base size and centre-cropped to ``crop_size``.
    """

    split: str
    num_images: int
    ignore_fraction: float
    uniform_fraction: float
    crop_size: int
    patch_size: int
    classes: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """One-row table of the scalar statistics."""
        return pd.DataFrame(
            [
                {
                    "split": self.split,
                    "num_images": self.num_images,
                    "ignore_fraction": self.ignore_fraction,
                    "uniform_fraction": self.uniform_fraction,
                    "crop_size": self.crop_size,
                    "patch_size": self.patch_size,
                }
            ]
        )

    def write_csv(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<split>_classes.csv`` and ``<split>_summary.csv`` into ``directory``."""
        directory = Path(directory)
        paths = directory / f"{self.split}_classes.csv", directory / f"{self.split}_summary.csv"
        for path, table in zip(paths, (self.classes, self.summary()), strict=True):
            write_bytes_atomic(path, table.to_csv(index=False).encode())
        return paths


def center_crop(label: np.ndarray, size: int, ignore_index: int) -> np.ndarray:
    """Centre ``size x size`` crop of ``label``, padded with ``ignore_index`` where smaller."""
    out = np.full((size, size), ignore_index, label.dtype)
    height, width = label.shape
    top, left = max(height - size, 0) // 2, max(width - size, 0) // 2
    crop = label[top : top + size, left : left + size]
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def split_statistics(
    root: str | os.PathLike,
    split: str,
    crop_size: int = 512,
    patch_size: int = 16,
    base_size: int | None = None,
) -> SplitStatistics:
    """Class pixel frequencies and uniform-superpatch fraction of one split.

    Args:
        crop_size: side of the centre crop the superpatch targets are computed on; a
            multiple of ``2 * patch_size``.
        patch_size: ViT patch size (superpatch ``2p x 2p``).
        base_size: short side the label maps are resized to (nearest) before cropping;
            None = the dataset's ``base_size``.
    """
    info = load_dataset_info(root)
    dataset = SegmentationFolder(root, split)
    base_size = base_size or info.base_size
    ignore, lut = info.ignore_index, info.lut()

    def measure(index: int) -> tuple[np.ndarray, int, int]:
        label = read_mask(dataset.samples[index][2], lut)
        counts = np.bincount(label.ravel(), minlength=256)
        resized = resize_short_side(label, base_size, cv2.INTER_NEAREST)
        crop = torch.from_numpy(center_crop(resized, crop_size, ignore).astype(np.int64))
        targets = policy_targets(crop[None], patch_size, ignore)
        return counts, int((targets == 1).sum()), targets.numel()

    with ThreadPoolExecutor(_threads()) as pool:
        results = list(pool.map(measure, range(len(dataset))))
    counts = np.stack([r[0] for r in results])
    pixels = counts[:, : info.num_classes].sum(0)
    labelled = max(int(pixels.sum()), 1)
    classes = pd.DataFrame(
        {
            "class_id": np.arange(info.num_classes),
            "name": info.class_names,
            "pixels": pixels,
            "frequency": pixels / labelled,
            "images": (counts[:, : info.num_classes] > 0).sum(0),
        }
    )
    return SplitStatistics(
        split=split,
        num_images=len(dataset),
        ignore_fraction=float(counts[:, ignore].sum() / max(counts.sum(), 1)),
        uniform_fraction=sum(r[1] for r in results) / max(sum(r[2] for r in results), 1),
        crop_size=crop_size,
        patch_size=patch_size,
        classes=classes,
    )
