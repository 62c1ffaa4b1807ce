"""Stage `train_segmenter`: Segmenter + CTS with the trained policy network frozen."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.data.folder import SegmentationFolder
from cts.data.info import DatasetInfo
from cts.data.loader import build_loader
from cts.data.transforms import TrainTransform, ValTransform
from cts.engine import TrainLoop, TrainState, batches_from, prefer_matmul_attention, split_batch
from cts.losses import class_weights
from cts.models import Segmenter
from cts.segmenter_training import (
    build_optimizer,
    lr_schedule,
    segmenter_loss,
    segmenter_validation,
)
from cts.tracking import log_metrics_file, log_training_row
from cts_stages.common import (
    METRICS,
    PLOTS,
    PREPROCESSED,
    SEGMENTER_CHECKPOINT,
    STAGE_SETTINGS,
    base_size,
    build_segmenter_for_training,
    dataset_info,
    eval_geometry,
    require,
    retire_results,
    write_csv,
    write_json,
)
from cts_stages.launch import LAUNCH_PARAMS
from cts_stages.training import Session, start_training, train

PARAMS = (
    "data_root",
    "backbone",
    "depth",
    "pretrained",
    "pretrained_path",
    "policy_pretrained_path",
    "crop_size",
    "num_tokens_shared",
    "policy",
    "token_reduction",
    "tome_r",
    "algm_threshold",
    "algm_layers",
    "decoder",
    "drop_path_rate",
    "policy_feature_stride",
    "policy_input_scale",
    "optimizer",
    "loss_stride",
    "class_weight_power",
    "train_scale_range",
    "train_unshared_fraction",
    "train_tokens_shared_range",
    "photometric",
    "iterations",
    "batch_size",
    "grad_accum_steps",
    "lr",
    "weight_decay",
    "warmup_iterations",
    "eval_every",
    "base_size",
    "eval_window",
    "eval_stride",
    "checkpoint_every",
    "device",
    "precision",
    "train_precision",
    "seed",
    "num_workers",
    "mlflow_tracking_uri",
    "mlflow_registered_model",
    *LAUNCH_PARAMS,
)


def class_frequencies(path: Path, num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` float64 share of the labelled pixels per class, from preprocess's
    ``train_classes.csv`` (columns ``class_id``, ``frequency``); absent classes get 0."""
    stats = pd.read_csv(path)
    frequencies = torch.zeros(num_classes, dtype=torch.float64)
    # torch.tensor copies: pandas hands out read-only arrays, which as_tensor would wrap.
    frequencies[torch.tensor(stats["class_id"].to_numpy())] = torch.tensor(
        stats["frequency"].to_numpy(), dtype=torch.float64
    )
    return frequencies


def validation_curve(history: list[dict[str, float]]) -> pd.DataFrame:
    """`step, mIoU`: one row per validated step, in step order, the latest validation of a
    step winning (DVC's plots draw every row: a step listed twice draws a spike)."""
    rows = [(row["step"], row["val_mIoU"]) for row in history if "val_mIoU" in row]
    curve = pd.DataFrame(rows, columns=["step", "mIoU"])
    return curve.drop_duplicates("step", keep="last").sort_values("step", kind="stable")


def per_process_batch(params: dict[str, Any], world_size: int) -> int:
    """Micro-batch of each process: the global batch_size over processes and accumulation."""
    return split_batch(params["batch_size"], world_size, params["grad_accum_steps"])


def train_loader(
    params: dict[str, Any], info: DatasetInfo, segmenter: Segmenter, session: Session
) -> DataLoader:
    """Each process's share of the training split: augmented crops, shuffled by epoch."""
    transform = TrainTransform(
        base_size(params, info),
        params["crop_size"],
        segmenter.config.mean,
        segmenter.config.std,
        scale_range=tuple(params["train_scale_range"]),
        photometric=params["photometric"],
        ignore_index=info.ignore_index,
        max_ratio=info.max_ratio,
    )
    return build_loader(
        SegmentationFolder(params["data_root"], "train", transform),
        per_process_batch(params, session.context.world_size),
        True,
        params["num_workers"],
        params["seed"],
        drop_last=True,
        distributed=session.context.enabled,
        device=session.device,
    )


def validation(
    params: dict[str, Any], info: DatasetInfo, segmenter: Segmenter, session: Session
) -> Callable[[nn.Module], dict[str, float]]:
    """The loop's ``evaluate``: sliding-window metrics on each process's share of the val
    split (the metric is summed over processes)."""
    transform = ValTransform(segmenter.config.mean, segmenter.config.std)
    val_set = SegmentationFolder(params["data_root"], "val", transform)
    geometry = eval_geometry(params, info)
    loader = build_loader(
        val_set, 1, False, 0, params["seed"], drop_last=False, distributed=session.context.enabled
    )
    return segmenter_validation(
        loader, info.num_classes, geometry, session.device, params["precision"]
    )


def class_weight(
    params: dict[str, Any], info: DatasetInfo, device: torch.device
) -> torch.Tensor | None:
    """``(num_classes,)`` cross-entropy weights from the training split's class frequencies
    (``class_weight_power``; 0: None, unweighted)."""
    if not params["class_weight_power"]:
        return None
    frequencies = class_frequencies(
        require(PREPROCESSED / "train_classes.csv", "preprocess"), info.num_classes
    )
    return class_weights(frequencies, params["class_weight_power"]).to(device)


def run(params: dict[str, Any], resume_training: bool = True) -> None:
    info = dataset_info(params)
    session = start_training(params)
    segmenter = build_segmenter_for_training(params, info.num_classes).to(session.device)
    prefer_matmul_attention(segmenter, session.device, params["train_precision"])
    loader = train_loader(params, info, segmenter, session)
    validate = validation(params, info, segmenter, session)

    name, lr, iterations = params["optimizer"], params["lr"], params["iterations"]
    optimizer = build_optimizer(segmenter, name, lr, params["weight_decay"])
    schedule = lr_schedule(name, iterations, lr, params["warmup_iterations"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    k_range = params["train_tokens_shared_range"]
    loss_fn, count_fn = segmenter_loss(
        tuple(k_range) if k_range else segmenter.num_tokens_shared,
        params["train_unshared_fraction"],
        params["seed"],
        params["loss_stride"],
        info.ignore_index,
        class_weight(params, info, session.device),
        lambda: scheduler.last_epoch,
    )
    accum = params["grad_accum_steps"]
    loop = TrainLoop(
        model=session.distributed(segmenter),
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        count_fn=count_fn,
        iterations=iterations,
        device=session.device,
        precision=params["train_precision"],
        grad_accum_steps=accum,
        checkpoint_every=params["checkpoint_every"],
        evaluate=validate,
        eval_every=params["eval_every"],
        log_every=10,
        on_log=log_training_row,
        context=session.context,
        description="train_segmenter",
    )
    train(
        "train_segmenter",
        params,
        PARAMS,
        session,
        loop,
        partial(batches_from, loader, grad_accum_steps=accum),
        partial(write_results, params, segmenter),
        resume_training,
    )


def write_results(
    params: dict[str, Any], segmenter: Segmenter, state: TrainState, seconds: float
) -> str:
    """The checkpoint, metrics/train.json, the loss and validation curves, and the model in
    MLflow; returns the summary line."""
    retire_results(METRICS / "train.json")
    # The evaluation's sizes travel with the weights: `cts predict` windows images the same way.
    geometry = eval_geometry(params, dataset_info(params))
    payload = segmenter_payload(segmenter, eval_geometry=geometry, history=state.history)
    save_checkpoint(SEGMENTER_CHECKPOINT, payload)
    losses = [row for row in state.history if "loss" in row]
    evals = [row for row in state.history if "val_mIoU" in row]
    write_csv(PLOTS / "train_loss.csv", pd.DataFrame(losses)[["step", "loss", "lr"]])
    if evals:
        write_csv(PLOTS / "val_miou.csv", validation_curve(state.history))
    results = {
        "final_loss": losses[-1]["loss"],
        "val_mIoU": evals[-1]["val_mIoU"] if evals else None,
        "iterations": params["iterations"],
        "train_seconds_this_run": seconds,
    }
    write_json(METRICS / "train.json", results)
    log_metrics_file(METRICS / "train.json", settings=STAGE_SETTINGS["train_segmenter"])
    log_model(params["mlflow_registered_model"])
    return f"segmenter: final loss {results['final_loss']:.4f} -> {SEGMENTER_CHECKPOINT}"


def log_model(registered_model_name: str | None) -> None:
    """The checkpoint as an artifact and as a pyfunc model (uint8 images -> labels, as
    `cts predict` computes them), registered under ``registered_model_name`` unless None."""
    import logging

    from cts import tracking

    if tracking.active_run() is None:
        return
    # The model is logged by reference to cts (cloudpickle); its safety warning is for loaders.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    tracking.log_artifact(str(SEGMENTER_CHECKPOINT), artifact_path="checkpoints")
    tracking.log_model(SEGMENTER_CHECKPOINT, registered_model_name)
