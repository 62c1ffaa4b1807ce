"""Models: CTS ViT encoder, Segmenter decoders, policy network, the assembled Segmenter."""

from cts.models.decoder import LinearDecoder, MaskTransformer, build_decoder
from cts.models.policy import PolicyNet
from cts.models.segmenter import (
    POLICIES,
    Segmenter,
    SegmenterConfig,
    SegmenterOutput,
    build_segmenter,
)
from cts.models.vit import (
    PAPER_BACKBONES,
    CTSViTEncoder,
    backbone_normalization,
    create_vit,
    supported_backbones,
)

__all__ = [
    "PAPER_BACKBONES",
    "POLICIES",
    "CTSViTEncoder",
    "LinearDecoder",
    "MaskTransformer",
    "PolicyNet",
    "Segmenter",
    "SegmenterConfig",
    "SegmenterOutput",
    "backbone_normalization",
    "build_decoder",
    "build_segmenter",
    "create_vit",
    "supported_backbones",
]
