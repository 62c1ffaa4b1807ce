"""Training loss of the segmenter: cross-entropy of the upsampled scores on a pixel subgrid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cts.sharing import IGNORE_INDEX


def subgrid_points(size: int, stride: int, offset: int, device: torch.device) -> Tensor:
    """Normalised ``[-1, 1]`` centres (``align_corners=False``) of pixels ``offset::stride``
    of a ``size``-pixel axis, ``(ceil((size - offset) / stride),)``."""
    pixels = torch.arange(offset, size, stride, device=device, dtype=torch.float32)
    return (2 * pixels + 1) / size - 1


def upsample_at(scores: Tensor, size: tuple[int, int], stride: int, offset: tuple[int, int]):
    """Bilinear upsampling of ``scores`` ``(B, C, h, w)`` to ``size`` (``align_corners=False``,
    as :func:`torch.nn.functional.interpolate`), evaluated only at the pixels
    ``[offset[0]::stride, offset[1]::stride]``: ``(B, C, ceil(H / s), ceil(W / s))``.

    Equals ``F.interpolate(scores, size, mode="bilinear")[..., oy::s, ox::s]`` without
    computing (or back-propagating through) the other ``s^2 - 1`` of every ``s^2`` pixels.
    """
    ys = subgrid_points(size[0], stride, offset[0], scores.device)
    xs = subgrid_points(size[1], stride, offset[1], scores.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h', w', 2) as (x, y)
    grid = grid.to(scores.dtype).expand(scores.shape[0], -1, -1, -1)
    # Border padding clamps source coordinates to the edge pixels, as interpolate does.
    return F.grid_sample(scores, grid, mode="bilinear", padding_mode="border", align_corners=False)


def subgrid_cross_entropy(
    scores: Tensor,
    labels: Tensor,
    stride: int = 1,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the scores bilinearly upsampled to the labels' resolution, on the
    pixels of a stride-``stride`` subgrid at a random offset.

    With ``stride`` 1 this is the full-resolution loss. A larger stride evaluates ``1 /
    stride^2`` of the pixels; the offset, drawn anew at each call, makes it an unbiased
    estimate of the full-resolution loss of labelled pixels at a fraction of the cost of
    upsampling the scores of every pixel, its softmax and their backward pass.

    Args:
        scores: ``(B, C, h, w)`` class scores on the patch grid (any float dtype).
        labels: ``(B, H, W)`` int64 class ids at the resolution the scores upsample to.
        stride: subgrid step in pixels (1: every pixel).
        generator: draws the offset (None: the global generator).
        ignore_index: label of unlabelled pixels.
        weight: ``(C,)`` class weights, as in :func:`torch.nn.functional.cross_entropy`.
        reduction: ``mean`` or ``sum`` over the sampled pixels, as in ``cross_entropy``.
    """
    if stride < 1:
        raise ValueError(f"loss stride={stride}: must be >= 1")
    size = (labels.shape[-2], labels.shape[-1])
    if stride == 1:
        offset = (0, 0)
    else:
        drawn = torch.randint(0, stride, (2,), generator=generator)
        offset = (int(drawn[0]), int(drawn[1]))
    logits = upsample_at(scores.float(), size, stride, offset)
    target = labels[:, offset[0] :: stride, offset[1] :: stride]
    return F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction
    )


def class_weights(frequencies: Tensor, power: float) -> Tensor:
    """Cross-entropy class weights ``frequency ** -power``, scaled so that the weighted mean
    over the pixel distribution is 1 (the loss keeps its scale; 0: every class 1.0).

    Classes that never occur get the largest weight of the others.

    Args:
        frequencies: ``(C,)`` share of the labelled pixels per class.
        power: 0 unweighted, 0.5 inverse square root of the frequency, 1 inverse frequency.
    """
    frequencies = frequencies.double()
    present = frequencies > 0
    if not present.any():
        raise ValueError("class frequencies are all zero: no labelled pixel")
    weights = torch.zeros_like(frequencies)
    weights[present] = frequencies[present] ** -power
    weights[~present] = weights[present].max()
    weights /= (weights * frequencies).sum() / frequencies.sum()
    return weights.float()
