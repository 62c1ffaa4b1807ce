"""ViT encoder with content-aware token sharing, built on timm's VisionTransformer."""

from __future__ import annotations

import os
import warnings

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cts.models.pretrained import check_hub_weights, load_vit_weights
from cts.sharing import TokenLayout, gather_rows, share_tokens

# The paper's backbones; any other timm VisionTransformer name works too.
PAPER_BACKBONES = (
    "vit_tiny_patch16_384",
    "vit_small_patch16_384",
    "vit_base_patch16_384",
    "vit_large_patch16_384",
)


def supported_backbones() -> list[str]:
    """timm model names that build a plain VisionTransformer with absolute position embedding."""
    return sorted(set(timm.list_models("vit_*") + timm.list_models("deit*")))


def check_vit_backbone(name: str) -> None:
    """A ValueError unless timm builds ``name`` as a ViT with absolute position embedding
    (built on the meta device: no memory, no weights)."""
    paper = ", ".join(PAPER_BACKBONES)
    if name not in timm.list_models():
        raise ValueError(
            f"unknown backbone '{name}': use a timm ViT name, e.g. {paper}, or any of "
            f"`timm.list_models('vit_*')` / `timm.list_models('deit*')` "
            f"({len(supported_backbones())} names)"
        )
    with torch.device("meta"):
        vit = timm.create_model(name, num_classes=0)
    if not isinstance(vit, VisionTransformer) or getattr(vit, "pos_embed", None) is None:
        raise ValueError(
            f"backbone '{name}' is not a ViT with absolute position embedding: use "
            f"{paper} or another timm vit_*/deit* name"
        )


def create_vit(
    name: str,
    img_size: int | tuple[int, int],
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
    pretrained_path: str | os.PathLike | None = None,
    **overrides,
) -> VisionTransformer:
    """Create a timm ViT without classifier head, position embedding sized for ``img_size``.

    ``pretrained`` loads timm's ImageNet weights from the Hugging Face hub (or its cache);
    ``pretrained_path`` loads a local file instead (timm state dict .pth/.safetensors, or
    JAX .npz) and implies ``pretrained``. A ``depth`` override below the weights' depth
    loads their first ``depth`` blocks, with a warning.
    """
    check_vit_backbone(name)
    from_hub = pretrained and pretrained_path is None
    if from_hub:
        check_hub_weights([(name, "pretrained_path")])
    vit = timm.create_model(
        name,
        pretrained=from_hub,
        img_size=img_size,
        num_classes=0,
        drop_path_rate=drop_path_rate,
        **overrides,
    )
    if pretrained_path is not None:
        load_vit_weights(vit, pretrained_path, name)
    elif from_hub and "depth" in overrides:
        with torch.device("meta"):
            full_depth = len(timm.create_model(name, num_classes=0).blocks)
        if full_depth > len(vit.blocks):
            warnings.warn(
                f"{name}: loaded the first {len(vit.blocks)} of its {full_depth} pretrained "
                f"transformer blocks (depth={len(vit.blocks)})",
                stacklevel=2,
            )
    return vit


class CTSViTEncoder(nn.Module):
    """ViT encoder whose input sequence may hold shared superpatch tokens.

    Shared superpatches are downsampled 2x and embedded by the same patch embedding; their
    position embedding is the 2x2 mean of their four patches' position embeddings.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.grid_size = tuple(int(g) for g in vit.patch_embed.grid_size)

    def _embed(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, H/p * W/p, C)`` with the ViT's patch embedding."""
        x = self.vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        return self.vit.patch_embed.norm(x)

    def _patch_pixels(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, H/p * W/p, 3 * p * p)``: each patch's pixels, raster order,
        flattened in the order of the patch embedding's convolution weights."""
        batch, channels, height, width = images.shape
        p = self.patch_size
        patches = images.reshape(batch, channels, height // p, p, width // p, p)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * p * p)

    def _project(self, pixels: Tensor) -> Tensor:
        """``(B, T, 3 * p * p) -> (B, T, C)``: the patch embedding as a matrix product."""
        proj = self.vit.patch_embed.proj
        return self.vit.patch_embed.norm(F.linear(pixels, proj.weight.flatten(1), proj.bias))

    def _superpatch_pixels(self, quads: Tensor) -> Tensor:
        """``(B, 4K, 3 * p * p) -> (B, K, 3 * p * p)``: each superpatch's four patches (in
        :func:`cts.sharing.plan_layout`'s order: top-left, top-right, bottom-left,
        bottom-right) downsampled 2x2 into one patch, as
        :func:`cts.sharing.downsample_superpatches` does to the image, but only for the K
        shared superpatches."""
        batch, channels, p = quads.shape[0], self.vit.patch_embed.proj.in_channels, self.patch_size
        pooled = F.avg_pool2d(quads.reshape(-1, channels, p, p), 2)  # 2x2 average per patch
        # (B, K, quad row, quad col, C, p/2, p/2) -> the four quarters tiled into one patch.
        pooled = pooled.view(batch, -1, 2, 2, channels, p // 2, p // 2)
        return pooled.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, -1, channels * p * p)

    def _shared_tokens(self, images: Tensor, pos: Tensor, layout: TokenLayout) -> Tensor:
        """The embedded shared sequence ``(B, N - 3K, C)`` for ``layout``.

        Pixels are gathered before the embedding, and only the shared superpatches are
        downsampled, so the work is for the ``N - 3K`` tokens that enter the encoder (not all
        N patches and the whole image at half resolution); in training this also keeps the
        embedding's weight gradient to those tokens."""
        batch = images.shape[0]
        pixels = self._patch_pixels(images)
        kept = gather_rows(pixels, layout.kept_patches)
        quads = gather_rows(pixels, layout.shared_patches)
        tokens = torch.cat([self._project(kept), self._project(self._superpatch_pixels(quads))], 1)
        superpatch_pos = F.avg_pool2d(pos.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
        positions = share_tokens(
            pos.flatten(1, 2).expand(batch, -1, -1), superpatch_pos.expand(batch, -1, -1), layout
        )
        return tokens + positions

    def _patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Patch position embedding ``(1, h, w, C)`` resampled to ``grid`` when needed."""
        pos = self.vit.pos_embed
        if not self.vit.no_embed_class:
            pos = pos[:, self.num_prefix_tokens :]
        if grid != self.grid_size:
            pos = resample_abs_pos_embed(
                pos, new_size=grid, old_size=self.grid_size, num_prefix_tokens=0
            )
        return pos.view(1, grid[0], grid[1], -1)

    def _prefix_tokens(self, batch: int) -> Tensor:
        """Class (and distillation/register) tokens with their position embedding."""
        vit = self.vit
        tokens = [vit.cls_token] if vit.cls_token is not None else []
        if getattr(vit, "dist_token", None) is not None:
            tokens.append(vit.dist_token)
        if vit.reg_token is not None:
            tokens.append(vit.reg_token)
        prefix = torch.cat(tokens, dim=1)
        if not vit.no_embed_class:
            prefix = prefix + vit.pos_embed[:, : self.num_prefix_tokens]
        return prefix.expand(batch, -1, -1)

    def forward(self, images: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """Encode images.

        Args:
            images: ``(B, 3, H, W)``, H and W multiples of 2p when ``layout`` is given.
            layout: sharing layout from :func:`cts.sharing.plan_layout`, or None for no sharing.

        Returns:
            ``(B, T, C)`` patch-level tokens after the final norm, prefix tokens dropped;
            ``T = N`` in raster order without sharing, else ``N - 3K`` in layout order.
        """
        batch = images.shape[0]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        pos = self._patch_pos_embed(grid)
        if layout is None:
            x = self._embed(images) + pos.flatten(1, 2)
        else:
            x = self._shared_tokens(images, pos, layout)
        x = torch.cat([self._prefix_tokens(batch), x], dim=1)
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, self.num_prefix_tokens :]


def backbone_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone was pretrained with (ViT augreg: 0.5; DeiT: ImageNet)."""
    config = timm.get_pretrained_cfg(name)
    if config is None:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return tuple(config.mean), tuple(config.std)
