"""Cityscapes (fine annotations): preparation from the user's downloads.

Cityscapes needs a login, so nothing is downloaded: ``source`` is a folder holding
``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` or their extracted
``leftImg8bit/`` and ``gtFine/`` folders::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Samples are named ``<city>_<seq>_<frame>``; label maps stay in labelIds and are loaded
through ``label_map`` labelId -> trainId (19 classes, the rest 255).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cts.data.download import extract_archive
from cts.data.info import SPLITS, DatasetInfo, write_dataset_info
from cts.data.io import place_file, staging_dir

DOWNLOAD_PAGE = "https://www.cityscapes-dataset.com/downloads/"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
# labelId -> trainId of the 19 evaluated classes (cityscapesScripts' labels.py).
TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
LABEL_MAP = tuple(TRAIN_IDS.get(label_id, 255) for label_id in range(256))
_MEMBER = re.compile(
    rf"^(leftImg8bit/(train|val)/[^/]+/[^/]+{IMAGE_SUFFIX}|gtFine/(train|val)/[^/]+/[^/]+{LABEL_SUFFIX})$"
)


def dataset_info() -> DatasetInfo:
    return DatasetInfo(
        name="cityscapes",
        class_names=CLASS_NAMES,
        base_size=1024,
        max_ratio=2,  # the authors' segm/data/config/*.py max_ratio
        crop_size=768,
        window=768,
        stride=512,
        label_map=LABEL_MAP,
        source={"archives": ["leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"]},
    )


def _part(source: Path, part: str, staging: Path) -> tuple[Path, bool]:
    """Folder of ``part`` (``leftImg8bit`` or ``gtFine``) and whether it is our extraction."""
    if (source / part).is_dir():
        return source / part, False
    archive = source / f"{part}_trainvaltest.zip"
    if archive.is_file():
        extracted = extract_archive(archive, staging / f"_{part}", lambda n: bool(_MEMBER.match(n)))
        return extracted / part, True
    raise FileNotFoundError(
        f"Cityscapes: neither {source / part}/ nor {archive} found; download "
        f"{archive.name} from {DOWNLOAD_PAGE} (login required)"
    )


def prepare_cityscapes(root: str | os.PathLike, source: str | os.PathLike) -> DatasetInfo:
    """Prepare Cityscapes in ``root`` (which must not exist) from the folder ``source``."""
    root, source = Path(root), Path(source)
    if not source.is_dir():
        raise FileNotFoundError(
            f"Cityscapes source folder {source} not found: it must hold leftImg8bit_trainvaltest"
            f".zip and gtFine_trainvaltest.zip (from {DOWNLOAD_PAGE}) or their extracted folders"
        )
    info = dataset_info()
    with staging_dir(root) as folder:
        images_dir, move_images = _part(source, "leftImg8bit", folder)
        labels_dir, move_labels = _part(source, "gtFine", folder)
        for split in SPLITS:
            images = sorted((images_dir / split).glob(f"*/*{IMAGE_SUFFIX}"))
            if not images:
                raise FileNotFoundError(f"{images_dir / split}: no */*{IMAGE_SUFFIX} images")
            for image in images:
                name = image.name.removesuffix(IMAGE_SUFFIX)
                label = labels_dir / split / image.parent.name / f"{name}{LABEL_SUFFIX}"
                if not label.is_file():
                    raise FileNotFoundError(f"{label}: label map of {image} missing")
                place_file(image, folder / "images" / split / f"{name}.png", move_images)
                place_file(label, folder / "masks" / split / f"{name}.png", move_labels)
        for leftover in folder.glob("_*"):
            shutil.rmtree(leftover)
        write_dataset_info(folder, info)
    return info
