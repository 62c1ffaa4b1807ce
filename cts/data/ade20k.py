"""ADE20K (SceneParsing / ADEChallengeData2016): download and preparation.

Release layout::

    ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_%08d.png

Annotations hold 0 = "other" and 1..150 = classes; the prepared dataset keeps the PNGs as
they are and loads them through ``label_map`` 0 -> 255, k -> k - 1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cts.data.download import download_file, extract_archive
from cts.data.info import DatasetInfo, write_dataset_info
from cts.data.io import place_file, staging_dir

ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ADE20K_ARCHIVE = "ADEChallengeData2016.zip"
# SHA-1 of the zip as published with its URL by GluonCV's and Segmenter's (rstrudel/segmenter,
# the code CTS builds on) ADE20K preparation scripts. Not verified here (no network); no
# SHA-256 or byte size is published, so the download is checked against this digest only.
ADE20K_SHA1 = "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"
RELEASE_DIR = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
LABEL_MAP = (255,) + tuple(range(150)) + (255,) * 105


def dataset_info() -> DatasetInfo:
    return DatasetInfo(
        name="ade20k",
        class_names=CLASS_NAMES,
        base_size=512,
        max_ratio=4,  # the authors' segm/data/config/*.py max_ratio
        crop_size=512,
        window=512,
        stride=512,
        label_map=LABEL_MAP,
        source={"archive": ADE20K_ARCHIVE, "url": ADE20K_URL},
    )


def find_release(folder: Path) -> Path:
    """The ``ADEChallengeData2016`` folder: ``folder`` itself or its child."""
    for candidate in (folder, folder / RELEASE_DIR):
        if (candidate / "images" / "training").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{folder}: no ADE20K release found (expected {RELEASE_DIR}/images/training and "
        f"{RELEASE_DIR}/annotations/training)"
    )


def build_layout(release: Path, folder: Path, move: bool) -> None:
    """Place a release's images and annotations into the canonical layout under ``folder``,
    moving the files when ``move`` (our extraction) else hard-linking them."""
    for split, release_split in SPLIT_DIRS.items():
        image_dir = release / "images" / release_split
        mask_dir = release / "annotations" / release_split
        images = sorted(image_dir.glob("ADE_*.jpg"))
        if not images:
            raise FileNotFoundError(f"{image_dir}: no ADE_*.jpg images")
        for image in images:
            mask = mask_dir / f"{image.stem}.png"
            if not mask.is_file():
                raise FileNotFoundError(f"{mask}: annotation of {image} missing")
            place_file(image, folder / "images" / split / image.name, move)
            place_file(mask, folder / "masks" / split / mask.name, move)


def prepare_ade20k(
    root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    mirror: str | None = None,
    download_dir: str | os.PathLike | None = None,
) -> DatasetInfo:
    """Prepare ADE20K in ``root`` (which must not exist).

    Args:
        source: the release zip, or a folder holding the extracted release; None downloads
            the zip (verified against :data:`ADE20K_SHA1`).
        mirror: base URL serving ``ADEChallengeData2016.zip`` instead of the official host.
        download_dir: where the zip is kept; default ``<root>/../downloads``.
    """
    root = Path(root)
    if source is None:
        url = f"{mirror.rstrip('/')}/{ADE20K_ARCHIVE}" if mirror else ADE20K_URL
        downloads = Path(download_dir) if download_dir else root.parent / "downloads"
        source = download_file(url, downloads / ADE20K_ARCHIVE, sha1=ADE20K_SHA1)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"ADE20K source {source} not found (zip or extracted folder)")
    info = dataset_info()
    with staging_dir(root) as folder:
        if source.is_file():
            extracted = extract_archive(source, folder / "_extracted")
            build_layout(find_release(extracted), folder, move=True)
            shutil.rmtree(extracted)
        else:
            build_layout(find_release(source), folder, move=False)
        write_dataset_info(folder, info)
    return info
