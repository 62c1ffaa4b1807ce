"""What the stage modules share: artifact paths, building objects from params, output files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from cts.checkpoint import load_policy_weights
from cts.data.info import DatasetInfo, load_dataset_info
from cts.data.io import remove_leftovers, write_bytes_atomic
from cts.inference import EvalGeometry
from cts.models import Segmenter, SegmenterConfig
from cts_stages.params import ParamError

PREPROCESSED = Path("preprocessed")
POLICY_TARGETS = PREPROCESSED / "policy_targets.npz"
CHECKPOINTS = Path("checkpoints")
POLICY_CHECKPOINT = CHECKPOINTS / "policy.pt"
SEGMENTER_CHECKPOINT = CHECKPOINTS / "segmenter.pt"
RESUME_DIR = CHECKPOINTS / "resume"
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")


# The metrics file of each stage that writes one, in pipeline order.
STAGE_METRICS = {
    "preprocess": METRICS / "dataset.json",
    "train_policy": METRICS / "policy.json",
    "train_segmenter": METRICS / "train.json",
    "eval_ss": METRICS / "eval_ss.json",
    "eval_ms": METRICS / "eval_ms.json",
    "benchmark": METRICS / "benchmark.json",
}


# Keys of a stage's metrics file that say how its results were obtained (sizes, counts, the
# device): params of its MLflow run, never metrics.
STAGE_SETTINGS = {
    "preprocess": ("train_images", "val_images", "num_classes"),
    "train_policy": ("k", "iterations"),
    "train_segmenter": ("iterations",),
    "eval_ss": ("num_tokens_shared", "policy", "scales", "flip"),
    "eval_ms": ("num_tokens_shared", "policy", "scales", "flip"),
    "benchmark": (
        "precision",
        "compile",
        "batch_size",
        "image_size",
        "num_tokens_shared",
        "device",
        "torch",
        "float32_matmul_precision",
        "cudnn_allow_tf32",
    ),
}


class StageOrderError(RuntimeError):
    """An input another stage produces is missing."""


def require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageOrderError(f"{path} not found: run `cts {stage}` (or `dvc repro {stage}`) first")
    return path


def dataset_info(params: dict[str, Any]) -> DatasetInfo:
    return load_dataset_info(params["data_root"])


def base_size(params: dict[str, Any], info: DatasetInfo) -> int:
    """Short side of an image at scale 1: the ``base_size`` param, else the dataset's."""
    return params["base_size"] or info.base_size


def eval_geometry(params: dict[str, Any], info: DatasetInfo) -> EvalGeometry:
    """The evaluation's sizes from params (``base_size``, ``eval_window``, ``eval_stride``;
    null: the dataset's). A window or stride that cannot work is a one-line ParamError."""
    window = params["eval_window"] or info.window
    stride = params["eval_stride"] or info.stride
    short_side = base_size(params, info)

    def origin(key: str, value: int, dataset_key: str) -> str:
        where = f"{params['data_root']}/dataset.yaml {dataset_key}"
        return f"{key}={value}" if params[key] else f"{where}={value}"

    if stride > window:
        raise ParamError(
            f"{origin('eval_stride', stride, 'stride')}: larger than the window {window}: "
            "pixels between windows would never be scored"
        )
    if window > short_side:
        raise ParamError(
            f"{origin('eval_window', window, 'window')}: larger than the image's short side "
            f"{short_side} at scale 1 ({origin('base_size', short_side, 'base_size')}): set "
            "eval_window to at most base_size"
        )
    return EvalGeometry(short_side, window, stride, info.max_ratio)


def segmenter_config(params: dict[str, Any], num_classes: int) -> SegmenterConfig:
    """The model params ask for: ``token_reduction`` cts shares ``num_tokens_shared`` by
    ``policy``; tome merges ``tome_r`` per block, algm merges in ``algm_layers`` at
    ``algm_threshold`` (each sharing nothing); none does neither. ``algm_layers`` is kept in
    every config: the sweep tries ALGM on any model."""
    reduction = params["token_reduction"]
    return SegmenterConfig(
        backbone=params["backbone"],
        num_classes=num_classes,
        crop_size=params["crop_size"],
        num_tokens_shared=params["num_tokens_shared"] if reduction == "cts" else 0,
        policy=params["policy"] if reduction == "cts" else "none",
        tome_r=params["tome_r"] if reduction == "tome" else 0,
        algm_threshold=params["algm_threshold"] if reduction == "algm" else 0.0,
        algm_layers=tuple(params["algm_layers"]),
        decoder=params["decoder"],
        depth=params["depth"],
        pretrained=params["pretrained"],
        pretrained_path=params["pretrained_path"],
        policy_pretrained_path=params["policy_pretrained_path"],
        drop_path_rate=params["drop_path_rate"],
        policy_feature_stride=params["policy_feature_stride"],
        policy_input_scale=params["policy_input_scale"],
    )


def build_segmenter_for_training(params: dict[str, Any], num_classes: int) -> Segmenter:
    """Segmenter from params, with the trained policy network loaded when the policy uses it."""
    model = Segmenter(segmenter_config(params, num_classes))
    if model.policy_net is not None:
        load_policy_weights(model.policy_net, require(POLICY_CHECKPOINT, "train_policy"))
    return model


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Metrics files are replaced atomically: a reader never sees half a file."""
    return write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_csv(path: Path, table: pd.DataFrame) -> Path:
    return write_bytes_atomic(path, table.to_csv(index=False).encode())


def retire_results(*paths: Path) -> None:
    """Delete a stage's previous results before its new checkpoint replaces the old one: a
    kill in between then leaves no metrics that describe another model (the stage just
    looks not done)."""
    for path in paths:
        path.unlink(missing_ok=True)


def remove_resume_checkpoints(stage: str, older_than: float) -> list[Path]:
    """After a training stage completed: its resume checkpoints of earlier runs, whatever
    their settings (killed runs, superseded params); the final checkpoint replaces them.
    Newer ones belong to a run started meanwhile and are kept."""
    removed = []
    for path in RESUME_DIR.glob(f"{stage}-*.pt"):
        try:
            if path.stat().st_mtime < older_than:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def clean_leftovers(params: dict[str, Any]) -> list[Path]:
    """Remove what killed processes left in the pipeline's folders: temporary files of
    interrupted atomic writes and dataset staging folders (``.NAME.PID.XXXX.tmp`` and
    ``.partial``, of dead pids only). Resume checkpoints are kept: they are how a killed run
    continues."""
    folders = [CHECKPOINTS, RESUME_DIR, METRICS, PLOTS, PREPROCESSED, REPORTS]
    folders += [p for p in REPORTS.glob("*") if p.is_dir()]
    if params.get("data_root"):
        root = Path(params["data_root"])
        folders += [root.parent, root, *(root / "images").glob("*"), *(root / "masks").glob("*")]
    removed = [path for folder in folders for path in remove_leftovers(folder)]
    if removed:
        shown = ", ".join(map(str, removed[:3])) + (", ..." if len(removed) > 3 else "")
        print(f"removed {len(removed)} leftover(s) of killed runs: {shown}", file=sys.stderr)
    return removed
