"""Pascal-Context, 59 classes: download and preparation.

Sources: the VOC2010 trainval tar (images under ``VOCdevkit/VOC2010/JPEGImages``) and
``trainval_merged.json`` (PASCAL in Detail format: ``images`` with ``image_id``,
``file_name``, ``phase``, ``height``, ``width``; ``annos_segmentation`` with ``image_id``,
``category_id`` and a COCO RLE ``segmentation``, painted in file order). The 59 most
frequent categories become classes 0..58; background and every other category are 255.
Masks are rendered once, so the prepared dataset needs no ``label_map``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cts.data.download import download_file, extract_archive
from cts.data.info import SPLITS, DatasetInfo, write_dataset_info
from cts.data.io import place_file, staging_dir, write_image
from cts.sharing import IGNORE_INDEX

VOC2010_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"
VOC2010_ARCHIVE = "VOCtrainval_03-May-2010.tar"
VOC2010_MD5 = "da459979d0c395079b5c75ee67908abb"  # as published by torchvision.datasets.VOC
ANNOTATIONS_URL = "https://codalabuser.blob.core.windows.net/public/trainval_merged.json"
ANNOTATIONS_FILE = "trainval_merged.json"
# As published next to this URL by PASCAL-Context loaders in torchvision's dataset style;
# not verified here (no network).
ANNOTATIONS_MD5 = "3c2d0c0656b7be9eb61928ffe885d8ce"
JPEG_DIR = "VOCdevkit/VOC2010/JPEGImages"

# Detail-API category ids of the 59 classes, in class order (sorted ids = alphabetical).
CATEGORY_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454,
    458,
)  # fmt: skip
CLASS_NAMES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip


def dataset_info() -> DatasetInfo:
    return DatasetInfo(
        name="pascal_context",
        class_names=CLASS_NAMES,
        base_size=520,
        max_ratio=8,  # the authors' segm/data/config/*.py max_ratio
        crop_size=480,
        window=480,
        stride=320,
        source={"archives": [VOC2010_ARCHIVE, ANNOTATIONS_FILE]},
    )


def rle_counts(counts: str | bytes | list[int]) -> np.ndarray:
    """Run lengths of a COCO RLE, from its list form or its compressed string form
    (LEB128-like 6-bit groups from ``'0'``, each count after the second a delta)."""
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    data = counts.encode() if isinstance(counts, str) else counts
    values: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("truncated RLE string")
            group = data[position] - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position, shift = position + 1, shift + 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign extension
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return np.asarray(values, dtype=np.int64)


def decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """COCO RLE ``{"size": [h, w], "counts": ...}`` -> ``(h, w)`` bool mask.

    Runs alternate 0 and 1, starting with 0, over the pixels in column-major order.
    """
    height, width = segmentation["size"]
    counts = rle_counts(segmentation["counts"])
    if (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(f"RLE runs sum to {counts.sum()}, not {height}x{width} pixels")
    runs = np.arange(len(counts)) % 2 == 1
    return np.repeat(runs, counts).reshape(width, height).T


def render_masks(annotations: dict[str, Any], folder: Path) -> dict[str, list[str]]:
    """Write ``masks/<split>/<name>.png`` for every train/val image; returns names by split."""
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for annotation in annotations["annos_segmentation"]:
        by_image[annotation["image_id"]].append(annotation)
    largest = max(
        [a["category_id"] for a in annotations["annos_segmentation"]] + list(CATEGORY_IDS)
    )
    lut = np.full(largest + 1, IGNORE_INDEX, np.uint8)  # background 0 and others: ignore
    lut[list(CATEGORY_IDS)] = np.arange(len(CATEGORY_IDS))
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    for image in annotations["images"]:
        if image["phase"] not in names:
            continue
        raw = np.zeros((image["height"], image["width"]), np.int64)
        for annotation in by_image[image["image_id"]]:
            try:
                raw[decode_rle(annotation["segmentation"])] = annotation["category_id"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{ANNOTATIONS_FILE}: bad segmentation of image {image['file_name']} "
                    f"(category {annotation.get('category_id')}): {err}"
                ) from None
        name = Path(image["file_name"]).stem
        write_image(folder / "masks" / image["phase"] / f"{name}.png", lut[raw])
        names[image["phase"]].append(image["file_name"])
    return names


def _find(source: Path, *candidates: str) -> Path | None:
    return next((source / c for c in candidates if (source / c).exists()), None)


def prepare_pascal_context(
    root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    mirror: str | None = None,
    download_dir: str | os.PathLike | None = None,
) -> DatasetInfo:
    """Prepare Pascal-Context 59 in ``root`` (which must not exist).

    Args:
        source: folder holding ``VOCtrainval_03-May-2010.tar`` (or its extracted
            ``VOCdevkit/``) and ``trainval_merged.json`` (beside it or in
            ``VOCdevkit/VOC2010/``); None downloads both (verified by MD5).
        mirror: base URL serving both files instead of the official hosts.
        download_dir: where downloads are kept; default ``<root>/../downloads``.
    """
    root = Path(root)
    if source is None:
        source = Path(download_dir) if download_dir else root.parent / "downloads"
        for url, name, md5 in (
            (VOC2010_URL, VOC2010_ARCHIVE, VOC2010_MD5),
            (ANNOTATIONS_URL, ANNOTATIONS_FILE, ANNOTATIONS_MD5),
        ):
            download_file(f"{mirror.rstrip('/')}/{name}" if mirror else url, source / name, md5=md5)
    source = Path(source)
    json_path = _find(source, ANNOTATIONS_FILE, f"VOCdevkit/VOC2010/{ANNOTATIONS_FILE}")
    if json_path is None:
        raise FileNotFoundError(
            f"{source}: {ANNOTATIONS_FILE} not found (get it from {ANNOTATIONS_URL})"
        )
    images_source = _find(source, JPEG_DIR, VOC2010_ARCHIVE)
    if images_source is None:
        raise FileNotFoundError(
            f"{source}: neither {JPEG_DIR}/ nor {VOC2010_ARCHIVE} found (get it from {VOC2010_URL})"
        )
    try:
        annotations = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from None
    info = dataset_info()
    with staging_dir(root) as folder:
        move = images_source.is_file()
        if move:
            extracted = extract_archive(
                images_source, folder / "_extracted", lambda n: n.startswith(f"{JPEG_DIR}/")
            )
            images_source = extracted / JPEG_DIR
        for split, files in render_masks(annotations, folder).items():
            if not files:
                raise ValueError(f"{json_path}: no images with phase {split!r}")
            for file_name in files:
                image = images_source / file_name
                if not image.is_file():
                    raise FileNotFoundError(f"{image}: image listed in {json_path.name} missing")
                place_file(image, folder / "images" / split / file_name, move)
        if move:
            shutil.rmtree(folder / "_extracted")
        write_dataset_info(folder, info)
    return info
