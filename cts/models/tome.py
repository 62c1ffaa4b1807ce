"""ToMe in a timm ViT: ``r`` tokens merged in every block, between attention and MLP.

Each block is timm's own (its attention, fused or not, its MLP, layer scale and drop path);
only the merge runs between them, on the keys the attention computed (read by a forward hook
on its ``k_norm``, :class:`KeyReader`, so nothing is computed twice). Prefix tokens (class,
registers, distillation) are never merged. After the last block every patch gets its merged
token back (:func:`cts.merging.track_sources`), so the decoder sees the full patch grid, as
ALGM's does.

Proportional attention (``prop_attn``) adds ``log(size)`` to the attention logits, as ToMe
does for models evaluated off the shelf: a float mask, so PyTorch cannot pick its flash
kernel for those blocks.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from cts.merging import Matching, bipartite_matching, merge_weighted, track_sources


def tome_refusal(vit: nn.Module) -> str | None:
    """Why ToMe cannot run in this timm ViT, or None when it can."""
    if not isinstance(vit, VisionTransformer):
        return (
            f"{type(vit).__name__} blocks take rotary positions per token, which a merged "
            "token (an average of patches) does not have"
        )
    if not all(type(b) is Block and isinstance(b.attn, Attention) for b in vit.blocks):
        return "its blocks are not timm's Block with Attention (ToMe merges between the two)"
    return None


class KeyReader:
    """The keys one block's attention computes (its ``k_norm``'s output), kept only while
    ToMe asks. The forward hook is registered once, with the model: one registered per call
    does not compile (Dynamo cannot trace the registration)."""

    def __init__(self, attention: Attention) -> None:
        self.wanted = False
        self.keys: Tensor | None = None
        attention.k_norm.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: tuple, keys: Tensor) -> None:
        if self.wanted:
            self.keys = keys

    def attend(self, attention: Attention, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``attention(x, attn_mask=mask)`` ``(B, T, C)`` and its keys ``(B, heads, T, d)``;
        nothing kept after."""
        self.wanted = True
        attended = attention(x, attn_mask=mask)
        keys, self.keys, self.wanted = self.keys, None, False
        return attended, keys


def key_readers(vit: VisionTransformer) -> list[KeyReader]:
    """One :class:`KeyReader` per block (none where ToMe cannot run: :func:`tome_refusal`)."""
    if tome_refusal(vit) is not None:
        return []
    return [KeyReader(block.attn) for block in vit.blocks]


def merged_token_counts(num_patches: int, r: int, depth: int) -> list[int]:
    """Patch tokens entering each of ``depth`` blocks when each merges ``r`` (fewer where
    fewer than ``2r`` remain, as :func:`cts.merging.bipartite_matching` caps it)."""
    counts, tokens = [], num_patches
    for _ in range(depth):
        counts.append(tokens)
        tokens -= max(0, min(r, tokens // 2))
    return counts


def _block_with_merge(
    block: Block,
    reader: KeyReader,
    x: Tensor,
    size: Tensor | None,
    r: int,
    num_prefix: int,
    prop_attn: bool,
) -> tuple[Tensor, Tensor | None, Matching | None]:
    """One timm block with ToMe after its attention: ``(B, T, C) -> (B, T - r, C)``, the new
    sizes ``(B, T - r, 1)`` and the matching (None where nothing merged)."""
    bias = None if (size is None or not prop_attn) else size.log()[:, None, None, :, 0]
    mask = None if bias is None else bias.to(x.dtype)
    attended, keys = reader.attend(block.attn, block.norm1(x), mask)
    x = x + block.drop_path1(block.ls1(attended))
    matching = bipartite_matching(keys.mean(1), r, num_prefix)
    if matching is not None:
        x, size = merge_weighted(x, size, matching)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, matching


def tome_features(
    vit: VisionTransformer,
    readers: list[KeyReader],
    images: Tensor,
    r: int,
    prop_attn: bool,
) -> Tensor:
    """timm's ``forward_features`` with ToMe, prefix dropped and every patch restored:
    ``(B, 3, H, W) -> (B, H/p * W/p, C)`` in raster order; ``readers``: the blocks'
    (:func:`key_readers`)."""
    num_prefix = int(vit.num_prefix_tokens)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    batch, num_patches = x.shape[0], x.shape[1] - num_prefix
    sources = torch.arange(num_prefix, num_prefix + num_patches, device=x.device)
    sources = sources.expand(batch, -1)
    size = None
    for block, reader in zip(vit.blocks, readers, strict=True):
        tokens = x.shape[1]
        x, size, matching = _block_with_merge(block, reader, x, size, r, num_prefix, prop_attn)
        if matching is not None:
            sources = track_sources(sources, matching, tokens)
    x = vit.norm(x)
    return x.gather(1, sources[..., None].expand(-1, -1, x.shape[-1]))
