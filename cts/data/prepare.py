"""One entry point that brings any supported dataset into the canonical layout."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Any

from cts.data.ade20k import prepare_ade20k
from cts.data.cityscapes import prepare_cityscapes
from cts.data.folder import list_images, list_masks, split_dirs
from cts.data.info import (
    CLASSES_FILE,
    INFO_FILE,
    SPLITS,
    DatasetInfo,
    DatasetNotFoundError,
    load_dataset_info,
)
from cts.data.io import place_file, staging_dir
from cts.data.pascal_context import prepare_pascal_context
from cts.data.synthetic import generate_scene_dataset

DATASETS = ("synthetic", "ade20k", "cityscapes", "pascal_context", "folder")


def prepare_folder(root: str | os.PathLike, source: str | os.PathLike | None = None) -> DatasetInfo:
    """A user's folder (``images/{train,val}``, ``masks/{train,val}``, ``classes.txt``,
    optional ``dataset.yaml``): used in place when ``source`` is None, else hard-linked
    (copied across file systems) from ``source`` into ``root`` unless ``root`` exists."""
    root = Path(root)
    if source is None and not root.exists():
        raise DatasetNotFoundError(
            f"dataset folder {root} not found: for dataset folder, put your data there "
            "(images/{train,val}/*.jpg, masks/{train,val}/*.png with class ids, 255 = "
            "ignore, and classes.txt, one name per line), or set dataset_source to a "
            "folder in that layout to link it into data_root"
        )
    if source is None or root.exists():
        for split in SPLITS:
            split_dirs(root, split)
        return load_dataset_info(root)
    source = Path(source)
    info = load_dataset_info(source)
    with staging_dir(root) as folder:
        for split in SPLITS:
            image_dir, mask_dir = split_dirs(source, split)
            for path in [*list_images(image_dir).values(), *list_masks(mask_dir).values()]:
                place_file(path, folder / path.relative_to(source), move=False)
        for name in (CLASSES_FILE, INFO_FILE):  # copied: small, and edited independently
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)
    return info


def prepare_dataset(
    name: str,
    root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    mirror: str | None = None,
    **generation_kwargs: Any,
) -> DatasetInfo:
    """Prepare dataset ``name`` in ``root``; an already prepared ``root`` is loaded as is.

    Args:
        name: one of :data:`DATASETS`.
        root: destination folder (canonical layout).
        source: downloaded archive(s) or extracted release (see each ``prepare_*``);
            required for cityscapes, optional for ade20k / pascal_context (None
            downloads), the user's folder for ``folder``.
        mirror: base URL replacing the official download host.
        generation_kwargs: for ``synthetic``, :func:`generate_scene_dataset` arguments
            (``num_train``, ``num_val``, ``image_size``, ``num_classes``, ``seed``, ...).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if generation_kwargs and name != "synthetic":
        raise TypeError(
            f"dataset {name!r} takes no generation arguments {sorted(generation_kwargs)}"
        )
    root = Path(root)
    if name != "folder" and (root / INFO_FILE).is_file():
        info = load_dataset_info(root)
        if name == "synthetic":
            _check_generation(root, info, generation_kwargs)
        return info
    if name == "synthetic":
        return generate_scene_dataset(root, **generation_kwargs)
    if name == "ade20k":
        return prepare_ade20k(root, source, mirror)
    if name == "pascal_context":
        return prepare_pascal_context(root, source, mirror)
    if name == "cityscapes":
        if source is None:
            raise ValueError(
                "cityscapes needs source= a folder with leftImg8bit_trainvaltest.zip and "
                "gtFine_trainvaltest.zip (login-only downloads), or their extracted folders"
            )
        return prepare_cityscapes(root, source)
    return prepare_folder(root, source)


def _check_generation(root: Path, info: DatasetInfo, requested: dict[str, Any]) -> None:
    """Refuse to reuse a synthetic set generated with other parameters."""
    call = inspect.signature(generate_scene_dataset).bind(root, **requested)
    call.apply_defaults()
    differ = {
        k: (info.source.get(k), v)
        for k, v in call.arguments.items()
        if k in info.source and info.source.get(k) != v
    }
    if differ:
        detail = ", ".join(
            f"{k}: {old} on disk, {new} requested" for k, (old, new) in differ.items()
        )
        raise ValueError(
            f"{root} was generated with other parameters ({detail}); delete it to regenerate"
        )
