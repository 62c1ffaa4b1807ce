"""Segmenter-style evaluation: the test-time protocol of the CTS / Segmenter authors.

The model is any callable mapping normalised images (B, 3, h, w) to class logits
(B, C, h, w) at the input resolution. For one image of size (H0, W0) and each scale ratio r
(single scale: r = 1; the paper's multi-scale: 0.5 ... 1.75, each with its mirror image),
as mmsegmentation 0.x's ``MultiScaleFlipAug`` + keep-ratio ``Resize`` and Segmenter's
``inference`` do:

1. the original image is resized to the largest size within
   ``(max_ratio * base_size * r, base_size * r)`` (long, short), rounding half up;
2. an image whose short side is below the window is upsampled to a short side of exactly
   the window (the low scales are not zero-padded);
3. windows slide with the stride, the last one moved back to the border, and overlapping
   logits are averaged;
4. the logits are resized to (H0, W0), mirrored back, turned into probabilities, and the
   probabilities averaged over scales and flips.

The model may also return its logits on a coarser grid that covers the window exactly
(a Segmenter's scores on its patch grid, ``upsample=False``): each window's output is then
upsampled to the window as the model would. Labels (:func:`predict_labels`, what
:func:`evaluate` scores) of a single scale without flip need no probabilities (the softmax
keeps the argmax), so the last resize and the argmax are one step
(:func:`cts.models.upsample.upsample_argmax`), which for an image that one window covers at
the label size and a coarse output never writes the full-resolution logits. Several scales
or flips average probabilities, which the softmax makes non-linear in the logits: those are
computed at the label size, scale after scale, as the authors do.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cts.data.transforms import keep_ratio_size
from cts.metrics import SegmentationMetric
from cts.models.upsample import argmax_classes, upsample_argmax
from cts.progress import progress_bar

Model = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class EvalGeometry:
    """Sizes of the test-time protocol.

    Attributes:
        base_size: short side of an image at scale ratio 1.
        max_ratio: the long side is capped at ``max_ratio * base_size`` (times the ratio).
        window: side of the square sliding window (the training crop).
        stride: step between windows, at most ``window``.
    """

    base_size: int
    window: int
    stride: int
    max_ratio: float = 4

    def __post_init__(self) -> None:
        for name in ("base_size", "window", "stride", "max_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.stride > self.window:
            raise ValueError(
                f"stride {self.stride} is larger than window {self.window}: pixels between "
                "windows would never be scored"
            )


def scaled_size(height: int, width: int, geometry: EvalGeometry, ratio: float) -> tuple[int, int]:
    """Size of an ``(height, width)`` image at scale ``ratio`` (step 1 of the protocol): the
    keep-ratio resize that training's random rescale uses too."""
    return keep_ratio_size(height, width, geometry.base_size, ratio, geometry.max_ratio)


def window_fitting_size(height: int, width: int, window: int) -> tuple[int, int]:
    """Size after step 2: unchanged when the short side reaches the window, else the short
    side becomes the window and the long side ``int(window * long / short)``."""
    if min(height, width) >= window:
        return height, width
    if height < width:
        return window, int(width / height * window)
    return int(height / width * window), window


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

    H and W must be at least the window (see `window_fitting_size`). The crops of all B
    images for a window are forwarded together; `batch_size` caps the crops per forward
    (rounded down to whole windows, at least one window), None forwards every window at once.
    A model output on a coarser grid (module docstring) is upsampled to the window.
    """
    b, _, h, w = images.shape
    if min(h, w) < window:
        raise ValueError(f"image {h}x{w} is smaller than the {window}x{window} window")
    if stride > window:
        raise ValueError(f"stride {stride} is larger than window {window}")
    windows = [
        (y, x) for y in _window_starts(h, window, stride) for x in _window_starts(w, window, stride)
    ]
    per_forward = len(windows) if batch_size is None else max(batch_size // b, 1)

    # float32 accumulators: summing many bf16 logits would lose precision.
    logits = images.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = images.new_zeros(h, w, dtype=torch.float32)
    for start in range(0, len(windows), per_forward):
        group = windows[start : start + per_forward]
        crops = torch.cat([images[..., y : y + window, x : x + window] for y, x in group])
        outputs = _window_logits(model(crops), window).split(b)
        for (y, x), output in zip(group, outputs, strict=True):
            logits[..., y : y + window, x : x + window] += output
            count[y : y + window, x : x + window] += 1
    return logits / count


def _check_grid(output: Tensor, window: int) -> None:
    if any(window % side for side in output.shape[-2:]):
        raise ValueError(
            f"model output {tuple(output.shape[-2:])} is neither the {window}x{window} window "
            "nor a grid that divides it"
        )


def _window_logits(output: Tensor, window: int) -> Tensor:
    """A window's logits at the window size: a coarse output upsampled as the model would."""
    if tuple(output.shape[-2:]) == (window, window):
        return output
    _check_grid(output, window)
    with torch.autocast(output.device.type, enabled=False):
        return F.interpolate(
            output.float(), size=(window, window), mode="bilinear", align_corners=False
        )


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def predict_logits(
    model: Model,
    image: Tensor,
    num_classes: int,
    geometry: EvalGeometry,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Class probabilities of normalised (B, 3, H0, W0) images at their original size:
    (B, C, *out_size) float32 (default out_size (H0, W0)), by the protocol in the module
    docstring. Single-scale evaluation is scales=(1.0,), flip=False.
    """
    b, _, height, width = image.shape
    out_size = out_size or (height, width)
    probs = image.new_zeros(b, num_classes, *out_size, dtype=torch.float32)
    for ratio in scales:
        resized = _scaled_input(image, geometry, ratio)
        if flip:
            resized = torch.cat([resized, resized.flip(-1)])
        logits = sliding_window_logits(
            model, resized, num_classes, geometry.window, geometry.stride, batch_size
        )
        scale_probs = _resize(logits, out_size).softmax(1)
        if flip:
            scale_probs = scale_probs[:b] + scale_probs[b:].flip(-1)
        probs += scale_probs
    return probs / (len(scales) * (2 if flip else 1))


def normalised_resize(
    rgb: Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """A ``(H0, W0, 3)`` uint8 RGB image resized (bilinear) to ``size`` and normalised:
    ``(1, 3, *size)`` float32 on the image's device.

    The values of normalising the whole image, then resizing it (both are affine per
    channel; equal up to float rounding), but each channel is resized from uint8 on its own
    and normalised after: a 6000 x 6000 photo never exists as full-size float32 (432 MB, and
    as much again per temporary).
    """
    channels = [_resize(rgb[None, None, ..., c].float(), size) for c in range(rgb.shape[-1])]
    image = torch.cat(channels, 1) / 255
    mean_ = torch.tensor(mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    std_ = torch.tensor(std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    return (image - mean_) / std_


def scaled_image(
    rgb: Tensor,
    geometry: EvalGeometry,
    mean: Sequence[float],
    std: Sequence[float],
    ratio: float = 1.0,
) -> Tensor:
    """A ``(H0, W0, 3)`` uint8 RGB image at scale ``ratio`` (step 1 of the protocol),
    normalised (:func:`normalised_resize`): ``(1, 3, h, w)``. Step 1 applied again leaves
    it unchanged, so :func:`predict_labels` takes it (with ``out_size=(H0, W0)``) as it
    takes the normalised original."""
    size = scaled_size(*rgb.shape[:2], geometry, ratio)
    return normalised_resize(rgb, size, mean, std)


def _scaled_input(image: Tensor, geometry: EvalGeometry, ratio: float) -> Tensor:
    """Steps 1 and 2 of the protocol: the image at scale ``ratio``, fitted to the window."""
    resized = _resize(image, scaled_size(*image.shape[-2:], geometry, ratio))
    return _resize(resized, window_fitting_size(*resized.shape[-2:], geometry.window))


def predict_labels(
    model: Model,
    image: Tensor,
    num_classes: int,
    geometry: EvalGeometry,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Labels (B, *out_size) int64 of normalised (B, 3, H0, W0) images: the argmax of
    :func:`predict_logits`' probabilities (up to ties).

    Single scale without flip: the argmax of the window logits resized to ``out_size``
    (no softmax, no probabilities); when one window covers the image at ``out_size`` and the
    model's output is coarse, ``upsample_argmax`` of that output, which never writes the
    full-resolution logits. Otherwise the probabilities are averaged as in
    :func:`predict_logits` and their argmax taken with the faster kernel.
    """
    height, width = image.shape[-2:]
    out_size = out_size or (height, width)
    if len(scales) != 1 or flip:
        probs = predict_logits(
            model, image, num_classes, geometry, scales, flip, out_size, batch_size
        )
        return argmax_classes(probs)
    resized = _scaled_input(image, geometry, scales[0])
    window = geometry.window
    if tuple(resized.shape[-2:]) == (window, window) == tuple(out_size):
        output = model(resized)
        if tuple(output.shape[-2:]) != (window, window):
            _check_grid(output, window)
        return upsample_argmax(output, (window, window))
    logits = sliding_window_logits(model, resized, num_classes, window, geometry.stride, batch_size)
    return upsample_argmax(logits, out_size)


@torch.inference_mode()
def evaluate(
    model: Model,
    loader: Iterable[dict],
    num_classes: int,
    geometry: EvalGeometry,
    device: torch.device | str,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int | None = None,
    ignore_index: int = 255,
    progress: bool = True,
) -> SegmentationMetric:
    """Evaluates `model` on batches {"image": (B, 3, H, W), "label": (B, H, W)}.

    Images come normalised at their original size (the protocol resizes them per scale);
    predictions are scored at the label resolution. An nn.Module model is put in eval mode.
    Validation images differ in size, so the val loader is meant to use batch_size 1; a
    batch may also hold lists of (3, H, W) images and (H, W) labels, which are evaluated
    one by one. `batch_size` caps crops per forward (see `sliding_window_logits`). The
    returned metric is already summed over processes.
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
                prediction = predict_labels(
                    model,
                    image.to(device, non_blocking=True),
                    num_classes,
                    geometry,
                    scales,
                    flip,
                    out_size=tuple(label.shape[-2:]),
                    batch_size=batch_size,
                )
                metric.update(prediction, label)
            bar.advance(task)
    metric.reduce_distributed()
    return metric
