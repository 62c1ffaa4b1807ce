"""Evaluation shared by the `eval_ss` and `eval_ms` stages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cts.checkpoint import load_segmenter
from cts.data.folder import SegmentationFolder
from cts.data.io import write_image
from cts.data.loader import build_loader
from cts.data.transforms import ValTransform
from cts.engine import autocast, init_distributed, resolve_device
from cts.inference import evaluate
from cts.metrics import SegmentationMetric, per_class_table
from cts.models import Segmenter
from cts.tracking import active_run, log_artifact, log_metrics_file
from cts.visualize import confusion_matrix_image, denormalize, eval_scene, palette
from cts_stages.common import (
    METRICS,
    REPORTS,
    SEGMENTER_CHECKPOINT,
    STAGE_SETTINGS,
    dataset_info,
    eval_geometry,
    require,
    write_csv,
    write_json,
)
from cts_stages.mlflow_context import stage_run

NUM_PICTURES = 4


@torch.inference_mode()
def write_pictures(
    model: Segmenter, dataset: SegmentationFolder, out_dir, device, names: Sequence[str]
) -> list:
    """Input | prediction overlay with shared superpatches outlined | ground truth, per image,
    with panel titles, a legend of the classes in prediction and ground truth, a caption."""
    config = model.config
    colours = palette(config.num_classes)
    crop = config.crop_size
    paths = []
    for index in range(min(NUM_PICTURES, len(dataset))):
        sample = dataset[index]
        image = F.interpolate(sample["image"][None], size=(crop, crop), mode="bilinear")
        label = F.interpolate(
            sample["label"][None, None].float(), size=(crop, crop), mode="nearest"
        )[0, 0].long()
        out = model(image.to(device), label[None].to(device))
        picture = eval_scene(
            denormalize(image[0].numpy(), config.mean, config.std),
            out.logits.argmax(1)[0].cpu().numpy(),
            label.numpy(),
            out.shared[0].cpu().numpy(),
            2 * model.patch_size,
            names,
            colours,
            f"{sample['name']}, resized to the {crop}x{crop} crop",
            config.ignore_index,
        )
        path = write_image(out_dir / f"{sample['name']}.png", picture)
        paths.append(path)
    return paths


def validation_set(params: dict[str, Any], model: Segmenter) -> SegmentationFolder:
    """The val split at its original size (the evaluation protocol resizes per scale)."""
    return SegmentationFolder(
        params["data_root"], "val", ValTransform(model.config.mean, model.config.std)
    )


def evaluate_model(
    params: dict[str, Any],
    model: Segmenter,
    dataset: SegmentationFolder,
    scales: Sequence[float],
    flip: bool,
    num_tokens_shared: int | None = None,
    distributed: bool = False,
    progress: bool = True,
    share_threshold: float | None = None,
    tome_r: int | None = None,
    algm_threshold: float | None = None,
) -> SegmentationMetric:
    """The evaluation of the `eval_*` stages (and of the K sweep): sliding windows over the
    validation split at ``scales``, with K = ``num_tokens_shared`` (None: the model's), K
    per window from ``share_threshold``, ToMe merging ``tome_r`` tokens per block or ALGM at
    ``algm_threshold`` (either replaces the model's own merging; 0: none).

    ``distributed``: this process scores every W-th image and the confusion matrices of all
    processes are summed, so every image counts once.
    """
    device = next(model.parameters()).device
    info = dataset_info(params)
    loader = build_loader(
        dataset,
        1,
        False,
        params["num_workers"],
        0,
        drop_last=False,
        distributed=distributed,
        device=device,
    )
    with autocast(device, params["precision"]):
        return evaluate(
            lambda images: (
                model(
                    images,
                    num_tokens_shared=num_tokens_shared,
                    share_threshold=share_threshold,
                    tome_r=tome_r,
                    algm_threshold=algm_threshold,
                ).logits
            ),
            loader,
            info.num_classes,
            eval_geometry(params, info),
            device,
            scales=tuple(scales),
            flip=flip,
            progress=progress,
        )


def run_evaluation(
    params: dict[str, Any], stage: str, scales: Sequence[float], flip: bool
) -> dict[str, float]:
    """Sliding-window evaluation of the trained Segmenter on the validation split.

    With several processes each scores every W-th image and the confusion matrices are
    summed, so every image counts once; rank 0 writes the results.
    """
    eval_geometry(params, dataset_info(params))  # a window that cannot work fails before any work
    device = resolve_device(params["device"])
    context = init_distributed(device)
    model = load_segmenter(require(SEGMENTER_CHECKPOINT, "train_segmenter"), device).to(device)
    info = dataset_info(params)
    dataset = validation_set(params, model)
    metric = evaluate_model(
        params, model, dataset, scales, flip, distributed=context.enabled, progress=context.is_main
    )
    if not context.is_main:
        return metric.compute()
    reports = REPORTS / stage
    reports.mkdir(parents=True, exist_ok=True)
    with stage_run(stage, params):
        results = {
            **metric.compute(),
            "num_tokens_shared": model.num_tokens_shared,
            "policy": model.config.policy,
            "tome_r": model.config.tome_r,
            "algm_threshold": model.config.algm_threshold,
            "scales": list(scales),
            "flip": flip,
        }
        table = per_class_table(metric, list(info.class_names))
        write_csv(METRICS / f"per_class_iou_{stage.split('_')[1]}.csv", table)
        confusion_matrix_image(
            metric.confusion.cpu().numpy(), info.class_names, reports / "confusion_matrix.png"
        )
        pictures = write_pictures(model, dataset, reports, device, info.class_names)
        write_json(METRICS / f"{stage}.json", results)
        log_metrics_file(METRICS / f"{stage}.json", settings=STAGE_SETTINGS[stage])
        if active_run() is not None:
            log_artifact(str(METRICS / f"per_class_iou_{stage.split('_')[1]}.csv"))
            log_artifact(str(reports / "confusion_matrix.png"), artifact_path=stage)
            for path in pictures:
                log_artifact(str(path), artifact_path=f"{stage}/predictions")
    print(
        f"{stage}: mIoU {results['mIoU']:.2f}  pixel acc {results['pixel_acc']:.2f}  "
        f"mean acc {results['mean_acc']:.2f}"
    )
    return results
