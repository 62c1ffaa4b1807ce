"""ALGM in a timm ViT: local 2x2 merging in one block, global merging in later ones.

Each block is timm's own; in a merging block the merge runs between its attention and its
MLP on the tokens themselves (ALGM's metric), :mod:`cts.adaptive_merging` per image. A batch
whose images keep different numbers of tokens is padded to its longest; padding is masked out
of every attention's keys, so an image's tokens do not depend on its batch. The decoder, as
ALGM's, runs on the merged tokens (:func:`cts.models.decoder.MaskTransformer` takes the same
mask); every patch gets its token's class scores back afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from cts.adaptive_merging import (
    MergePlan,
    apply_plan,
    global_plan,
    local_plan,
    valid_tokens,
    window_similarity,
)


class MergedTokens(NamedTuple):
    """The encoder's output after ALGM: ``tokens`` ``(B, T', C)`` (no prefix, padded),
    ``valid`` ``(B, T')`` (None: no image is padded), ``sources`` ``(B, N)`` each patch's
    token, ``mean_tokens``: patch tokens entering a block, averaged over the blocks and the
    batch."""

    tokens: Tensor
    valid: Tensor | None
    sources: Tensor
    mean_tokens: float


def check_algm_layers(layers: Sequence[int], depth: int) -> None:
    """One line unless ``layers`` are increasing block numbers in ``1..depth``."""
    layers = list(layers)
    if not layers or layers != sorted(set(layers)) or not 1 <= layers[0] <= layers[-1] <= depth:
        raise ValueError(
            f"algm_layers={layers}: allowed increasing block numbers in 1..{depth} (the first "
            "merges 2x2 windows, each later one merges globally)"
        )


def check_algm_threshold(threshold: float) -> None:
    """One line unless the local threshold is a cosine similarity in ``(0, 1]``."""
    if not 0 < threshold <= 1:
        raise ValueError(f"algm_threshold={threshold}: allowed (0, 1] (a cosine similarity)")


def _local(x: Tensor, threshold: float, grid: tuple[int, int], num_prefix: int) -> MergePlan:
    """The local plan of the whole sequence ``(B, P + N, C)``: the prefix stays first."""
    plan = local_plan(window_similarity(x[:, num_prefix:], grid), threshold, grid)
    prefix = torch.arange(num_prefix, device=x.device).expand(x.shape[0], -1)
    dest = torch.cat([prefix, plan.dest + num_prefix], dim=1)
    return MergePlan(dest, plan.lengths + num_prefix, plan.length + num_prefix, plan.padded)


def algm_features(
    vit: VisionTransformer, images: Tensor, layers: Sequence[int], threshold: float
) -> MergedTokens:
    """timm's ``forward_features`` with ALGM: ``(B, 3, H, W)`` -> merged patch tokens. In a
    merging block the merge runs between the attention and the MLP."""
    num_prefix = int(vit.num_prefix_tokens)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    patch = vit.patch_embed.patch_size
    grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
    batch, tokens = x.shape[:2]
    sources = torch.arange(num_prefix, tokens, device=x.device).expand(batch, -1)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
    size = torch.ones(batch, tokens, 1, device=x.device)
    # Padding is masked out of every attention's keys; no mask (the fused kernel) unpadded.
    counts, mask = [], None
    for number, block in enumerate(vit.blocks, start=1):
        counts.append(valid.sum(1) - num_prefix)
        if number not in layers:
            x = block(x, attn_mask=mask)
            continue
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))
        if number == layers[0]:
            plan = _local(x, threshold, grid, num_prefix)
        else:
            plan = global_plan(x, valid, number, num_prefix)
        x, size = apply_plan(x, size, plan)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        sources, valid = plan.dest.gather(1, sources), valid_tokens(plan)
        mask = valid[:, None, None, :] if plan.padded else None
    x = vit.norm(x)
    mean_tokens = torch.stack(counts).double().mean().item()
    patch_valid = None if mask is None else valid[:, num_prefix:]
    return MergedTokens(x[:, num_prefix:], patch_valid, sources - num_prefix, mean_tokens)
