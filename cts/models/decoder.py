"""Segmenter decoders: the mask transformer and the linear baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer.

    Patch tokens and ``n_cls`` learned class embeddings go through ``num_layers`` joint
    transformer blocks; class scores are the scalar products of L2-normalised patch and class
    features. Works on any token set (shared or not): it only sees a sequence.
    """

    def __init__(
        self,
        num_classes: int,
        encoder_dim: int,
        num_layers: int = 2,
        dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        dim = dim or encoder_dim
        num_heads = num_heads or max(dim // 64, 1)
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, dim)
        self.blocks = nn.Sequential(
            *[
                # Segmenter's decoder block: dropout on the attention weights, after the
                # attention projection, after the MLP's GELU and after its output; torch's
                # LayerNorm (eps 1e-5, timm's blocks default to 1e-6).
                Block(
                    dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=dropout,
                    attn_drop=dropout,
                    drop_path=drop_path_rate * i / max(num_layers - 1, 1),
                    norm_layer=nn.LayerNorm,
                )
                for i in range(num_layers)
            ]
        )
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        scale = dim**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """``(B, T, C_enc) -> (B, T, n_cls)`` class scores per token; ``valid`` ``(B, T)``
        (None: all are real) keeps padding tokens out of every token's attention."""
        x = self.proj_dec(tokens)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        if valid is None:
            x = self.blocks(x)
        else:
            classes = valid.new_ones(valid.shape[0], self.num_classes)
            mask = torch.cat([valid, classes], dim=1)[:, None, None, :]
            for block in self.blocks:
                x = block(x, attn_mask=mask)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class LinearDecoder(nn.Module):
    """Per-token linear classifier, ``(B, T, C_enc) -> (B, T, n_cls)``."""

    def __init__(self, num_classes: int, encoder_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(encoder_dim, num_classes)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.head(tokens)  # per token: padding changes nothing


def build_decoder(name: str, num_classes: int, encoder_dim: int, dropout: float = 0.1) -> nn.Module:
    """``mask_transformer`` (Segmenter's, 2 layers, width = encoder width) or ``linear``."""
    if name == "mask_transformer":
        return MaskTransformer(num_classes, encoder_dim, dropout=dropout)
    if name == "linear":
        return LinearDecoder(num_classes, encoder_dim)
    raise ValueError(f"unknown decoder '{name}': use mask_transformer or linear")
