"""Content-aware token sharing: policy targets, selection, sharing and unsharing.

Grid vocabulary used throughout (patch size ``p``, image ``H x W`` padded to multiples of 2p):

- patch grid ``(h, w) = (H/p, W/p)``, ``N = h * w`` patch tokens, raster order;
- superpatch grid ``(hs, ws) = (h/2, w/2)``, ``S = hs * ws`` superpatches of 2x2 patches;
- ``K`` superpatches share one token each, so an image ends with ``N - 3K`` tokens: the
  ``N - 4K`` not-shared patch tokens first (in raster order), then the ``K`` shared ones.

Every op here has fixed output shapes given (N, K), uses only gather/scatter/sort on the
input's device and never synchronises with the host, so it batches, autocasts and compiles.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cts.geometry import check_num_shared, superpatch_grid

IGNORE_INDEX = 255


def training_num_shared(
    num_tokens_shared: int | tuple[int, int], unshared_fraction: float, seed: int, step: int
) -> int:
    """K for one training step: 0 (no sharing) with probability ``unshared_fraction``, else
    ``num_tokens_shared``, or with a ``(low, high)`` range an integer drawn uniformly from
    ``low..high`` (one model for every K in it); ``unshared_fraction`` 0 and a single K: always
    K, as the paper trains.

    The draw depends on ``(seed, step)`` alone, so every process of a distributed run and a
    resumed run use the same K at the same step. A single K keeps the kernel shapes to tune
    and cache to two; a range costs one shape per K drawn (compiled: one dynamic graph).
    """
    draw = random.Random(f"{seed}:{step}")
    if draw.random() < unshared_fraction:
        return 0
    if isinstance(num_tokens_shared, int):
        return num_tokens_shared
    low, high = num_tokens_shared
    return draw.randint(low, high)


def policy_targets(
    labels: Tensor, patch_size: int, ignore_index: int = IGNORE_INDEX, border_ignore: bool = True
) -> Tensor:
    """Per-superpatch sharing targets from label maps.

    Args:
        labels: ``(B, H, W)`` integer label maps, H and W multiples of ``2 * patch_size``
            (pad with ``ignore_index``).
        patch_size: ViT patch size p; a superpatch covers ``2p x 2p`` pixels.
        ignore_index: label value that carries no class.
        border_ignore: the border rule below (the authors' ADE20K targets); False: such a
            superpatch is 0, as in their Pascal-Context and Cityscapes targets.

    Returns:
        ``(B, hs, ws)`` int64: 1 where every pixel has the same value (all-ignore counts as
        uniform), ``ignore_index`` where the superpatch holds exactly one class plus ignore
        pixels and touches the image border (padding) when ``border_ignore``, 0 otherwise.
    """
    batch, height, width = labels.shape
    hs, ws = superpatch_grid(height, width, patch_size)
    side = 2 * patch_size
    blocks = labels.reshape(batch, hs, side, ws, side).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(batch, hs, ws, side * side).long()

    is_ignore = blocks == ignore_index
    has_ignore = is_ignore.any(-1)
    has_class = ~is_ignore.all(-1)
    largest = torch.iinfo(torch.int64).max
    class_min = blocks.masked_fill(is_ignore, largest).amin(-1)
    class_max = blocks.masked_fill(is_ignore, -1).amax(-1)
    one_class = has_class & (class_min == class_max)

    uniform = (one_class & ~has_ignore) | ~has_class
    on_border = torch.zeros(hs, ws, dtype=torch.bool, device=labels.device)
    on_border[0, :] = on_border[-1, :] = True
    on_border[:, 0] = on_border[:, -1] = True
    ambiguous = one_class & has_ignore & on_border & border_ignore

    targets = torch.zeros(batch, hs, ws, dtype=torch.int64, device=labels.device)
    targets = targets.masked_fill(ambiguous, ignore_index)
    return targets.masked_fill(uniform, 1)


def oracle_scores(labels: Tensor, patch_size: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sharing scores from ground truth, ``(B, H, W) -> (B, S)``: uniform 1, border 0.5, else 0."""
    targets = policy_targets(labels, patch_size, ignore_index).flatten(1)
    scores = (targets == 1).float()
    return scores.masked_fill(targets == ignore_index, 0.5)


def select_shared(scores: Tensor, num_shared: int) -> Tensor:
    """Indices of the ``K`` superpatches with the highest score, ``(B, S) -> (B, K)``."""
    check_num_shared(num_shared, scores.shape[1])
    return scores.topk(num_shared, dim=1, sorted=False).indices


def threshold_num_shared(log_odds: Tensor, threshold: float, step: int = 1) -> Tensor:
    """Per-image K, ``(B, S) -> (B,)`` int64: how many superpatches are uniform with
    probability at least ``threshold`` (log-odds at least its logit), rounded down to a
    multiple of ``step``. Each image's K depends on its own scores only, never on its batch."""
    sure = (log_odds >= math.log(threshold / (1.0 - threshold))).sum(dim=1)
    return torch.div(sure, step, rounding_mode="floor") * step


def check_threshold(threshold: float) -> None:
    """Raise a ValueError unless ``0 < threshold < 1`` (a probability that decides)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"share_threshold={threshold}: allowed a number in (0, 1)")


def shared_mask(shared_idx: Tensor, grid: tuple[int, int]) -> Tensor:
    """Boolean superpatch map ``(B, hs, ws)``, True where a superpatch shares one token."""
    batch = shared_idx.shape[0]
    mask = torch.zeros(batch, grid[0] * grid[1], dtype=torch.bool, device=shared_idx.device)
    mask.scatter_(1, shared_idx, True)
    return mask.view(batch, *grid)


class TokenLayout(NamedTuple):
    """Where each of the ``N - 3K`` tokens of a shared sequence comes from.

    kept_patches: ``(B, N - 4K)`` raster indices of the patches that keep their own token.
    shared_superpatches: ``(B, K)`` raster indices (in the superpatch grid) of shared ones.
    shared_patches: ``(B, 4K)`` raster indices of the patches each shared token covers,
        four per shared superpatch, in the order of ``shared_superpatches``.
    grid: patch grid ``(h, w)``.
    """

    kept_patches: Tensor
    shared_superpatches: Tensor
    shared_patches: Tensor
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.kept_patches.shape[1] + self.shared_superpatches.shape[1]


def _superpatch_patch_indices(grid: tuple[int, int], device: torch.device) -> Tensor:
    """``(S, 4)`` raster patch indices of each superpatch's 2x2 patches."""
    h, w = grid
    patch_ids = torch.arange(h * w, device=device).view(h // 2, 2, w // 2, 2)
    return patch_ids.permute(0, 2, 1, 3).reshape(-1, 4)


def plan_layout(shared_idx: Tensor, grid: tuple[int, int]) -> TokenLayout:
    """Token layout for the shared superpatches ``(B, K)`` on patch grid ``(h, w)``."""
    h, w = grid
    batch, num_shared = shared_idx.shape
    shared_patches = _superpatch_patch_indices(grid, shared_idx.device)[shared_idx].flatten(1)
    is_shared = torch.zeros(batch, h * w, dtype=torch.int8, device=shared_idx.device)
    is_shared.scatter_(1, shared_patches, 1)
    # Sorting (shared, raster index) puts the not-shared patches first, still in raster
    # order, so K = 0 reproduces the plain ViT sequence exactly. The keys are unique, so
    # no stable sort is needed (ONNX has none).
    raster = torch.arange(h * w, device=shared_idx.device)
    order = torch.sort(is_shared.long() * (h * w) + raster, dim=1).indices
    kept = order[:, : h * w - 4 * num_shared]
    return TokenLayout(kept, shared_idx, shared_patches, grid)


def gather_rows(tokens: Tensor, index: Tensor) -> Tensor:
    """``(B, N, C)`` tokens, ``(B, T)`` indices into N -> ``(B, T, C)``.

    One ``index_select`` over the flattened batch: on a CPU it copies whole rows, several
    times faster than ``gather`` with an index expanded over C, which reads one index per
    element."""
    batch, length, channels = tokens.shape
    offsets = torch.arange(batch, device=index.device).unsqueeze(1) * length
    rows = tokens.reshape(batch * length, channels).index_select(0, (index + offsets).flatten())
    return rows.view(batch, -1, channels)


def share_tokens(patch_tokens: Tensor, superpatch_tokens: Tensor, layout: TokenLayout) -> Tensor:
    """Assemble the shared sequence.

    Args:
        patch_tokens: ``(B, N, C)`` one token per patch, raster order.
        superpatch_tokens: ``(B, S, C)`` one token per superpatch (its pixels downsampled 2x
            and embedded), raster order; only the shared ones are used.
        layout: from :func:`plan_layout`.

    Returns:
        ``(B, N - 3K, C)``: kept patch tokens, then shared superpatch tokens.
    """
    kept = gather_rows(patch_tokens, layout.kept_patches)
    shared = gather_rows(superpatch_tokens, layout.shared_superpatches)
    return torch.cat([kept, shared], dim=1)


def unshare_tokens(tokens: Tensor, layout: TokenLayout) -> Tensor:
    """Scatter a shared sequence back to the patch grid.

    Args:
        tokens: ``(B, N - 3K, D)`` in the order of :func:`share_tokens`.
        layout: the layout the sequence was built with.

    Returns:
        ``(B, N, D)`` in raster order; each shared token is copied to its 4 patches.
    """
    batch, _, dim = tokens.shape
    h, w = layout.grid
    num_kept = layout.kept_patches.shape[1]
    destination = torch.cat([layout.kept_patches, layout.shared_patches], dim=1)  # (B, N)
    values = torch.cat(
        [tokens[:, :num_kept], tokens[:, num_kept:].repeat_interleave(4, dim=1)], dim=1
    )
    out = tokens.new_zeros(batch, h * w, dim)
    return out.scatter(1, destination.unsqueeze(-1).expand(-1, -1, dim), values)


def downsample_superpatches(images: Tensor) -> Tensor:
    """2x2 average of pixels (bilinear at scale 0.5, align_corners=False): ``(B, C, H/2, W/2)``."""
    return F.avg_pool2d(images, kernel_size=2, stride=2)
