"""Stage `preprocess`: validate the dataset, write its manifest, statistics and policy targets."""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from cts.data.folder import SegmentationFolder
from cts.data.info import SPLITS
from cts.data.io import read_mask, write_bytes_atomic
from cts.data.validate import split_statistics, validate_split
from cts.models.vit import backbone_patch_size
from cts.sharing import policy_targets
from cts.tracking import log_metrics_file
from cts_stages.common import (
    METRICS,
    POLICY_TARGETS,
    PREPROCESSED,
    STAGE_SETTINGS,
    dataset_info,
    write_csv,
    write_json,
)
from cts_stages.mlflow_context import stage_run

PARAMS = ("data_root", "backbone", "crop_size", "mlflow_tracking_uri")


class DatasetProblems(ValueError):
    """The dataset has problems; all of them are listed."""


def _policy_targets(dataset: SegmentationFolder, size: int, patch: int) -> dict[str, np.ndarray]:
    """Targets of each whole label map resized to ``size x size``, as the policy net sees it."""

    targets = {}
    lut, ignore = dataset.info.lut(), dataset.info.ignore_index
    for name, _, mask_path in dataset.samples:
        label = cv2.resize(read_mask(mask_path, lut), (size, size), interpolation=cv2.INTER_NEAREST)
        grid = policy_targets(torch.from_numpy(label.astype(np.int64))[None], patch, ignore)
        targets[f"{dataset.split}/{name}"] = grid[0].numpy().astype(np.uint8)
    return targets


def run(params: dict[str, Any]) -> None:
    root = params["data_root"]
    info = dataset_info(params)
    problems = [problem for split in SPLITS for problem in validate_split(root, split)]
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DatasetProblems(f"{root}: {len(problems)} problem(s):\n{listing}")

    patch = backbone_patch_size(params["backbone"])
    PREPROCESSED.mkdir(exist_ok=True)
    manifest, summary, targets = [], {}, {}
    with stage_run("preprocess", params):
        for split in SPLITS:
            dataset = SegmentationFolder(root, split)
            manifest += [
                {"split": split, "name": name, "image": str(image), "mask": str(mask)}
                for name, image, mask in dataset.samples
            ]
            stats = split_statistics(root, split, params["crop_size"], patch)
            stats.write_csv(PREPROCESSED)
            summary[f"{split}_images"] = stats.num_images
            summary[f"{split}_uniform_fraction"] = stats.uniform_fraction
            summary[f"{split}_ignore_fraction"] = stats.ignore_fraction
            targets.update(_policy_targets(dataset, params["crop_size"], patch))
        write_csv(PREPROCESSED / "manifest.csv", pd.DataFrame(manifest))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **targets)
        write_bytes_atomic(POLICY_TARGETS, buffer.getvalue())
        summary["num_classes"] = info.num_classes
        write_json(METRICS / "dataset.json", summary)
        log_metrics_file(METRICS / "dataset.json", settings=STAGE_SETTINGS["preprocess"])
    print(
        f"{root}: {summary['train_images']} train / {summary['val_images']} val images, "
        f"uniform superpatches {100 * summary['train_uniform_fraction']:.1f}% (train)"
    )
