"""Stage `train_policy`: train the policy network on superpatch targets, alone, before Segmenter."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cts.checkpoint import policy_payload, save_checkpoint
from cts.data.folder import SegmentationFolder
from cts.data.loader import build_loader
from cts.data.transforms import PolicyTransform
from cts.engine import (
    TrainLoop,
    TrainState,
    autocast,
    batches_from,
    init_distributed,
    poly_schedule,
    resolve_device,
    resume,
    seed_everything,
    split_batch,
    sync_batch_norm,
    wrap_distributed,
)
from cts.metrics import PolicyMetric
from cts.models import PolicyNet, backbone_normalization
from cts.tracking import log_metrics_file, log_training_row
from stages.common import (
    METRICS,
    PLOTS,
    POLICY_CHECKPOINT,
    POLICY_TARGETS,
    RESUME_DIR,
    STAGE_SETTINGS,
    dataset_info,
    remove_resume_checkpoints,
    require,
    retire_results,
    write_csv,
    write_json,
)
from stages.fingerprint import fingerprint
from stages.launch import LAUNCH_PARAMS
from stages.mlflow_context import stage_run
from stages.params import patch_size_of

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


@dataclass(frozen=True)
class PolicyRecipe:
    """How the policy net is trained on one dataset.

    Attributes:
        crop: a random ``crop_size`` crop (else the whole image resized to ``crop_size``).
        short_side: with ``crop``, the short side is first resized to this (None: kept).
        border_ignore: :func:`cts.sharing.policy_targets`' border rule.
        constant_lr: the lr stays ``policy_lr`` (else it decays, poly 0.9, to 0).
    """

    crop: bool = False
    short_side: int | None = None
    border_ignore: bool = True
    constant_lr: bool = False


# The authors' recipes: policynet/train.py (AdamW at a constant lr) with
# policynet/policynet/data_ade20k.py (whole image resized to 512, border rule),
# data_pcontext.py (short side 512, random 480 crop) and data_cityscapes.py (random 768 crop
# of the full image), the last two without the border rule. Synthetic and folder datasets
# keep this project's recipe (the whole image at the crop size, border rule, poly decay).
POLICY_RECIPES = {
    "ade20k": PolicyRecipe(constant_lr=True),
    "pascal_context": PolicyRecipe(
        crop=True, short_side=512, border_ignore=False, constant_lr=True
    ),
    "cityscapes": PolicyRecipe(crop=True, border_ignore=False, constant_lr=True),
}


def policy_recipe(dataset: str) -> PolicyRecipe:
    """The policy-training recipe of ``dataset`` (a :class:`DatasetInfo` name)."""
    return POLICY_RECIPES.get(dataset, PolicyRecipe())


def policy_lr_schedule(recipe: PolicyRecipe, iterations: int):
    """LambdaLR factor of the policy net's lr at each step."""
    return (lambda step: 1.0) if recipe.constant_lr else poly_schedule(iterations)


def paper_k(crop_size: int, patch_size: int) -> int:
    """K of the paper's 30% token reduction: ceil(N / 10) (103 at 512, 90 at 480, 160 at 640)."""
    return math.ceil((crop_size // patch_size) ** 2 / 10)


@torch.inference_mode()
def evaluate_policy(
    policy: nn.Module,
    loader,
    targets: dict[str, np.ndarray],
    grid: tuple[int, int],
    ks: list[int],
    device: torch.device,
    precision: str,
) -> PolicyMetric:
    """Accuracy and precision@K on the validation split against the preprocessed targets."""
    policy.eval()
    metric = PolicyMetric(ks)
    for batch in loader:
        with autocast(device, precision):
            scores = policy.share_scores(batch["image"].to(device), grid)
        reference = torch.stack(
            [torch.from_numpy(targets[f"val/{name}"].astype(np.int64)) for name in batch["name"]]
        )
        metric.update(scores.cpu(), reference.flatten(1))
    return metric


def per_process_batch(params: dict[str, Any], world_size: int) -> int:
    """Each process's share of the global policy_batch_size."""
    return split_batch(params["policy_batch_size"], world_size, key="policy_batch_size")


def run(params: dict[str, Any], resume_training: bool = True) -> None:
    run_started = time.time()
    info = dataset_info(params)
    targets = dict(np.load(require(POLICY_TARGETS, "preprocess")))
    device = resolve_device(params["device"])
    context = init_distributed(device)
    seed_everything(params["seed"] + context.rank)
    mean, std = backbone_normalization(params["backbone"])
    patch = patch_size_of(params["backbone"])
    crop = params["crop_size"]
    grid = (crop // (2 * patch),) * 2

    policy = PolicyNet(
        pretrained=params["pretrained"],
        feature_stride=params["policy_feature_stride"],
        input_scale=params["policy_input_scale"],
        input_mean=mean,
        input_std=std,
        pretrained_path=params["policy_pretrained_path"],
    ).to(device)
    recipe = policy_recipe(info.name)
    train_transform = PolicyTransform(
        mean,
        std,
        crop,
        patch,
        flip=True,
        ignore_index=info.ignore_index,
        crop=recipe.crop,
        short_side=recipe.short_side,
        border_ignore=recipe.border_ignore,
    )
    train_set = SegmentationFolder(params["data_root"], "train", train_transform)
    val_set = SegmentationFolder(
        params["data_root"], "val", PolicyTransform(mean, std, crop, patch, flip=False)
    )
    batch_size = params["policy_batch_size"]
    train_loader = build_loader(
        train_set,
        per_process_batch(params, context.world_size),
        True,
        params["num_workers"],
        params["seed"],
        drop_last=True,
        distributed=context.enabled,
        device=device,
    )
    val_loader = build_loader(val_set, batch_size, False, 0, params["seed"], drop_last=False)

    iterations = params["policy_iterations"]
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=params["policy_lr"], weight_decay=params["policy_weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, policy_lr_schedule(recipe, iterations))
    # The authors train the policy net on one GPU with batch norm in training mode; under DDP
    # each process would normalise by its own B/W images: sync the statistics so that W
    # processes compute what one does.
    model = wrap_distributed(sync_batch_norm(policy), context, device)
    key = fingerprint(params, PARAMS)
    resume_path = RESUME_DIR / f"policy-{key}.pt"
    state = resume(resume_path, model, optimizer, scheduler, key) if resume_training else None
    state = state or TrainState()
    if state.iteration and context.is_main:
        print(f"resuming policy training at iteration {state.iteration} from {resume_path}")

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        logits = net(batch["image"], grid)
        return F.cross_entropy(
            logits.float(), batch["target"], ignore_index=info.ignore_index, reduction="sum"
        )

    def count_fn(batch: dict) -> torch.Tensor:
        return (batch["target"] != info.ignore_index).sum()

    num_superpatches = grid[0] * grid[1]
    k = paper_k(crop, patch)
    curve_ks = sorted({*range(0, num_superpatches + 1, max(num_superpatches // 32, 1)), k})

    with stage_run("train_policy", params):
        loop = TrainLoop(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            count_fn=count_fn,
            iterations=iterations,
            device=device,
            precision=params["train_precision"],
            checkpoint_path=resume_path,
            checkpoint_every=max(iterations // 5, 1),
            fingerprint=key,
            log_every=10,
            context=context,
            description="train_policy",
            on_log=log_training_row,
        )
        state = loop.run(state, batches_from(train_loader, state.iteration))
        if not context.is_main:
            return
        metric = evaluate_policy(
            policy, val_loader, targets, grid, curve_ks, device, params["precision"]
        )
        retire_results(METRICS / "policy.json")
        save_checkpoint(POLICY_CHECKPOINT, policy_payload(policy, history=state.history))
        results = {
            "accuracy": metric.accuracy(),
            "precision_at_k": metric.precision(k),
            "k": k,
            "iterations": iterations,
            "final_loss": state.history[-1]["loss"],
        }
        write_json(METRICS / "policy.json", results)
        curve = [{"k": kk, "precision": metric.precision(kk)} for kk in curve_ks if kk > 0]
        write_csv(PLOTS / "policy_precision.csv", pd.DataFrame(curve))
        write_csv(PLOTS / "policy_loss.csv", pd.DataFrame(state.history))
        log_metrics_file(METRICS / "policy.json", settings=STAGE_SETTINGS["train_policy"])
    resume_path.unlink(missing_ok=True)
    remove_resume_checkpoints("policy", run_started)
    print(
        f"policy: accuracy {results['accuracy']:.1f}%, precision@{k} "
        f"{results['precision_at_k']:.1f}% -> {POLICY_CHECKPOINT}"
    )
