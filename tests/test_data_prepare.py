"""Real datasets prepared from tiny fixtures in their release layouts, and the entry point."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

from cts.data import ade20k, pascal_context
from cts.data.folder import SegmentationFolder
from cts.data.io import encode_image, read_mask
from cts.data.pascal_context import decode_rle
from cts.data.prepare import prepare_dataset
from cts.data.validate import validate_split


def jpg(h, w, value=100):
    return encode_image(np.full((h, w, 3), value, np.uint8), ".jpg")


def png(array):
    return encode_image(np.asarray(array, np.uint8), ".png")


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


# --- ADE20K -------------------------------------------------------------------------------


def ade_release() -> dict[str, bytes]:
    raw = np.array([[0, 1, 2, 150]] * 6, np.uint8)  # 0 = "other", 1..150 = classes
    files = {"ADEChallengeData2016/sceneCategories.txt": b"ADE_train_00000001 airport\n"}
    for split, prefix, count in (("training", "ADE_train", 2), ("validation", "ADE_val", 1)):
        for i in range(1, count + 1):
            name = f"{prefix}_{i:08d}"
            files[f"ADEChallengeData2016/images/{split}/{name}.jpg"] = jpg(6, 4)
            files[f"ADEChallengeData2016/annotations/{split}/{name}.png"] = png(raw)
    return files


def test_ade20k_download_from_mirror(file_server, tmp_path, monkeypatch):
    archive = zip_bytes(ade_release())
    file_server.files["ADEChallengeData2016.zip"] = archive
    monkeypatch.setattr(ade20k, "ADE20K_SHA1", hashlib.sha1(archive).hexdigest())
    info = prepare_dataset("ade20k", tmp_path / "ade20k", mirror=file_server.url + "/")
    assert file_server.requests == [("ADEChallengeData2016.zip", None)]
    assert (tmp_path / "downloads" / "ADEChallengeData2016.zip").read_bytes() == archive
    assert info.num_classes == 150 and info.class_names[0] == "wall"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade20k", "downloads"]
    assert sorted(p.name for p in (tmp_path / "ade20k").iterdir()) == [
        "classes.txt", "dataset.yaml", "images", "masks"
    ]  # fmt: skip
    train = SegmentationFolder(tmp_path / "ade20k", "train")
    assert [s[0] for s in train.samples] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert train[0]["label"][0].tolist() == [255, 0, 1, 149]
    assert validate_split(tmp_path / "ade20k", "val") == []


def test_ade20k_checksum_mismatch_refused(file_server, tmp_path):
    file_server.files["ADEChallengeData2016.zip"] = zip_bytes(ade_release())
    with pytest.raises(ValueError, match="sha1"):
        prepare_dataset("ade20k", tmp_path / "ade20k", mirror=file_server.url)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["downloads"]


def test_ade20k_from_extracted_folder_links_files(tmp_path):
    for name, data in ade_release().items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
    prepare_dataset("ade20k", tmp_path / "ade", source=tmp_path / "src")
    original = tmp_path / "src/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    prepared = tmp_path / "ade/images/val/ADE_val_00000001.jpg"
    assert original.exists() and original.stat().st_ino == prepared.stat().st_ino


# --- Cityscapes ---------------------------------------------------------------------------


def test_cityscapes_from_zips(tmp_path):
    label_ids = np.array([[0, 7, 8, 26, 33, 34]] * 4, np.uint8)
    images, labels = {"README": b"", "license.txt": b""}, {"README": b""}
    for split, city in (
        ("train", "aachen"),
        ("train", "bochum"),
        ("val", "frankfurt"),
        ("test", "berlin"),
    ):
        stem = f"{city}_000000_000019"
        images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = png(np.zeros((4, 6, 3)))
        for kind, data in (
            ("labelIds", png(label_ids)),
            ("color", png(np.zeros((4, 6, 3)))),
            ("instanceIds", png(label_ids)),
            ("polygons", b"{}"),
        ):
            suffix = "json" if kind == "polygons" else "png"
            labels[f"gtFine/{split}/{city}/{stem}_gtFine_{kind}.{suffix}"] = data
    source = tmp_path / "downloads"
    source.mkdir()
    (source / "leftImg8bit_trainvaltest.zip").write_bytes(zip_bytes(images))
    (source / "gtFine_trainvaltest.zip").write_bytes(zip_bytes(labels))

    info = prepare_dataset("cityscapes", tmp_path / "cityscapes", source=source)
    assert (info.num_classes, info.base_size, info.crop_size, info.stride) == (19, 1024, 768, 512)
    root = tmp_path / "cityscapes"
    assert sorted(p.name for p in root.iterdir()) == [
        "classes.txt",
        "dataset.yaml",
        "images",
        "masks",
    ]
    assert sorted(p.name for p in (root / "masks" / "train").iterdir()) == [
        "aachen_000000_000019.png", "bochum_000000_000019.png"
    ]  # fmt: skip
    val = SegmentationFolder(root, "val")
    assert val[0]["label"][0].tolist() == [255, 0, 1, 13, 18, 255]
    assert validate_split(root, "train") == []


def test_cityscapes_needs_source(tmp_path):
    with pytest.raises(ValueError, match="leftImg8bit_trainvaltest.zip"):
        prepare_dataset("cityscapes", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="login required"):
        prepare_dataset("cityscapes", tmp_path / "c", source=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- Pascal-Context -----------------------------------------------------------------------


def rle_string(mask: np.ndarray) -> str:
    """COCO compressed RLE of a bool mask (the encoder pycocotools uses)."""
    flat = mask.T.ravel().astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = ([0] if flat[0] else []) + np.diff(bounds).tolist()
    out = []
    for i, value in enumerate(counts):
        value -= counts[i - 2] if i > 2 else 0
        more = True
        while more:
            group, value = value & 0x1F, value >> 5
            more = value != -1 if group & 0x10 else value != 0
            out.append(chr((group | (0x20 if more else 0)) + 48))
    return "".join(out)


def test_rle_decoding():
    assert decode_rle({"size": [2, 2], "counts": "121"}).tolist() == [[False, True], [True, False]]
    mask = np.random.default_rng(0).random((17, 23)) > 0.6
    assert np.array_equal(decode_rle({"size": [17, 23], "counts": rle_string(mask)}), mask)
    assert np.array_equal(decode_rle({"size": [17, 23], "counts": rle_string(mask).encode()}), mask)
    with pytest.raises(ValueError, match="not 3x3"):
        decode_rle({"size": [3, 3], "counts": [1, 2]})


def pascal_sources():
    h, w = 8, 10
    box = np.zeros((h, w), bool)
    box[2:6, 2:8] = True
    inner = np.zeros((h, w), bool)
    inner[3:5, 3:5] = True
    edge = np.zeros((h, w), bool)
    edge[:, 9] = True
    seg = lambda m: {"size": [h, w], "counts": rle_string(m)}  # noqa: E731
    images = [("2008_000002", "train"), ("2008_000003", "train"), ("2008_000007", "val")]
    annotations = {
        "info": {},
        "images": [
            {"image_id": int(n.replace("_", "")), "file_name": f"{n}.jpg", "phase": phase,
             "height": h, "width": w}
            for n, phase in images
        ],
        "categories": [{"category_id": c, "name": str(c)} for c in (1, 2, 458)],
        "annos_segmentation": [
            {"id": 1, "image_id": 2008000002, "category_id": 2, "segmentation": seg(box)},
            {"id": 2, "image_id": 2008000002, "category_id": 458, "segmentation": seg(inner)},
            {"id": 3, "image_id": 2008000002, "category_id": 1,
             "segmentation": {"size": [h, w], "counts": [9 * h, h]}},  # list form
            {"id": 4, "image_id": 2008000007, "category_id": 2, "segmentation": seg(edge)},
        ],
    }  # fmt: skip
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, _ in images + [("2009_000001", "none")]:
            for path, data in (
                (f"VOCdevkit/VOC2010/JPEGImages/{name}.jpg", jpg(h, w)),
                (f"VOCdevkit/VOC2010/Annotations/{name}.xml", b"<annotation/>"),
            ):
                info = tarfile.TarInfo(path)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), json.dumps(annotations).encode()


def test_pascal_context_download_and_render(file_server, tmp_path, monkeypatch):
    tar, annotations = pascal_sources()
    file_server.files = {"VOCtrainval_03-May-2010.tar": tar, "trainval_merged.json": annotations}
    monkeypatch.setattr(pascal_context, "VOC2010_MD5", hashlib.md5(tar).hexdigest())
    monkeypatch.setattr(pascal_context, "ANNOTATIONS_MD5", hashlib.md5(annotations).hexdigest())
    info = prepare_dataset("pascal_context", tmp_path / "pc", mirror=file_server.url)
    assert (info.num_classes, info.base_size, info.crop_size, info.stride) == (59, 520, 480, 320)
    assert info.class_names[0] == "aeroplane" and info.class_names[58] == "wood"
    assert list(pascal_context.CATEGORY_IDS) == sorted(set(pascal_context.CATEGORY_IDS))
    assert len(pascal_context.CATEGORY_IDS) == 59
    root = tmp_path / "pc"
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == [
        "2008_000002.jpg", "2008_000003.jpg"
    ]  # fmt: skip
    mask = read_mask(root / "masks" / "train" / "2008_000002.png")
    expected = np.full((8, 10), 255, np.uint8)  # background -> ignore
    expected[2:6, 2:8] = 0  # aeroplane
    expected[3:5, 3:5] = 58  # wood, painted later
    expected[:, 9] = 255  # a category outside the 59
    assert np.array_equal(mask, expected)
    assert (read_mask(root / "masks" / "val" / "2008_000007.png")[:, 9] == 0).all()
    assert validate_split(root, "train") == [] and validate_split(root, "val") == []
    assert not list(root.glob("_*"))


def test_pascal_context_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainval_merged.json not found"):
        prepare_dataset("pascal_context", tmp_path / "pc", source=tmp_path)


# --- entry point --------------------------------------------------------------------------


def test_unknown_dataset_lists_names(tmp_path):
    with pytest.raises(ValueError, match="synthetic, ade20k, cityscapes, pascal_context, folder"):
        prepare_dataset("coco", tmp_path / "coco")


def test_synthetic_prepared_once(tmp_path):
    kwargs = dict(num_train=2, num_val=1, image_size=64)
    info = prepare_dataset("synthetic", tmp_path / "s", **kwargs)
    stamp = (tmp_path / "s" / "dataset.yaml").stat().st_mtime_ns
    assert prepare_dataset("synthetic", tmp_path / "s", **kwargs) == info
    assert (tmp_path / "s" / "dataset.yaml").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="num_train: 2 on disk, 3 requested"):
        prepare_dataset("synthetic", tmp_path / "s", num_train=3, num_val=1, image_size=64)
    with pytest.raises(TypeError, match="no generation arguments"):
        prepare_dataset("ade20k", tmp_path / "a", num_train=3)


def test_user_folder_in_place_or_linked(tiny_synthetic, tmp_path):
    assert prepare_dataset("folder", tiny_synthetic).num_classes == 12
    info = prepare_dataset("folder", tmp_path / "copy", source=tiny_synthetic)
    assert info.name == "synthetic"
    assert len(SegmentationFolder(tmp_path / "copy", "val")) == 2
