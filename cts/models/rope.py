"""Rotary position embeddings for shared tokens: a superpatch token rotates at its centre.

timm's rotary ViTs (EVA-02, ``vit_*_rope_*``, DINOv3) compute each patch's rotary
embedding from continuous coordinates: an affine function of the patch's row and column
(``index``, ``pixel`` or ``centered`` grids, optionally rescaled to a reference grid) times
frequencies. A shared token covers a 2x2 superpatch, so it gets the embedding at the
superpatch's centre: the mean of its four patches' coordinates (exact, the grid being
affine). Patches and centres are computed together, so a training-time coordinate
augmentation (a random shift / scale of the whole grid) moves both by the same draw.

A scheme that is not a function of continuous coordinates has no centre to ask for and is
refused by :func:`rope_refusal`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # a timm with one grid builder for every rotary class (1.0.31 is tested)
    from timm.layers.pos_embed_sincos import (
        RotaryEmbeddingCat,
        RotaryEmbeddingDinoV3,
        RotaryEmbeddingMixed,
        _apply_coord_augs,
        _build_grid,
        _freq_buffer_dtype,
        _rope_layout,
        get_mixed_freqs,
    )

    SUPPORTED_ROPES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed)
except ImportError:  # an older timm: rotary backbones are refused, the others still work
    SUPPORTED_ROPES = ()


def rope_refusal(rope: nn.Module) -> str | None:
    """Why sharing cannot serve this rotary embedding, or None when it can."""
    name = type(rope).__name__
    if not SUPPORTED_ROPES:
        return f"rotary position embedding ({name}) needs a newer timm for sharing"
    if not isinstance(rope, SUPPORTED_ROPES):
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_ROPES)
        return (
            f"rotary position embedding {name} is not one of {supported}: its angles are not "
            "known to be a function of continuous patch coordinates, so a shared token has no "
            "superpatch centre to rotate at"
        )
    return None


def _patch_coordinates(rope: nn.Module, grid: tuple[int, int]) -> Tensor:
    """``(h, w, 2)`` float32 coordinates timm's ``rope.get_embed(shape=grid)`` uses."""
    if isinstance(rope, RotaryEmbeddingDinoV3):
        # Built on the CPU as timm does (its numerics and the augmentation's RNG device).
        return _build_grid(
            list(grid),
            grid_type="centered",
            grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing,
            normalize_coords=rope.normalize_coords,
            ndim=2,
        )
    if isinstance(rope, RotaryEmbeddingMixed):
        return _build_grid(
            list(grid), grid_indexing=rope.grid_indexing, device=rope.freqs.device, ndim=2
        )
    return _build_grid(
        list(grid),
        grid_type=rope.grid_type,
        ref_feat_shape=rope.ref_feat_shape,
        grid_offset=rope.grid_offset,
        grid_indexing=rope.grid_indexing,
        normalize_coords=rope.normalize_coords,
        device=rope.bands.device,
    )


def _augmented(rope: nn.Module, points: Tensor) -> Tensor:
    """timm's training-time coordinate augmentation, one draw for all ``points``."""
    if rope.training and getattr(rope, "aug_active", False):
        return _apply_coord_augs(
            points.float(), rope.shift_coords, rope.jitter_coords, rope.rescale_coords
        )
    return points


def _embed_points(rope: nn.Module, points: Tensor) -> Tensor:
    """Rotary embedding (concatenated sin, cos) at ``points`` ``(M, 2)``, as timm computes
    it from its grid: ``(M, D)``, or ``(depth, heads, M, D)`` for the mixed (learned
    frequency) embedding."""
    augmented = rope.training and getattr(rope, "aug_active", False)
    if isinstance(rope, RotaryEmbeddingDinoV3):
        return torch.cat(rope._get_pos_embed_from_coords(points), dim=-1)
    if isinstance(rope, RotaryEmbeddingMixed):
        dtype = _freq_buffer_dtype(rope.freqs.dtype) if augmented else None
        return get_mixed_freqs(rope.freqs, points[:, 0], points[:, 1], dtype=dtype)
    # RotaryEmbeddingCat: build_fourier_pos_embed + build_rotary_pos_embed on the points.
    dtype = rope.bands.dtype if augmented else torch.float32
    angles = points.unsqueeze(-1) * rope.bands  # (M, 2, bands)
    sin = _rope_layout(angles.sin().to(dtype).flatten(-2), rope.rotate_half)
    cos = _rope_layout(angles.cos().to(dtype).flatten(-2), rope.rotate_half)
    return torch.cat([sin, cos], dim=-1)


def superpatch_centres(coordinates: Tensor) -> Tensor:
    """``(h, w, 2)`` patch coordinates -> ``(h/2, w/2, 2)`` superpatch centres, the mean of
    each 2x2 block (exactly the centre: the coordinates are affine in row and column)."""
    return F.avg_pool2d(coordinates.permute(2, 0, 1), 2).permute(1, 2, 0)


def rope_table(rope: nn.Module, grid: tuple[int, int]) -> Tensor:
    """Rotary embeddings of every patch, then of every superpatch centre.

    Args:
        rope: the ViT's rotary module (a supported type, see :func:`rope_refusal`).
        grid: patch grid ``(h, w)``, both even.

    Returns:
        ``(..., N + S, D)``: rows ``0..N-1`` the patches in raster order (what
        ``rope.get_embed(shape=grid)`` gives), rows ``N..N+S-1`` the superpatch centres in
        raster order; leading ``(depth, heads)`` dims for the mixed embedding.
    """
    coordinates = _patch_coordinates(rope, grid).float()
    points = torch.cat([coordinates.reshape(-1, 2), superpatch_centres(coordinates).reshape(-1, 2)])
    return _embed_points(rope, _augmented(rope, points))


def gather_rope(table: Tensor, index: Tensor) -> Tensor:
    """Each image's rows of a rotary table, in the layout timm's attention broadcasts.

    Args:
        table: ``(N + S, D)`` or ``(heads, N + S, D)`` (one block of the mixed embedding).
        index: ``(B, T)`` rows of ``table`` per image.

    Returns:
        ``(B, 1, T, D)`` or ``(B, heads, T, D)``.
    """
    if table.dim() == 2:
        return table[index].unsqueeze(1)
    return table[:, index].transpose(0, 1)
