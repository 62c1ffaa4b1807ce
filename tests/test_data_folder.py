"""Dataset description, the canonical folder dataset and file reading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cts.data.folder import SegmentationFolder
from cts.data.info import DatasetInfo, DatasetNotFoundError, load_dataset_info, write_dataset_info
from cts.data.io import CorruptFileError, read_image, write_image


def make_folder(root, sizes=((32, 48), (40, 40)), split="train", classes=("a", "b", "c")):
    """A user's folder: images/<split>, masks/<split>, classes.txt, no dataset.yaml."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        write_image(
            root / "images" / split / f"img{i}.jpg", rng.integers(0, 255, (h, w, 3), np.uint8)
        )
        write_image(
            root / "masks" / split / f"img{i}.png",
            (np.arange(w)[None] % 3).repeat(h, 0).astype(np.uint8),
        )
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return root


def test_user_folder_defaults(tmp_path):
    root = make_folder(tmp_path / "mine")
    info = load_dataset_info(root)
    assert (info.name, info.num_classes, info.ignore_index) == ("mine", 3, 255)
    assert (info.base_size, info.crop_size, info.window, info.stride) == (512, 512, 512, 512)
    assert info.label_map is None


def test_sample_contents(tmp_path):
    dataset = SegmentationFolder(make_folder(tmp_path / "d"), "train")
    sample = dataset[0]
    assert sample["name"] == "img0"
    assert sample["image"].shape == (3, 32, 48) and sample["image"].dtype == torch.float32
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["label"].shape == (32, 48) and sample["label"].dtype == torch.int64
    assert sample["label"][0, :4].tolist() == [0, 1, 2, 0]


def test_label_map_applied_at_load(tmp_path):
    root = make_folder(tmp_path / "d")
    lut = [255] + [k - 1 for k in range(1, 256)]  # ADE20K style: 0 -> ignore, k -> k-1
    info = load_dataset_info(root)
    write_dataset_info(root, DatasetInfo("d", info.class_names, label_map=tuple(lut)))
    assert load_dataset_info(root).label_map == tuple(lut)
    label = SegmentationFolder(root, "train")[0]["label"]
    assert label[0, :4].tolist() == [255, 0, 1, 255]


def test_transform_receives_rng_from_key(tmp_path):
    from cts.data.loader import SampleKey

    def transform(image, label, rng):
        return {"value": torch.tensor(rng.random())}

    dataset = SegmentationFolder(make_folder(tmp_path / "d"), "train", transform)
    a, b = dataset[SampleKey(1, seed=0, epoch=0)], dataset[SampleKey(1, seed=0, epoch=0)]
    c = dataset[SampleKey(1, seed=0, epoch=1)]
    assert a["value"] == b["value"] != c["value"] and a["name"] == "img1"


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"ade20k not found: run `cts download`"):
        SegmentationFolder(tmp_path / "ade20k", "train")
    with pytest.raises(ValueError, match="unknown split"):
        SegmentationFolder(make_folder(tmp_path / "d"), "test")


def test_missing_mask_and_bad_description(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "masks" / "train" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="img1.png"):
        SegmentationFolder(root, "train")
    (root / "dataset.yaml").write_text("num_classes: 4\n")
    with pytest.raises(ValueError, match="num_classes is 4 but .* lists 3"):
        load_dataset_info(root)
    (root / "dataset.yaml").write_text("crop: 4\n")
    with pytest.raises(ValueError, match=r"unknown keys \['crop'\]"):
        load_dataset_info(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="classes.txt"):
        load_dataset_info(root)


def test_corrupt_files_are_named(tmp_path):
    root = make_folder(tmp_path / "d")
    image = root / "images" / "train" / "img0.jpg"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=r"img0.jpg: truncated JPEG"):
        SegmentationFolder(root, "train")[0]
    image.write_bytes(b"\xff\xd8\xff but not an image\xff\xd9")
    with pytest.raises(CorruptFileError, match=r"img0.jpg: cannot decode"):
        read_image(image)
    mask = root / "masks" / "train" / "img1.png"
    write_image(mask, np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(CorruptFileError, match=r"img1.png: label map must be single-channel"):
        SegmentationFolder(root, "train")[1]


def test_size_mismatch_is_named(tmp_path):
    root = make_folder(tmp_path / "d")
    write_image(root / "masks" / "train" / "img0.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(
        ValueError, match=r"img0.jpg is 48x32 but its label map .*img0.png is 10x10"
    ):
        SegmentationFolder(root, "train")[0]
