"""Split validation reports every problem at once; label statistics."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from cts.data.info import DatasetInfo, write_dataset_info
from cts.data.io import write_image
from cts.data.validate import split_statistics, validate_split


def test_broken_folder_reports_every_problem(tiny_synthetic, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_synthetic, root)
    images, masks = root / "images" / "train", root / "masks" / "train"
    truncated = images / "scene_000000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (images / "scene_000001.jpg").write_bytes(b"garbage")
    (masks / "scene_000002.png").unlink()
    write_image(masks / "scene_000003.png", np.full((64, 64), 3, np.uint8))  # wrong size
    mask = np.zeros((128, 128), np.uint8)
    mask[0, :3] = [20, 77, 255]
    write_image(images / "extra.png", np.zeros((128, 128, 3), np.uint8))
    write_image(masks / "extra.png", mask)  # values outside 0..11
    write_image(masks / "orphan.png", np.zeros((8, 8), np.uint8))

    problems = validate_split(root, "train")
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "scene_000000.jpg: truncated JPEG" in text
    assert "scene_000001.jpg: not a JPEG file" in text
    assert "scene_000002.jpg: label map missing" in text
    assert "scene_000003.png: size 64x64 differs from image" in text
    assert "extra.png: label values [20, 77] outside classes 0..11" in text
    assert "orphan.png: label map without an image" in text
    assert validate_split(root, "val") == []


def test_label_map_applies_to_range_check(tmp_path):
    root = tmp_path / "d"
    write_image(root / "images" / "train" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_image(root / "masks" / "train" / "a.png", np.array([[0, 1, 2, 3]] * 4, np.uint8))
    lut = (255, 0, 1, 2) + (255,) * 252
    write_dataset_info(root, DatasetInfo("d", ("x", "y"), label_map=lut))
    assert validate_split(root, "train") == [
        f"{root / 'masks' / 'train' / 'a.png'}: label values [2] outside classes 0..1 after "
        "label_map (ignore = 255)"
    ]


def test_empty_or_missing_split(tmp_path):
    root = tmp_path / "d"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("a\n")
    assert validate_split(root, "val") == [
        f"{root / 'images' / 'val'}: empty split, no .jpg/.png images"
    ]
    assert "not found" in validate_split(root, "train")[0]
    assert "cts download" in validate_split(tmp_path / "nowhere", "train")[0]


def test_statistics(tmp_path):
    root = tmp_path / "d"
    half = np.zeros((64, 64), np.uint8)
    half[:, 40:] = 1  # boundary inside superpatch column 1 of 2 (32 px each)
    for name, mask in (("uniform", np.zeros((64, 64), np.uint8)), ("half", half)):
        write_image(root / "images" / "train" / f"{name}.png", np.zeros((64, 64, 3), np.uint8))
        write_image(root / "masks" / "train" / f"{name}.png", mask)
    write_dataset_info(root, DatasetInfo("d", ("zero", "one", "two"), base_size=64))
    stats = split_statistics(root, "train", crop_size=64, patch_size=16)
    # 4 superpatches each: all 4 uniform, then 2 of 4 -> 6 / 8.
    assert stats.uniform_fraction == pytest.approx(0.75)
    assert stats.num_images == 2 and stats.ignore_fraction == 0
    table = stats.classes
    assert table["pixels"].tolist() == [64 * 64 + 64 * 40, 64 * 24, 0]
    assert table["images"].tolist() == [2, 1, 0]
    assert table["frequency"].sum() == pytest.approx(1)
    classes_csv, summary_csv = stats.write_csv(tmp_path / "out")
    assert pd.read_csv(classes_csv)["name"].tolist() == ["zero", "one", "two"]
    assert pd.read_csv(summary_csv)["uniform_fraction"].item() == pytest.approx(0.75)
