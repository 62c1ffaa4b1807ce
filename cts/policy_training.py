"""The policy network's training recipe: per-dataset data and schedule, loss, evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cts.data.transforms import PolicyTransform
from cts.engine import autocast, poly_schedule
from cts.metrics import PolicyMetric


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


def policy_lr_schedule(recipe: PolicyRecipe, iterations: int) -> Callable[[int], float]:
    """LambdaLR factor of the policy net's lr at each step."""
    return (lambda step: 1.0) if recipe.constant_lr else poly_schedule(iterations)


def policy_transforms(
    recipe: PolicyRecipe,
    mean: Sequence[float],
    std: Sequence[float],
    crop_size: int,
    patch_size: int,
    ignore_index: int,
) -> tuple[PolicyTransform, PolicyTransform]:
    """Training (``recipe``'s geometry, random flip) and validation (whole image at
    ``crop_size``, no flip) transforms of the policy net's samples."""
    train = PolicyTransform(
        mean,
        std,
        crop_size,
        patch_size,
        flip=True,
        ignore_index=ignore_index,
        crop=recipe.crop,
        short_side=recipe.short_side,
        border_ignore=recipe.border_ignore,
    )
    return train, PolicyTransform(mean, std, crop_size, patch_size, flip=False)


def policy_loss(
    grid: tuple[int, int], ignore_index: int
) -> tuple[Callable[[nn.Module, dict], torch.Tensor], Callable[[dict], torch.Tensor]]:
    """``loss_fn`` and ``count_fn`` of the policy net's :class:`cts.engine.TrainLoop`: the
    summed cross-entropy of its ``(B, 2, hs, ws)`` scores on the superpatch ``grid`` against
    the ``(B, hs, ws)`` targets, and the number of targets that are not ``ignore_index``."""

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        logits = net(batch["image"], grid)
        return F.cross_entropy(
            logits.float(), batch["target"], ignore_index=ignore_index, reduction="sum"
        )

    def count_fn(batch: dict) -> torch.Tensor:
        return (batch["target"] != ignore_index).sum()

    return loss_fn, count_fn


def precision_curve_ks(num_superpatches: int, num_tokens_shared: int) -> list[int]:
    """The Ks precision@K is measured at: about 32 steps from 0 to ``num_superpatches``,
    and ``num_tokens_shared``, ascending."""
    step = max(num_superpatches // 32, 1)
    return sorted({*range(0, num_superpatches + 1, step), num_tokens_shared})


@torch.inference_mode()
def evaluate_policy(
    policy: nn.Module,
    loader: DataLoader,
    targets: dict[str, np.ndarray],
    grid: tuple[int, int],
    ks: list[int],
    device: torch.device,
    precision: str,
) -> PolicyMetric:
    """Accuracy and precision@K on the validation split against the preprocessed targets
    (``targets["val/<name>"]``: ``(hs, ws)`` per image)."""
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
