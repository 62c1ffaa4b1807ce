"""Adaptive local-then-global token merging (ALGM, Norouzi et al., CVPR 2024), per image.

Pure tensor functions, as :mod:`cts.merging`. A merge is a *plan*: for each token of a
``(B, T, C)`` sequence, its position in the merged one (``dest``, ``(B, T)``) and each image's
merged length. Tokens sharing a position are averaged, weighted by the patches each stands
for. How many tokens merge depends on the image alone, so images of one batch end with
different lengths: a batch is padded to its longest, ``valid`` ``(B, T)`` marks real tokens,
and a padding token never merges, never receives a merge and sends ``dest`` to ``T'`` (a slot
dropped after the scatter).

- **local** (the first merging layer): each 2x2 window of patches whose mean pairwise cosine
  similarity reaches ``threshold`` becomes one token. Merged windows come first, most
  similar first, then the other patches in raster order, as ALGM's ``conditional_pooling``
  orders them.
- **global** (every later merging layer): ToMe's bipartite split (even / odd positions),
  each ``A`` token's best ``B`` match, and every ``A`` token whose match scores at least
  ``mean + std / layer`` of the image's matches merges into it (``[prefix, kept A, B]``), as
  ALGM's ``turbo_matching``.

ALGM's code takes a batch's merge count as the minimum over its images and the global
threshold from batch-averaged statistics, so an image's result depends on its batch; here
each image uses its own (docs/fidelity.md). With one image the two are the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class MergePlan(NamedTuple):
    """``dest`` ``(B, T)``: each token's position in the merged sequence (``length`` for
    padding, dropped); ``lengths`` ``(B,)``: each image's merged length; ``length``: the
    batch's longest, the merged sequence's size; ``padded``: some image is shorter."""

    dest: Tensor
    lengths: Tensor
    length: int
    padded: bool


def _extent(lengths: Tensor) -> tuple[int, bool]:
    """The longest of ``lengths`` and whether any is shorter, in one device-to-host copy."""
    shortest, longest = torch.stack([lengths.min(), lengths.max()]).tolist()
    return longest, shortest < longest


def window_similarity(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, N, C)`` patch tokens in raster order -> ``(B, S)``: the mean cosine similarity
    of each 2x2 window's six patch pairs, windows in raster order."""
    batch, _, channels = patches.shape
    h, w = grid
    windows = patches.reshape(batch, h // 2, 2, w // 2, 2, channels).transpose(2, 3)
    unit = F.normalize(windows.reshape(batch, -1, 4, channels).float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    return (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / 12


def _window_of_patch(grid: tuple[int, int], device: torch.device) -> Tensor:
    """``(N,)``: the raster index of the 2x2 window each patch lies in."""
    rows = torch.arange(grid[0], device=device) // 2
    cols = torch.arange(grid[1], device=device) // 2
    return (rows[:, None] * (grid[1] // 2) + cols[None, :]).flatten()


def local_plan(similarity: Tensor, threshold: float, grid: tuple[int, int]) -> MergePlan:
    """The plan merging every window with ``similarity`` ``(B, S)`` at least ``threshold``,
    for the ``N`` patch tokens (no prefix)."""
    merged = similarity >= threshold
    num_merged = merged.sum(1)
    rank = similarity.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    window = _window_of_patch(grid, similarity.device).expand(similarity.shape[0], -1)
    in_merged = merged.gather(1, window)
    alone_rank = (~in_merged).cumsum(1) - 1
    dest = torch.where(in_merged, rank.gather(1, window), num_merged[:, None] + alone_rank)
    lengths = window.shape[1] - 3 * num_merged
    return MergePlan(dest, lengths, *_extent(lengths))


def global_plan(x: Tensor, valid: Tensor, layer: int, num_prefix: int) -> MergePlan:
    """The plan of one global merge of ``x`` ``(B, T, C)``: ``A`` tokens whose best match
    scores at least ``mean + std / layer`` (unbiased std over the image's non-prefix ``A``
    tokens; ``layer`` counts from 1) merge into it; prefix tokens stay first, unmerged."""
    unit = F.normalize(x.float(), dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    valid_a, valid_b = valid[:, ::2].clone(), valid[:, 1::2].clone()
    valid_a[:, :prefix_a] = False  # prefix A tokens never merge and count in no statistic
    valid_b[:, :prefix_b] = False  # and nothing merges into a prefix B token
    best, into = scores.masked_fill(~valid_b[:, None, :], -torch.inf).max(dim=-1)
    count = valid_a.sum(1, keepdim=True)
    mean = best.where(valid_a, 0).sum(1, keepdim=True) / count
    var = ((best - mean).where(valid_a, 0) ** 2).sum(1, keepdim=True) / (count - 1)
    merges = valid_a & (best >= mean + var.sqrt() / layer)
    return _bipartite_dest(valid, merges, into, num_prefix)


def _bipartite_dest(valid: Tensor, merges: Tensor, into: Tensor, num_prefix: int) -> MergePlan:
    """Positions in ``[prefix, kept A, B]`` (padding last) of every token, ``A`` tokens in
    ``merges`` ``(B, T_A)`` at the position of their ``into`` ``B`` token."""
    batch, tokens = valid.shape
    position = torch.arange(tokens, device=valid.device).expand(batch, -1)
    prefix = position < num_prefix
    is_a = position % 2 == 0
    kept_a = valid & is_a & ~prefix
    kept_a[:, ::2] &= ~merges
    num_kept = kept_a.sum(1, keepdim=True) + num_prefix
    b_rank = (valid & ~is_a & ~prefix).cumsum(1) - 1
    dest = torch.where(is_a, num_prefix + kept_a.cumsum(1) - 1, num_kept + b_rank)
    dest = torch.where(prefix, position, dest)
    lengths = valid.sum(1) - merges.sum(1)
    length, padded = _extent(lengths)
    dest = torch.where(valid, dest, length)
    dest_b = dest[:, 1::2].gather(1, into)
    dest[:, ::2] = torch.where(merges, dest_b, dest[:, ::2])
    return MergePlan(dest, lengths, length, padded)


def apply_plan(x: Tensor, size: Tensor, plan: MergePlan) -> tuple[Tensor, Tensor]:
    """Size-weighted average of ``x`` ``(B, T, C)`` into ``(B, T', C)`` by ``plan``; ``size``
    ``(B, T, 1)`` counts the patches each token stands for (0 for padding). Returns the merged
    tokens (padding zero) and their sizes."""
    batch, _, channels = x.shape
    index = plan.dest[..., None]
    total = x.new_zeros(batch, plan.length + 1, channels)
    total = total.scatter_add(1, index.expand(-1, -1, channels), x * size.to(x.dtype))
    merged_size = size.new_zeros(batch, plan.length + 1, 1).scatter_add(1, index, size)
    merged_size = merged_size[:, : plan.length]
    return total[:, : plan.length] / merged_size.clamp(min=1).to(x.dtype), merged_size


def valid_tokens(plan: MergePlan) -> Tensor:
    """``(B, T')``: True for the real tokens of each image of the merged sequence."""
    positions = torch.arange(plan.length, device=plan.lengths.device)
    return positions[None, :] < plan.lengths[:, None]
