"""The batches that are timed: random images (the table) or validation images (the stages)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cts.data.folder import SegmentationFolder
from cts.data.transforms import ValTransform
from cts.models import Segmenter


def random_images(batch_size: int, image_size: int, device: torch.device, seed: int) -> Tensor:
    """``(B, 3, size, size)`` standard normal images, the same for a seed on every device."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return images.to(device)


def validation_batch(data_root: str | Path, model: Segmenter, batch_size: int) -> Tensor:
    """``(B, 3, crop, crop)``: the first validation images resized to the crop size,
    repeated in turn when the split holds fewer than ``batch_size``."""
    transform = ValTransform(model.config.mean, model.config.std)
    dataset = SegmentationFolder(data_root, "val", transform)
    if len(dataset) == 0:
        raise ValueError(f"{data_root}: the val split holds no image")
    crop = model.config.crop_size
    images = []
    for i in range(min(batch_size, len(dataset))):
        image = dataset[i]["image"].unsqueeze(0)
        images.append(F.interpolate(image, size=(crop, crop), mode="bilinear", align_corners=False))
    batch = torch.cat(images)
    return batch.repeat(-(-batch_size // len(images)), 1, 1, 1)[:batch_size]
