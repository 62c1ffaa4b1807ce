"""ViT encoder with content-aware token sharing, built on timm's ViTs.

Served: timm ``VisionTransformer`` (ViT, DeiT, DeiT-III, augreg, CLIP, SigLIP, DINOv2,
``gap`` and ``reg`` variants), ``VisionTransformerDistilled`` (distilled DeiT) and ``Eva``
(EVA, EVA-02, ``vit_*_rope_*``, DINOv3): any of them with a plain patch embedding (one
convolution per square patch), with or without class, register or distillation tokens,
absolute or rotary positions. Without sharing the encoder is timm's ``forward_features``;
with sharing only the input changes: which tokens enter and their positions.

Refused before anything is built (:func:`check_vit_backbone`): hybrid ViTs (a CNN stem),
relative position bias (BEiT, ``vit_relpos_*``), windowed attention (SAM) and rotary
schemes that are not a function of continuous coordinates.
"""

from __future__ import annotations

import functools
import os
import warnings

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cts.models.pretrained import check_hub_weights, load_vit_weights
from cts.models.rope import gather_rope, rope_refusal, rope_table
from cts.sharing import TokenLayout, gather_rows, share_tokens

# The paper's backbones; timm ViTs of the families below work too.
PAPER_BACKBONES = (
    "vit_tiny_patch16_384",
    "vit_small_patch16_384",
    "vit_base_patch16_384",
    "vit_large_patch16_384",
)
# Name patterns of the timm families this encoder serves (a few names among them are
# refused by check_vit_backbone, e.g. the hybrids vit_*_r50_* and vit_relpos_*).
BACKBONE_PATTERNS = ("vit_*", "deit*", "eva*", "flexivit*")

_POSITION_BIAS = (
    "relative position bias, a learned table indexed by whole-patch offsets between tokens: "
    "a shared token sits at a superpatch centre, half a patch off that grid, where the table "
    "has no entry"
)
# timm ViT classes sharing cannot serve yet, and why.
REFUSED_CLASSES = {
    "Beit": _POSITION_BIAS,
    "VisionTransformerRelPos": _POSITION_BIAS,
    "VisionTransformerSAM": (
        "windowed attention with relative position bias: the windows partition the full "
        "patch grid, which a shared sequence no longer has"
    ),
}


def supported_backbones() -> list[str]:
    """timm model names of the served families (:data:`BACKBONE_PATTERNS`); the few that
    are refused (hybrids, relative positions) are named by :func:`check_vit_backbone`."""
    return sorted(set(timm.list_models(list(BACKBONE_PATTERNS))))


def backbone_refusal(vit: nn.Module) -> str | None:
    """Why sharing cannot serve this timm model, or None when it can."""
    kind = type(vit).__name__
    if kind in REFUSED_CLASSES:
        return REFUSED_CLASSES[kind]
    if not isinstance(vit, VisionTransformer | Eva):
        return f"{kind} is not a plain ViT (timm VisionTransformer or Eva)"
    embed = vit.patch_embed
    if not isinstance(embed, PatchEmbed):
        return (
            f"hybrid ViT: its patch embedding ({type(embed).__name__}) projects a CNN stem's "
            "feature map, not pixels, so a superpatch cannot be embedded from its 2x "
            "downsampled pixels"
        )
    proj, size = embed.proj, tuple(embed.patch_size)
    plain = isinstance(proj, nn.Conv2d) and size[0] == size[1]
    plain = plain and tuple(proj.kernel_size) == size and tuple(proj.stride) == size
    if not plain or tuple(proj.padding) != (0, 0):
        return "its patch embedding is not one convolution per non-overlapping square patch"
    if size[0] % 2:
        return f"odd patch size {size[0]}: a patch's 2x2 average pooling needs an even side"
    rope = getattr(vit, "rope", None)
    return None if rope is None else rope_refusal(rope)


def meta_backbone(name: str) -> nn.Module:
    """``name`` built on the meta device (no memory, no weights), once it is known that
    sharing can serve it; a one-line ValueError naming it and the reason otherwise."""
    paper = ", ".join(PAPER_BACKBONES)
    if name not in timm.list_models():
        raise ValueError(
            f"unknown backbone '{name}': use a timm ViT name, e.g. {paper}, or any of "
            f"`timm.list_models({list(BACKBONE_PATTERNS)})` ({len(supported_backbones())} "
            "names; docs/backbones.md: supported backbones)"
        )
    with torch.device("meta"):
        vit = timm.create_model(name, num_classes=0)
    reason = backbone_refusal(vit)
    if reason is not None:
        raise ValueError(f"backbone '{name}' cannot share tokens: {reason}")
    return vit


def check_vit_backbone(name: str) -> None:
    """A one-line ValueError naming ``name`` and the reason unless sharing can serve it (the
    model is built on the meta device: no memory, no weights)."""
    meta_backbone(name)


@functools.cache  # params validation and a stage both ask; the answer never changes
def backbone_patch_size(name: str) -> int:
    """Patch size of a backbone sharing can serve (checked as :func:`check_vit_backbone`)."""
    return int(meta_backbone(name).patch_embed.patch_size[0])


def _drop_pooling_head(vit: nn.Module) -> None:
    """Remove the classifier's pooling (attention pool, norm after pooling): segmentation
    reads every token, and parameters without a gradient stop DistributedDataParallel."""
    vit.reset_classifier(0, global_pool="")
    vit.fc_norm = nn.Identity()


def create_vit(
    name: str,
    img_size: int | tuple[int, int],
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
    pretrained_path: str | os.PathLike | None = None,
    **overrides,
) -> nn.Module:
    """Create a timm ViT for segmentation: no classifier or pooling, any input size.

    The model is built with ``dynamic_img_size`` (timm resamples its position embedding to
    the grid of each input, the sliding windows and padded images of evaluation included);
    its position embedding is sized for ``img_size``.

    ``pretrained`` loads timm's ImageNet weights from the Hugging Face hub (or its cache);
    ``pretrained_path`` loads a local file instead (timm state dict .pth/.safetensors, an
    original release's layout timm converts, or JAX .npz) and implies ``pretrained``. A
    ``depth`` override below the weights' depth loads their first ``depth`` blocks, with a
    warning.
    """
    check_vit_backbone(name)
    from_hub = pretrained and pretrained_path is None
    if from_hub:
        check_hub_weights([(name, "pretrained_path")])
    overrides.setdefault("dynamic_img_size", True)
    vit = timm.create_model(
        name,
        pretrained=from_hub,
        img_size=img_size,
        num_classes=0,
        drop_path_rate=drop_path_rate,
        **overrides,
    )
    _drop_pooling_head(vit)  # before a local file loads: its head keys are then ignored
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

    Without a layout this is timm's ``forward_features`` with the prefix (class, register,
    distillation) tokens dropped. With one, a shared superpatch's pixels are downsampled 2x
    and embedded by the same patch embedding; its absolute position embedding is the 2x2
    mean of its four patches' and its rotary embedding that of its centre. The prefix tokens
    and the patch positions are timm's own (:meth:`_prefix_and_positions`).

    Args:
        vit: a timm ViT that :func:`backbone_refusal` accepts, built with
            ``dynamic_img_size=True`` (as :func:`create_vit` does).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        reason = backbone_refusal(vit)
        if reason is not None:
            raise ValueError(f"{type(vit).__name__} cannot share tokens: {reason}")
        if not vit.dynamic_img_size:
            raise ValueError("build the ViT with dynamic_img_size=True (create_vit does)")
        # The shared sequence takes timm's prefix and positions from _pos_embed, which would
        # drop them rather than tokens; the Segmenter never sets either rate.
        patch_drop = getattr(vit, "patch_drop", None)
        if vit.pos_drop.p > 0 or not (patch_drop is None or isinstance(patch_drop, nn.Identity)):
            raise ValueError("position and patch dropout are not supported with sharing")
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        # The first module of a block that knows its heads: the block itself for timm's
        # parallel blocks (ParallelScalingBlock has no .attn), else its attention.
        self.num_heads = next(
            int(m.num_heads) for m in vit.blocks[0].modules() if hasattr(m, "num_heads")
        )
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    @property
    def rope(self) -> nn.Module | None:
        """The ViT's rotary position embedding, None for absolute positions only."""
        return getattr(self.vit, "rope", None)

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
        weight = proj.weight.flatten(1)
        return self.vit.patch_embed.norm(F.linear(pixels, weight, proj.bias))

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

    def _prefix_and_positions(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """timm's prefix tokens ``(1, P, C)`` (with their position embedding where the model
        embeds them) and the patch position embedding ``(1, h, w, C)`` resampled to ``grid``
        (None without absolute positions).

        Both come from the ViT's own ``_pos_embed`` applied to zero patch tokens (it adds the
        positions), so every variant timm has (class, register and distillation tokens,
        ``no_embed_class``, resampling) is timm's code, not a copy of it."""
        vit, weight = self.vit, self.vit.patch_embed.proj.weight
        template = vit._pos_embed(weight.new_zeros(1, grid[0], grid[1], self.embed_dim))
        if isinstance(template, tuple):  # Eva: (tokens, rotary embedding of the full grid)
            template = template[0]
        prefix = template[:, : self.num_prefix_tokens]
        if vit.pos_embed is None:
            return prefix, None
        return prefix, template[:, self.num_prefix_tokens :].view(1, *grid, -1)

    def _patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Patch position embedding ``(1, h, w, C)`` resampled to ``grid`` when needed."""
        pos = self._prefix_and_positions(grid)[1]
        if pos is None:
            raise ValueError(f"{type(self.vit).__name__} has no absolute position embedding")
        return pos

    def _shared_tokens(self, images: Tensor, pos: Tensor | None, layout: TokenLayout) -> Tensor:
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
        if pos is None:
            return tokens
        superpatch_pos = F.avg_pool2d(pos.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
        positions = share_tokens(
            pos.flatten(1, 2).expand(batch, -1, -1), superpatch_pos.expand(batch, -1, -1), layout
        )
        return tokens + positions

    def _rope_rows(self, layout: TokenLayout) -> Tensor:
        """``(B, N - 3K)`` rows of :func:`cts.models.rope.rope_table` for the shared
        sequence: the kept patches, then the shared superpatches' centres."""
        num_patches = layout.grid[0] * layout.grid[1]
        return torch.cat([layout.kept_patches, layout.shared_superpatches + num_patches], 1)

    def _blocks(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """The transformer blocks on the shared sequence, with its rotary embedding."""
        vit = self.vit
        if not isinstance(vit, Eva):
            return vit.blocks(x)
        table = rows = rope = None
        if self.rope is not None:
            table, rows = rope_table(self.rope, layout.grid), self._rope_rows(layout)
        mixed = table is not None and table.dim() == 4  # (depth, heads, N + S, D)
        if table is not None and not mixed:
            rope = gather_rope(table, rows)
        for i, block in enumerate(vit.blocks):
            if mixed:  # learned frequencies per block: gathered one block at a time
                rope = gather_rope(table[i], rows)
            x = block(x, rope=rope)
        return x

    def forward(self, images: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """Encode images.

        Args:
            images: ``(B, 3, H, W)``, H and W multiples of p (of 2p when ``layout`` is given).
            layout: sharing layout from :func:`cts.sharing.plan_layout`, or None for no sharing.

        Returns:
            ``(B, T, C)`` patch-level tokens after the final norm, prefix tokens dropped;
            ``T = N`` in raster order without sharing, else ``N - 3K`` in layout order.
        """
        if layout is None:
            return self.vit.forward_features(images)[:, self.num_prefix_tokens :]
        prefix, pos = self._prefix_and_positions(layout.grid)
        x = self._shared_tokens(images, pos, layout)
        x = torch.cat([prefix.expand(images.shape[0], -1, -1), x], dim=1)
        x = self._blocks(self.vit.norm_pre(x), layout)
        return self.vit.norm(x)[:, self.num_prefix_tokens :]


def backbone_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone was pretrained with (ViT augreg: 0.5; DeiT: ImageNet)."""
    config = timm.get_pretrained_cfg(name)
    if config is None:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return tuple(config.mean), tuple(config.std)
