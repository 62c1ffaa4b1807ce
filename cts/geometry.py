"""Token geometry in one place: the superpatch grid, token counts and the paper's K.

Patch size ``p``, image ``H x W`` (a crop ``C x C``), superpatch ``2p x 2p`` pixels:

- patch tokens ``N = (H/p) * (W/p)``; superpatches ``S = N / 4``, the most that can share;
- with ``K`` shared superpatches the encoder sees ``N - 3K`` tokens (one token, not four);
- the paper's K removes about 30% of the tokens: ``ceil(N / 10)``;
- in threshold mode an image's K is a multiple of ``S / 16``.

A backbone's patch size comes from the backbone itself
(:func:`cts.models.vit.backbone_patch_size`), never from its name.
"""

from __future__ import annotations

import math

SUPERPATCH_SIDE = 2  # patches per side of a superpatch


def superpatch_size(patch_size: int) -> int:
    """Side of a superpatch in pixels: ``2p``."""
    return SUPERPATCH_SIDE * patch_size


def superpatch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Superpatch grid ``(hs, ws)`` of an image; raises if it does not tile exactly."""
    side = superpatch_size(patch_size)
    if height % side or width % side:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the superpatch size {side} "
            f"(2 x patch size {patch_size}); pad it first"
        )
    return height // side, width // side


def num_superpatches(crop_size: int, patch_size: int) -> int:
    """S for a square crop; raises if the crop does not tile into superpatches."""
    hs, ws = superpatch_grid(crop_size, crop_size, patch_size)
    return hs * ws


def num_patches(crop_size: int, patch_size: int) -> int:
    """N: patch tokens of a square crop without sharing, ``(C / p)^2``."""
    return (crop_size // patch_size) ** 2


def tokens_kept(num_patch_tokens: int, num_tokens_shared: int) -> int:
    """Tokens the encoder processes with K shared superpatches: ``N - 3K``."""
    return num_patch_tokens - (SUPERPATCH_SIDE**2 - 1) * num_tokens_shared


def paper_num_shared(crop_size: int, patch_size: int) -> int:
    """K of the paper's 30% token reduction: ``ceil(N / 10)`` (103 at 512/16, 90 at 480,
    160 at 640)."""
    return math.ceil(num_patches(crop_size, patch_size) / 10)


def threshold_step(num_superpatches: int) -> int:
    """Granularity of a per-image K in threshold mode: ``S / 16`` superpatches (16 at a
    512 crop with /16 patches), so a batch holds at most 17 token counts (kernel shapes)."""
    return max(1, num_superpatches // 16)


def check_num_shared(num_tokens_shared: int, num_superpatches: int, what: str = "") -> None:
    """Raise a ValueError naming the allowed range unless ``0 <= K <= S``."""
    if not 0 <= num_tokens_shared <= num_superpatches:
        where = f" for {what}" if what else ""
        raise ValueError(
            f"num_tokens_shared={num_tokens_shared} is out of range{where}: allowed 0.."
            f"{num_superpatches} (the number of 2x2 superpatches)"
        )
