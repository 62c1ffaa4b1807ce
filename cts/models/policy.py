"""The policy network: which superpatches may share a token."""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cts.models.pretrained import check_hub_weights, load_backbone_weights

BACKBONE = "efficientnet_lite0"
# efficientnet_lite0 feature levels by stride: (level index, channels).
_LEVELS = {8: (2, 40), 16: (3, 112), 32: (4, 320)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PolicyNet(nn.Module):
    """EfficientNet-Lite0 features + 1x1 conv: 2 logits (not uniform / uniform) per cell.

    Args:
        pretrained: load timm's ImageNet weights for the backbone.
        feature_stride: feature level used (32 as in the paper; 16 lets a half-size input
            give the same grid at a quarter of the cost).
        input_scale: the image is resized by this factor before the backbone (1.0: paper).
        input_mean, input_std: normalisation of the images the segmenter receives; they are
            re-normalised to ImageNet statistics, which the backbone was trained with.
        pretrained_path: local weights file for the backbone (a timm efficientnet_lite0
            state dict, .pth/.safetensors) instead of the hub; implies ``pretrained``.
    """

    def __init__(
        self,
        pretrained: bool = False,
        feature_stride: int = 32,
        input_scale: float = 1.0,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
        pretrained_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if feature_stride not in _LEVELS:
            raise ValueError(f"policy feature_stride={feature_stride}: allowed {sorted(_LEVELS)}")
        if not 0.0 < input_scale <= 1.0:
            raise ValueError(f"policy input_scale={input_scale}: allowed (0, 1]")
        level, channels = _LEVELS[feature_stride]
        self.feature_stride = feature_stride
        self.input_scale = input_scale
        from_hub = pretrained and pretrained_path is None
        if from_hub:
            check_hub_weights([(BACKBONE, "policy_pretrained_path")])
        self.backbone = timm.create_model(
            BACKBONE, pretrained=from_hub, features_only=True, out_indices=(level,)
        )
        # timm's features_only net still runs every stage; those past the level used would
        # cost a third of a stride-16 forward for nothing.
        self.num_blocks = int(self.backbone.feature_info.module_name()[0].split(".")[1]) + 1
        del self.backbone.blocks[self.num_blocks :]
        self._register_load_state_dict_pre_hook(self._drop_unused_blocks)
        if pretrained_path is not None:
            load_backbone_weights(self.backbone, pretrained_path, BACKBONE)
        self.head = nn.Conv2d(channels, 2, kernel_size=1)
        # Depthwise and 1x1 convolutions run markedly faster in NHWC (cuDNN, oneDNN).
        self.to(memory_format=torch.channels_last)
        in_mean, in_std = torch.tensor(input_mean), torch.tensor(input_std)
        net_mean, net_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("in_scale", (in_std / net_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "in_shift", ((in_mean - net_mean) / net_std).view(1, 3, 1, 1), persistent=False
        )

    def _drop_unused_blocks(self, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoints written before the unused stages were dropped still load."""
        blocks = f"{prefix}backbone.blocks."
        for key in [k for k in state_dict if k.startswith(blocks)]:
            if int(key[len(blocks) :].split(".")[0]) >= self.num_blocks:
                del state_dict[key]

    def forward(self, images: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """``(B, 3, H, W) -> (B, 2, hs, ws)`` logits, resampled to ``grid`` when given.

        With a ``grid`` of superpatches other than 32 px (a /14 ViT's are 28 px), the image
        is first resized so that each superpatch spans ``32 * input_scale`` px, as a /16
        ViT's does: the feature grid then falls on the superpatch grid cell for cell
        (read at 32 px cells, 28 px superpatches drift 4 px further off with every cell).
        """
        # Resized before it is re-normalised (both are per-channel linear): the full-size
        # image is read once.
        x = images
        if grid is not None and tuple(images.shape[-2:]) != (32 * grid[0], 32 * grid[1]):
            size = (round(32 * self.input_scale * grid[0]), round(32 * self.input_scale * grid[1]))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        elif self.input_scale != 1.0:
            x = F.interpolate(
                x, scale_factor=self.input_scale, mode="bilinear", align_corners=False
            )
        x = (x * self.in_scale + self.in_shift).contiguous(memory_format=torch.channels_last)
        logits = self.head(self.backbone(x)[-1])
        if grid is not None and tuple(logits.shape[-2:]) != tuple(grid):
            logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
        return logits

    def share_scores(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Log-odds that each superpatch is uniform, ``(B, S)``: the uniform logit minus the
        other. It ranks as the probability does but never saturates: past a margin of ~17
        the fp32 softmax is exactly 1.0, and a confident policy's surest superpatches would
        tie with the merely sure ones."""
        logits = self(images, grid).float()
        return (logits[:, 1] - logits[:, 0]).flatten(1)
