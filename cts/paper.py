"""The paper's settings: the six rows of the authors' results table (tue-mps/cts-segmenter
README; Lu et al., CVPR 2023): dataset, backbone, crop and K of each.

One source for these numbers: ``cts throughput`` measures rows of it (:mod:`cts.throughput`)
and ``cts config`` writes a params file for each (``stages/config.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# The paper's backbones are all /16 (timm ``vit_*_patch16_384``).
PATCH_SIZE = 16

DATASET_LABELS = {
    "ade20k": "ADE20K",
    "pascal_context": "Pascal-Context",
    "cityscapes": "Cityscapes",
}
BACKBONE_LABELS = {
    "vit_tiny_patch16_384": "ViT-Ti/16",
    "vit_small_patch16_384": "ViT-S/16",
    "vit_base_patch16_384": "ViT-B/16",
    "vit_large_patch16_384": "ViT-L/16",
}


@dataclass(frozen=True)
class PaperSetting:
    """One row of the table: Segmenter (mask transformer) + CTS with the policy net.

    ``base_size`` (short side at scale 1) and ``window`` (sliding-window size): None where
    the row uses its dataset's; the authors train and evaluate ViT-L on ADE20K at 640
    (``--im-size 640 --crop-size 640 --window-size 640``; the stride stays 512).
    """

    name: str
    dataset: str
    backbone: str
    crop_size: int
    num_tokens_shared: int
    base_size: int | None = None
    window: int | None = None

    @property
    def label(self) -> str:
        """``ViT-S/16 512``."""
        return f"{BACKBONE_LABELS[self.backbone]} {self.crop_size}"

    @property
    def dataset_label(self) -> str:
        return DATASET_LABELS[self.dataset]

    @property
    def patch_tokens(self) -> int:
        """N: patch tokens without sharing, ``(crop / 16)^2``."""
        return (self.crop_size // PATCH_SIZE) ** 2

    @property
    def superpatches(self) -> int:
        """S: superpatches of 2x2 patches, the most that can share (K <= S)."""
        return (self.crop_size // (2 * PATCH_SIZE)) ** 2

    @property
    def tokens(self) -> int:
        """Tokens the encoder processes with K shared superpatches: ``N - 3K``."""
        return self.patch_tokens - 3 * self.num_tokens_shared

    @property
    def reduction(self) -> float:
        """Fraction of tokens removed: ``3K / N`` (0.30 for 30%)."""
        return 3 * self.num_tokens_shared / self.patch_tokens

    @property
    def num_classes(self) -> int:
        """Classes of the row's dataset (from its preparation module, :mod:`cts.data`)."""
        module = importlib.import_module(f"cts.data.{self.dataset}")
        return module.dataset_info().num_classes


PAPER_SETTINGS = (
    PaperSetting("ade20k-vit-ti", "ade20k", "vit_tiny_patch16_384", 512, 103),
    PaperSetting("ade20k-vit-s", "ade20k", "vit_small_patch16_384", 512, 103),
    PaperSetting("ade20k-vit-b", "ade20k", "vit_base_patch16_384", 512, 103),
    PaperSetting(
        "ade20k-vit-l-640", "ade20k", "vit_large_patch16_384", 640, 160, base_size=640, window=640
    ),
    PaperSetting("pascal-context-vit-s", "pascal_context", "vit_small_patch16_384", 480, 90),
    PaperSetting("cityscapes-vit-s", "cityscapes", "vit_small_patch16_384", 768, 336),
)


def paper_setting(name: str) -> PaperSetting:
    """The row called ``name``; a ValueError that lists the names otherwise."""
    for setting in PAPER_SETTINGS:
        if setting.name == name:
            return setting
    names = ", ".join(s.name for s in PAPER_SETTINGS)
    raise ValueError(f"unknown paper setting {name!r}: use one of {names}")


__all__ = ["PAPER_SETTINGS", "PATCH_SIZE", "PaperSetting", "paper_setting"]
