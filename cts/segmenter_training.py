"""Segmenter's training recipe: optimizer, learning-rate schedule, loss and validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cts.engine import autocast, poly_schedule, segmenter_poly_schedule
from cts.inference import EvalGeometry, evaluate
from cts.losses import subgrid_cross_entropy
from cts.sharing import training_num_shared

# optimizer: sgd is the authors' recipe (segm/train.py with timm 0.4.12): timm's "sgd"
# (Nesterov momentum 0.9, the decay groups below) and Segmenter's PolynomialLR down to
# their --min-lr default. adamw is this project's recipe for training from scratch.
AUTHORS_MIN_LR = 1e-5
# Parameters the authors' model lists in no_weight_decay (ViT position embedding and
# class/distillation tokens, the mask transformer's class embeddings; timm adds registers).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token", "cls_emb")


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups as timm 0.4.12's ``create_optimizer`` makes them: with weight decay,
    none for 1-D parameters (biases, norms), names ending in ``.bias`` and
    :data:`NO_WEIGHT_DECAY`; without, one group. Frozen parameters are left out."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": [p for _, p in named], "weight_decay": 0.0}]
    decay, no_decay = [], []
    for name, param in named:
        skip = (
            param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY
        )
        (no_decay if skip else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(
    model: nn.Module, optimizer: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The trainable parameters' ``optimizer``: ``sgd``, the authors' Nesterov SGD over
    :func:`weight_decay_groups`, or ``adamw``."""
    if optimizer == "sgd":
        groups = weight_decay_groups(model, weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)


def lr_schedule(optimizer: str, iterations: int, lr: float, warmup: int) -> Callable[[int], float]:
    """LambdaLR factor per optimizer step: the authors' poly (power 0.9) down to
    :data:`AUTHORS_MIN_LR` with sgd; poly down to 0 with adamw."""
    if optimizer == "sgd":
        return segmenter_poly_schedule(iterations, lr, 0.9, warmup, AUTHORS_MIN_LR)
    return poly_schedule(iterations, 0.9, warmup)


def segmenter_loss(
    num_tokens_shared: int | tuple[int, int],
    unshared_fraction: float,
    seed: int,
    loss_stride: int,
    ignore_index: int,
    weight: torch.Tensor | None,
    step: Callable[[], int],
) -> tuple[Callable[[nn.Module, dict], torch.Tensor], Callable[[dict], torch.Tensor]]:
    """``loss_fn`` and ``count_fn`` of the segmenter's :class:`cts.engine.TrainLoop`.

    ``loss_fn`` sums the cross-entropy (``ignore_index`` left out, class ``weight`` or none)
    of the class scores bilinearly upsampled (``align_corners=False``) to the crop, on every
    ``loss_stride``-th pixel; ``count_fn`` is the (weighted) number of labelled pixels that
    sum is over, and the loop divides one by the other over the global batch. With
    ``loss_stride`` 1 and no weight that is ``F.cross_entropy(F.interpolate(logits, crop),
    labels, ignore_index=255)``, the authors' ``CrossEntropyLoss(ignore_index=255)`` on
    ``model.forward(im)``. ``step()`` is the optimizer step the sharing K is drawn for
    (:func:`cts.sharing.training_num_shared` with ``unshared_fraction`` and ``seed``): the
    model's K, or one from a ``(low, high)`` range.
    """

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        # The scheduler counts optimizer steps and is resumed with them, so every micro-batch
        # and process of a step, and a resumed run, draw the same K.
        k = training_num_shared(num_tokens_shared, unshared_fraction, seed, step())
        out = net(batch["image"], batch["label"], num_tokens_shared=k, upsample=False)
        return subgrid_cross_entropy(
            out.logits,
            batch["label"],
            loss_stride,
            ignore_index=ignore_index,
            weight=weight,
            reduction="sum",
        )

    pixel_weight = None if weight is None else weight.cpu()

    def count_fn(batch: dict) -> torch.Tensor:
        # What normalises the summed loss, the same on every process: the expected
        # (class-weighted, as cross_entropy's weighted mean) number of labelled pixels the
        # subgrid samples.
        labels = batch["label"]
        valid = labels != ignore_index
        if pixel_weight is None:
            total = valid.sum()
        else:
            total = (pixel_weight[torch.where(valid, labels, 0).cpu()] * valid.cpu()).sum()
        return total.double() / loss_stride**2

    return loss_fn, count_fn


def segmenter_validation(
    loader: DataLoader,
    num_classes: int,
    geometry: EvalGeometry,
    device: torch.device,
    precision: str,
) -> Callable[[nn.Module], dict[str, float]]:
    """The loop's ``evaluate``: the sliding-window metrics of the model's class scores on
    ``loader`` at ``precision``, each key prefixed ``val_`` (``val_mIoU``...)."""

    def validate(net: nn.Module) -> dict[str, float]:
        net.eval()
        with autocast(device, precision):
            metric = evaluate(
                lambda images: net(images).logits,
                loader,
                num_classes,
                geometry,
                device,
                progress=False,
            )
        return {"val_" + key: value for key, value in metric.compute().items()}

    return validate
