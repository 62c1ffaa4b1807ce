"""Segmenter-style evaluation: sliding-window, multi-scale and flip inference.

The model is any callable mapping normalised images (B, 3, h, w) to class logits
(B, C, h, w) at the input resolution. Within one scale, overlapping windows average
their logits, as Segmenter does; across scales and flips the softmax probabilities are
averaged (Segmenter's multi-scale evaluation).
"""

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cts.metrics import SegmentationMetric
from cts.progress import progress_bar

Model = Callable[[Tensor], Tensor]


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets on a regular grid, the last one moved back to end at the border."""
    count = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(count)]


def sliding_window_logits(
    model: Model,
    images: Tensor,
    num_classes: int,
    window: int,
    stride: int,
    batch_size: int | None = None,
) -> Tensor:
    """Logits of (B, 3, H, W) images from (window x window) crops: (B, C, H, W) float32.

    Images smaller than the window are zero-padded bottom/right (zero is the mean after
    normalisation) and the result cropped back. The crops of all B images for a window are
    forwarded together; `batch_size` caps the crops per forward (rounded down to whole
    windows, at least one window), None forwards every window at once.
    """
    b, _, h, w = images.shape
    images = F.pad(images, (0, max(window - w, 0), 0, max(window - h, 0)))
    padded_h, padded_w = images.shape[-2:]
    windows = [
        (y, x)
        for y in _window_starts(padded_h, window, stride)
        for x in _window_starts(padded_w, window, stride)
    ]
    per_forward = len(windows) if batch_size is None else max(batch_size // b, 1)

    # float32 accumulators: summing many bf16 logits would lose precision.
    logits = images.new_zeros(b, num_classes, padded_h, padded_w, dtype=torch.float32)
    count = images.new_zeros(padded_h, padded_w, dtype=torch.float32)
    for start in range(0, len(windows), per_forward):
        group = windows[start : start + per_forward]
        crops = torch.cat([images[..., y : y + window, x : x + window] for y, x in group])
        outputs = model(crops).split(b)
        for (y, x), output in zip(group, outputs, strict=True):
            logits[..., y : y + window, x : x + window] += output
            count[y : y + window, x : x + window] += 1
    return logits[..., :h, :w] / count[:h, :w]


def resize_to_short_side(images: Tensor, short_side: int) -> Tensor:
    """Bilinearly resizes (B, C, H, W) images so that min(H, W) == short_side."""
    h, w = images.shape[-2:]
    scale = short_side / min(h, w)
    size = (round(h * scale), round(w * scale))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def predict_logits(
    model: Model,
    image: Tensor,
    num_classes: int,
    short_side: int,
    window: int,
    stride: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Class scores of normalised (B, 3, H0, W0) images: (B, C, *out_size) probabilities.

    For each scale the image is resized to a short side of short_side * scale and run
    through `sliding_window_logits`; with `flip` its mirror image goes through the same
    forwards and its logits are mirrored back. The logits are upsampled to `out_size`
    (default (H0, W0)) before the softmax, as mmseg/Segmenter do, and the probabilities
    averaged over scales and flips. Single-scale evaluation is scales=(1.0,), flip=False.
    """
    b = image.shape[0]
    out_size = out_size or tuple(image.shape[-2:])
    probs = image.new_zeros(b, num_classes, *out_size, dtype=torch.float32)
    for scale in scales:
        resized = resize_to_short_side(image, round(short_side * scale))
        if flip:
            resized = torch.cat([resized, resized.flip(-1)])
        logits = sliding_window_logits(model, resized, num_classes, window, stride, batch_size)
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        scale_probs = logits.softmax(1)
        if flip:
            scale_probs = scale_probs[:b] + scale_probs[b:].flip(-1)
        probs += scale_probs
    return probs / (len(scales) * (2 if flip else 1))


@torch.inference_mode()
def evaluate(
    model: Model,
    loader: Iterable[dict],
    num_classes: int,
    short_side: int,
    window: int,
    stride: int,
    device: torch.device | str,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int | None = None,
    ignore_index: int = 255,
    progress: bool = True,
) -> SegmentationMetric:
    """Evaluates `model` on batches {"image": (B, 3, H, W), "label": (B, H, W)}.

    Images come normalised at their original size; predictions are scored at the label
    resolution. An nn.Module model is put in eval mode. Validation images differ in size,
    so the val loader is meant to use batch_size 1; a batch may also hold lists of
    (3, H, W) images and (H, W) labels, which are evaluated one by one. `batch_size` caps
    crops per forward (see `sliding_window_logits`). The returned metric is already summed
    over processes.
    """
    if isinstance(model, nn.Module):
        model.eval()
    metric = SegmentationMetric(num_classes, ignore_index, device)
    total = len(loader) if hasattr(loader, "__len__") else None
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("eval", total=total, status="")
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            if isinstance(images, Tensor):
                pairs = [(images, labels)]
            else:
                images, labels = [x[None] for x in images], [y[None] for y in labels]
                pairs = zip(images, labels, strict=True)
            for image, label in pairs:
                label = label.to(device, torch.int64, non_blocking=True)
                probs = predict_logits(
                    model,
                    image.to(device, non_blocking=True),
                    num_classes,
                    short_side,
                    window,
                    stride,
                    scales,
                    flip,
                    out_size=tuple(label.shape[-2:]),
                    batch_size=batch_size,
                )
                metric.update(probs.argmax(1), label)
            bar.advance(task)
    metric.reduce_distributed()
    return metric
