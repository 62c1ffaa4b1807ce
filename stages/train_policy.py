"""Stage `train_policy`: train the policy network on superpatch targets, alone, before Segmenter."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cts.checkpoint import policy_payload, save_checkpoint
from cts.data.folder import SegmentationFolder
from cts.data.info import DatasetInfo
from cts.data.loader import build_loader
from cts.engine import TrainLoop, TrainState, batches_from, split_batch, sync_batch_norm
from cts.geometry import num_superpatches, paper_num_shared, superpatch_grid
from cts.metrics import PolicyMetric
from cts.models import PolicyNet, backbone_normalization
from cts.models.vit import backbone_patch_size
from cts.policy_training import (
    evaluate_policy,
    policy_loss,
    policy_lr_schedule,
    policy_recipe,
    policy_transforms,
    precision_curve_ks,
)
from cts.tracking import log_metrics_file, log_training_row
from cts_stages.common import (
    METRICS,
    PLOTS,
    POLICY_CHECKPOINT,
    POLICY_TARGETS,
    STAGE_SETTINGS,
    dataset_info,
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
    "pretrained",
    "policy_pretrained_path",
    "crop_size",
    "policy_feature_stride",
    "policy_input_scale",
    "policy_iterations",
    "policy_batch_size",
    "policy_lr",
    "policy_weight_decay",
    "device",
    "precision",
    "train_precision",
    "seed",
    "num_workers",
    "mlflow_tracking_uri",
    *LAUNCH_PARAMS,
)


def per_process_batch(params: dict[str, Any], world_size: int) -> int:
    """Each process's share of the global policy_batch_size."""
    return split_batch(params["policy_batch_size"], world_size, key="policy_batch_size")


def build_policy(params: dict[str, Any], device: torch.device) -> PolicyNet:
    """The policy net, normalising its input as the backbone was pretrained."""
    mean, std = backbone_normalization(params["backbone"])
    return PolicyNet(
        pretrained=params["pretrained"],
        feature_stride=params["policy_feature_stride"],
        input_scale=params["policy_input_scale"],
        input_mean=mean,
        input_std=std,
        pretrained_path=params["policy_pretrained_path"],
    ).to(device)


def loaders(
    params: dict[str, Any], info: DatasetInfo, patch_size: int, session: Session
) -> tuple[DataLoader, DataLoader]:
    """Training loader (each process's share, the dataset's recipe) and validation loader
    (the whole val split, read by the main process)."""
    mean, std = backbone_normalization(params["backbone"])
    train_transform, val_transform = policy_transforms(
        policy_recipe(info.name), mean, std, params["crop_size"], patch_size, info.ignore_index
    )
    train_loader = build_loader(
        SegmentationFolder(params["data_root"], "train", train_transform),
        per_process_batch(params, session.context.world_size),
        True,
        params["num_workers"],
        params["seed"],
        drop_last=True,
        distributed=session.context.enabled,
        device=session.device,
    )
    val_set = SegmentationFolder(params["data_root"], "val", val_transform)
    val_loader = build_loader(
        val_set, params["policy_batch_size"], False, 0, params["seed"], drop_last=False
    )
    return train_loader, val_loader


def run(params: dict[str, Any], resume_training: bool = True) -> None:
    info = dataset_info(params)
    targets = dict(np.load(require(POLICY_TARGETS, "preprocess")))
    crop, patch = params["crop_size"], backbone_patch_size(params["backbone"])
    grid = superpatch_grid(crop, crop, patch)
    k = paper_num_shared(crop, patch)
    curve_ks = precision_curve_ks(num_superpatches(crop, patch), k)
    session = start_training(params)
    policy = build_policy(params, session.device)
    train_loader, val_loader = loaders(params, info, patch, session)

    iterations = params["policy_iterations"]
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=params["policy_lr"], weight_decay=params["policy_weight_decay"]
    )
    schedule = policy_lr_schedule(policy_recipe(info.name), iterations)
    loss_fn, count_fn = policy_loss(grid, info.ignore_index)
    loop = TrainLoop(
        # The authors train the policy net on one GPU with batch norm in training mode; under
        # DDP each process would normalise by its own B/W images: sync the statistics so
        # that W processes compute what one does.
        model=session.distributed(sync_batch_norm(policy)),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        loss_fn=loss_fn,
        count_fn=count_fn,
        iterations=iterations,
        device=session.device,
        precision=params["train_precision"],
        checkpoint_every=max(iterations // 5, 1),
        log_every=10,
        context=session.context,
        description="train_policy",
        on_log=log_training_row,
    )

    def finish(state: TrainState, seconds: float) -> str:
        metric = evaluate_policy(
            policy, val_loader, targets, grid, curve_ks, session.device, params["precision"]
        )
        return write_results(params, policy, state, metric, k)

    batches = partial(batches_from, train_loader)
    train("train_policy", params, PARAMS, session, loop, batches, finish, resume_training)


def write_results(
    params: dict[str, Any], policy: PolicyNet, state: TrainState, metric: PolicyMetric, k: int
) -> str:
    """The checkpoint, metrics/policy.json (accuracy, precision at the paper's ``k``), the
    precision@K curve over ``metric.ks`` and the loss curve; returns the summary line."""
    retire_results(METRICS / "policy.json")
    save_checkpoint(POLICY_CHECKPOINT, policy_payload(policy, history=state.history))
    results = {
        "accuracy": metric.accuracy(),
        "precision_at_k": metric.precision(k),
        "k": k,
        "iterations": params["policy_iterations"],
        "final_loss": state.history[-1]["loss"],
    }
    write_json(METRICS / "policy.json", results)
    curve = [{"k": kk, "precision": metric.precision(kk)} for kk in metric.ks if kk > 0]
    write_csv(PLOTS / "policy_precision.csv", pd.DataFrame(curve))
    write_csv(PLOTS / "policy_loss.csv", pd.DataFrame(state.history))
    log_metrics_file(METRICS / "policy.json", settings=STAGE_SETTINGS["train_policy"])
    return (
        f"policy: accuracy {results['accuracy']:.1f}%, precision@{k} "
        f"{results['precision_at_k']:.1f}% -> {POLICY_CHECKPOINT}"
    )
