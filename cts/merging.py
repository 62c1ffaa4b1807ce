"""Token merging (ToMe, Bolya et al., ICLR 2023): bipartite soft matching between a block's
attention and its MLP, and the map that restores every patch from the merged sequence.

Pure tensor functions, as :mod:`cts.sharing`. A sequence of ``T`` tokens is split by parity
into ``A`` (even indices) and ``B`` (odd); each ``A`` token's most similar ``B`` token (cosine
of the metric, the keys averaged over heads) is its edge, and the ``r`` strongest edges merge
their ``A`` token into the ``B`` token, a size-weighted average. The merged sequence is
``[prefix, unmerged A, B]``: ``T - r`` tokens. ``num_prefix`` leading tokens (class, register,
distillation) are never merged and stay first, in their order; with one or two of them
(class, distillation) this is ToMe's ``bipartite_soft_matching`` with ``class_token`` /
``distill_token`` exactly, including the order of the unmerged tokens (docs/fidelity.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Matching(NamedTuple):
    """Which tokens of a ``T``-token sequence merge: ``(B, T_A - r)`` unmerged ``A``
    indices (prefix ones first), ``(B, r)`` merged ``A`` indices, ``(B, r)`` the ``B`` index
    each merges into (indices within ``A`` and within ``B``), and the positions in
    ``[unmerged A, B]`` of the merged sequence's tokens (None: that order itself)."""

    unmerged: Tensor
    merged: Tensor
    into: Tensor
    order: Tensor | None


def max_merge_count(num_tokens: int, depth: int) -> int:
    """The largest ``r`` that ``depth`` blocks can each merge from ``num_tokens`` patches:
    at most half of them in the first block, at least one token left after the last."""
    return min(num_tokens // 2, (num_tokens - 1) // max(depth, 1))


def check_merge_count(r: int, num_tokens: int, depth: int, what: str = "") -> None:
    """One line unless ``r`` is in ``0..max_merge_count``."""
    if not 0 <= r <= max_merge_count(num_tokens, depth):
        where = f" for {what}" if what else ""
        raise ValueError(
            f"tome_r={r} is out of range{where}: allowed 0..{max_merge_count(num_tokens, depth)}"
            f" ({num_tokens} patch tokens, {depth} blocks merging r each)"
        )


@torch.no_grad()
def bipartite_matching(metric: Tensor, r: int, num_prefix: int = 0) -> Matching | None:
    """The ``r`` strongest ``A``-to-``B`` edges of ``metric`` ``(B, T, C)``; ``r`` is capped
    at half the tokens that may merge, as ToMe caps it. None where nothing merges (the
    sequence stays as it is, in its order)."""
    r = min(r, (metric.shape[1] - num_prefix) // 2)
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    scores[:, : (num_prefix + 1) // 2] = -torch.inf  # prefix tokens of A never merge
    scores[:, :, : num_prefix // 2] = -torch.inf  # nothing merges into prefix tokens of B
    best, into = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    unmerged, merged = order[:, r:], order[:, :r]
    if num_prefix:  # ToMe sorts the unmerged tokens when there is a prefix: it comes first
        unmerged = unmerged.sort(dim=1).values
    order = _output_order(num_prefix, unmerged.shape[1], metric.shape[1] // 2, metric.device)
    return Matching(unmerged, merged, into.gather(1, merged), order)


def _output_order(num_prefix: int, kept: int, num_b: int, device: torch.device) -> Tensor | None:
    """Positions in ``[unmerged A, B]`` of the merged sequence's tokens, the prefix first in
    its own order (A and B alternate in it); None where that is the identity (up to one
    prefix token). Built once per matching: every merge with it reuses it."""
    if num_prefix < 2:
        return None
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    prefix = [i // 2 if i % 2 == 0 else kept + i // 2 for i in range(num_prefix)]
    rest = torch.cat([torch.arange(pa, kept), torch.arange(kept + pb, kept + num_b)])
    return torch.cat([torch.tensor(prefix), rest]).to(device)


def merge_tokens(x: Tensor, matching: Matching, mode: str = "sum") -> Tensor:
    """``(B, T, C) -> (B, T - r, C)``: ``[prefix, unmerged A, B]`` with each merged ``A``
    token reduced (``sum``, ``mean``, ``amax``) into its ``B`` token."""
    a, b = x[:, ::2], x[:, 1::2]
    channels = x.shape[-1]
    unmerged = a.gather(1, matching.unmerged[..., None].expand(-1, -1, channels))
    merged = a.gather(1, matching.merged[..., None].expand(-1, -1, channels))
    b = b.scatter_reduce(1, matching.into[..., None].expand(-1, -1, channels), merged, mode)
    out = torch.cat([unmerged, b], dim=1)
    return out if matching.order is None else out[:, matching.order]


def merge_weighted(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge of ``x`` ``(B, T, C)``; ``size`` ``(B, T, 1)`` counts the
    patches each token stands for (None: one each). Returns the merged tokens and sizes."""
    if size is None:
        size = x.new_ones(*x.shape[:2], 1)
    total = merge_tokens(x * size, matching, "sum")
    size = merge_tokens(size, matching, "sum")
    return total / size, size


def merged_index(matching: Matching, num_tokens: int) -> Tensor:
    """``(B, T)``: where each token of the ``T``-token sequence is in the merged one."""
    unmerged = matching.unmerged
    batch, kept, num_b = unmerged.shape[0], unmerged.shape[1], num_tokens // 2
    index = unmerged.new_empty(batch, num_tokens)
    index_a = unmerged.new_empty(batch, (num_tokens + 1) // 2)
    index_a.scatter_(1, unmerged, torch.arange(kept, device=unmerged.device).expand(batch, -1))
    index_a.scatter_(1, matching.merged, kept + matching.into)
    index[:, ::2] = index_a
    index[:, 1::2] = kept + torch.arange(num_b, device=unmerged.device)
    return index if matching.order is None else matching.order.argsort()[index]


def track_sources(sources: Tensor, matching: Matching, num_tokens: int) -> Tensor:
    """``(B, N)`` position of each original patch's token, after one more merge."""
    return merged_index(matching, num_tokens).gather(1, sources)
