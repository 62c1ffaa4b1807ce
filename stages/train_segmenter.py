"""Stage `train_segmenter`: Segmenter + CTS with the trained policy network frozen."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.data.folder import SegmentationFolder
from cts.data.loader import build_loader
from cts.data.transforms import TrainTransform, ValTransform
from cts.engine import (
    TrainLoop,
    TrainState,
    autocast,
    batches_from,
    init_distributed,
    poly_schedule,
    prefer_matmul_attention,
    resolve_device,
    resume,
    seed_everything,
    segmenter_poly_schedule,
    split_batch,
    wrap_distributed,
)
from cts.inference import evaluate
from cts.losses import class_weights, subgrid_cross_entropy
from cts.sharing import training_num_shared
from cts.tracking import log_metrics_file, log_training_row
from stages.common import (
    METRICS,
    PLOTS,
    PREPROCESSED,
    RESUME_DIR,
    SEGMENTER_CHECKPOINT,
    STAGE_SETTINGS,
    base_size,
    build_segmenter_for_training,
    dataset_info,
    eval_geometry,
    remove_resume_checkpoints,
    require,
    retire_results,
    write_csv,
    write_json,
)
from stages.fingerprint import fingerprint
from stages.launch import LAUNCH_PARAMS
from stages.mlflow_context import stage_run

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
    "decoder",
    "drop_path_rate",
    "policy_feature_stride",
    "policy_input_scale",
    "optimizer",
    "loss_stride",
    "class_weight_power",
    "train_scale_range",
    "train_unshared_fraction",
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


def build_optimizer(model: nn.Module, params: dict[str, Any]) -> torch.optim.Optimizer:
    if params["optimizer"] == "sgd":
        groups = weight_decay_groups(model, params["weight_decay"])
        return torch.optim.SGD(groups, lr=params["lr"], momentum=0.9, nesterov=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=params["lr"], weight_decay=params["weight_decay"])


def lr_schedule(params: dict[str, Any]) -> Callable[[int], float]:
    """LambdaLR factor per optimizer step: the authors' poly (power 0.9) down to
    :data:`AUTHORS_MIN_LR` with sgd; poly down to 0 with adamw."""
    iterations, warmup = params["iterations"], params["warmup_iterations"]
    if params["optimizer"] == "sgd":
        return segmenter_poly_schedule(iterations, params["lr"], 0.9, warmup, AUTHORS_MIN_LR)
    return poly_schedule(iterations, 0.9, warmup)


def segmenter_loss(
    num_tokens_shared: int,
    params: dict[str, Any],
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
    (:func:`cts.sharing.training_num_shared`).
    """
    stride = params["loss_stride"]

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        # The scheduler counts optimizer steps and is resumed with them, so every micro-batch
        # and process of a step, and a resumed run, draw the same K.
        k = training_num_shared(
            num_tokens_shared, params["train_unshared_fraction"], params["seed"], step()
        )
        out = net(batch["image"], batch["label"], num_tokens_shared=k, upsample=False)
        return subgrid_cross_entropy(
            out.logits,
            batch["label"],
            stride,
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
        return total.double() / stride**2

    return loss_fn, count_fn


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


def run(params: dict[str, Any], resume_training: bool = True) -> None:
    run_started = time.time()
    info = dataset_info(params)
    device = resolve_device(params["device"])
    context = init_distributed(device)
    # Distinct dropout/drop-path streams per process; DDP copies rank 0's initial weights.
    seed_everything(params["seed"] + context.rank)
    segmenter = build_segmenter_for_training(params, info.num_classes).to(device)
    prefer_matmul_attention(segmenter, device, params["train_precision"])
    mean, std = segmenter.config.mean, segmenter.config.std

    micro_batch, accum = per_process_batch(params, context.world_size), params["grad_accum_steps"]
    train_set = SegmentationFolder(
        params["data_root"],
        "train",
        TrainTransform(
            base_size(params, info),
            params["crop_size"],
            mean,
            std,
            scale_range=tuple(params["train_scale_range"]),
            photometric=params["photometric"],
            ignore_index=info.ignore_index,
            max_ratio=info.max_ratio,
        ),
    )
    train_loader = build_loader(
        train_set,
        micro_batch,
        True,
        params["num_workers"],
        params["seed"],
        drop_last=True,
        distributed=context.enabled,
        device=device,
    )
    val_set = SegmentationFolder(params["data_root"], "val", ValTransform(mean, std))
    geometry = eval_geometry(params, info)
    val_loader = build_loader(
        val_set, 1, False, 0, params["seed"], drop_last=False, distributed=context.enabled
    )

    iterations = params["iterations"]
    optimizer = build_optimizer(segmenter, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(params))
    model = wrap_distributed(segmenter, context, device)
    key = fingerprint(params, PARAMS)
    resume_path = RESUME_DIR / f"segmenter-{key}.pt"
    state = resume(resume_path, model, optimizer, scheduler, key) if resume_training else None
    state = state or TrainState()
    if state.iteration and context.is_main:
        print(f"resuming segmenter training at iteration {state.iteration} from {resume_path}")

    weight = None
    if params["class_weight_power"]:
        frequencies = class_frequencies(
            require(PREPROCESSED / "train_classes.csv", "preprocess"), info.num_classes
        )
        weight = class_weights(frequencies, params["class_weight_power"]).to(device)

    loss_fn, count_fn = segmenter_loss(
        segmenter.num_tokens_shared,
        params,
        info.ignore_index,
        weight,
        lambda: scheduler.last_epoch,
    )

    def validate(net: nn.Module) -> dict[str, float]:
        net.eval()
        with autocast(device, params["precision"]):
            metric = evaluate(
                lambda images: net(images).logits,
                val_loader,
                info.num_classes,
                geometry,
                device,
                progress=False,
            )
        return {"val_" + key: value for key, value in metric.compute().items()}

    with stage_run("train_segmenter", params):
        started = time.perf_counter()
        loop = TrainLoop(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            count_fn=count_fn,
            iterations=iterations,
            device=device,
            precision=params["train_precision"],
            grad_accum_steps=accum,
            checkpoint_path=resume_path,
            checkpoint_every=params["checkpoint_every"],
            fingerprint=key,
            evaluate=validate,
            eval_every=params["eval_every"],
            log_every=10,
            on_log=log_training_row,
            context=context,
            description="train_segmenter",
        )
        state = loop.run(state, batches_from(train_loader, state.iteration, accum))
        if not context.is_main:
            return
        seconds = time.perf_counter() - started
        retire_results(METRICS / "train.json")
        save_checkpoint(SEGMENTER_CHECKPOINT, segmenter_payload(segmenter, history=state.history))
        losses = [row for row in state.history if "loss" in row]
        evals = [row for row in state.history if "val_mIoU" in row]
        write_csv(PLOTS / "train_loss.csv", pd.DataFrame(losses)[["step", "loss", "lr"]])
        if evals:
            write_csv(PLOTS / "val_miou.csv", validation_curve(state.history))
        results = {
            "final_loss": losses[-1]["loss"],
            "val_mIoU": evals[-1]["val_mIoU"] if evals else None,
            "iterations": iterations,
            "train_seconds_this_run": seconds,
        }
        write_json(METRICS / "train.json", results)
        log_metrics_file(METRICS / "train.json", settings=STAGE_SETTINGS["train_segmenter"])
        log_model(params["mlflow_registered_model"])
    resume_path.unlink(missing_ok=True)
    remove_resume_checkpoints("segmenter", run_started)
    print(f"segmenter: final loss {results['final_loss']:.4f} -> {SEGMENTER_CHECKPOINT}")


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
