"""Segmenter with content-aware token sharing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cts.geometry import (
    check_num_shared,
    num_patches,
    num_superpatches,
    superpatch_grid,
    superpatch_size,
    threshold_step,
)
from cts.merging import check_merge_count
from cts.models.algm import algm_features, check_algm_layers, check_algm_threshold
from cts.models.decoder import MaskTransformer, build_decoder
from cts.models.policy import BACKBONE as POLICY_BACKBONE
from cts.models.policy import IMAGENET_MEAN, IMAGENET_STD, PolicyNet
from cts.models.pretrained import check_hub_weights, require_weights_file
from cts.models.tome import key_readers, merged_token_counts, tome_features, tome_refusal
from cts.models.upsample import upsample_argmax
from cts.models.vit import CTSViTEncoder, create_vit
from cts.sharing import (
    IGNORE_INDEX,
    check_threshold,
    oracle_scores,
    plan_layout,
    select_shared,
    shared_mask,
    threshold_num_shared,
    unshare_tokens,
)

POLICIES = ("none", "policy_net", "oracle", "random")
DECODERS = ("mask_transformer", "linear")


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild a model; stored in checkpoints.

    ``pretrained_path`` / ``policy_pretrained_path``: local weights files for the ViT /
    the policy net's efficientnet_lite0 (each implies pretrained weights for its model;
    None: ``pretrained`` decides, through the Hugging Face hub or its cache).
    ``extra`` keys the model reads (all optional; set by ``cts import_checkpoint`` so an
    imported Segmenter computes exactly what its original code does):
    ``layer_norm_eps`` (every encoder/decoder LayerNorm; timm's blocks: 1e-6, Segmenter's:
    1e-5),
    ``decoder_layers`` (mask transformer blocks, default 2) and ``policy_input_norm``
    (``imagenet``: re-normalise the images to ImageNet statistics for the policy net, the
    default; ``none``: feed them as the segmenter gets them, as the CTS authors' code does).
    ``share_threshold`` (None: every image shares ``num_tokens_shared``): K per image, the
    superpatches whose sharing score reaches it (rounded down to a multiple of S / 16).
    ``tome_r`` (0: off): token merging instead of sharing (ToMe, :mod:`cts.models.tome`),
    ``r`` tokens merged in every block, with policy ``none``; ``tome_prop_attn``: ToMe's
    proportional attention. ``algm_threshold`` (0: off): ALGM instead (:mod:`cts.models.algm`),
    2x2 windows whose patches' mean cosine similarity reaches it merge in block
    ``algm_layers[0]`` (numbered from 1), a global merge in each later one, with policy none.
    """

    backbone: str = "vit_small_patch16_384"
    num_classes: int = 150
    crop_size: int = 512
    num_tokens_shared: int = 103
    policy: str = "policy_net"
    decoder: str = "mask_transformer"
    depth: int | None = None
    patch_size: int | None = None
    pretrained: bool = False
    pretrained_path: str | None = None
    policy_pretrained_path: str | None = None
    drop_path_rate: float = 0.1
    dropout: float = 0.1
    policy_feature_stride: int = 32
    policy_input_scale: float = 1.0
    ignore_index: int = IGNORE_INDEX
    share_threshold: float | None = None
    tome_r: int = 0
    tome_prop_attn: bool = False
    algm_threshold: float = 0.0
    algm_layers: tuple[int, ...] = (1, 5)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class SegmenterOutput(NamedTuple):
    """logits: ``(B, n_cls, H, W)`` (patch-grid scores with ``upsample=False``); shared:
    ``(B, hs, ws)`` bool superpatch map; num_tokens: patch-level tokens the encoder processed
    per image (``N - 3K``; the batch's mean with a threshold; merging, the mean over blocks)."""

    logits: Tensor
    shared: Tensor
    num_tokens: float


def merging_setting(config: SegmenterConfig) -> tuple[str, float] | None:
    """``("tome_r", r)`` or ``("algm_threshold", t)`` for a model trained merging tokens (the
    per-call keyword of :meth:`Segmenter.forward` and its value), else None."""
    for setting in ("tome_r", "algm_threshold"):
        if getattr(config, setting):
            return setting, getattr(config, setting)
    return None


def merging_name(config: SegmenterConfig) -> str | None:
    """``ToMe r=..`` or ``ALGM t=..`` for a model trained merging tokens, else None."""
    setting = merging_setting(config)
    if setting is None:
        return None
    return f"ToMe r={setting[1]}" if setting[0] == "tome_r" else f"ALGM t={setting[1]:g}"


def _check_pretrained(config: SegmenterConfig) -> None:
    """Before anything is built: weights files exist, hub weights are reachable or cached
    (one error naming every model whose weights cannot be had)."""
    needs = []
    if config.pretrained_path is not None:
        require_weights_file(config.pretrained_path, "pretrained_path")
    elif config.pretrained:
        needs.append((config.backbone, "pretrained_path"))
    if config.policy == "policy_net":
        if config.policy_pretrained_path is not None:
            require_weights_file(config.policy_pretrained_path, "policy_pretrained_path")
        elif config.pretrained:
            needs.append((POLICY_BACKBONE, "policy_pretrained_path"))
    check_hub_weights(needs)


class Segmenter(nn.Module):
    """ViT encoder + decoder, with a policy choosing which superpatches share a token."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        if config.policy not in POLICIES:
            raise ValueError(f"unknown policy '{config.policy}': use one of {', '.join(POLICIES)}")
        if config.decoder not in DECODERS:
            raise ValueError(
                f"unknown decoder '{config.decoder}': use one of {', '.join(DECODERS)}"
            )
        policy_input_norm = config.extra.get("policy_input_norm", "imagenet")
        if policy_input_norm not in ("imagenet", "none"):
            raise ValueError(f"extra policy_input_norm={policy_input_norm!r}: use imagenet or none")
        _check_pretrained(config)
        overrides = {"depth": config.depth} if config.depth else {}
        if config.patch_size:
            overrides["patch_size"] = config.patch_size
        vit = create_vit(
            config.backbone,
            img_size=config.crop_size,
            pretrained=config.pretrained,
            drop_path_rate=config.drop_path_rate,
            pretrained_path=config.pretrained_path,
            **overrides,
        )
        if config.mean is None or config.std is None:
            config.mean = tuple(vit.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)))
            config.std = tuple(vit.pretrained_cfg.get("std", (0.5, 0.5, 0.5)))
        self.config = config
        self.encoder = CTSViTEncoder(vit)
        self._key_readers = key_readers(vit)  # ToMe's, set up now: set up per call, none compiles
        self.patch_size = self.encoder.patch_size
        try:
            superpatches = num_superpatches(config.crop_size, self.patch_size)
        except ValueError as error:
            raise ValueError(
                f"crop_size={config.crop_size} must be a multiple of the superpatch size "
                f"{superpatch_size(self.patch_size)} (2 x patch size)"
            ) from error
        self.num_tokens_shared = 0
        self._check_merging(config)
        if config.policy != "none":
            k, where = config.num_tokens_shared, f"crop_size {config.crop_size}"
            check_num_shared(k, superpatches, where)
            self.num_tokens_shared = k
            if config.share_threshold is not None:
                check_threshold(config.share_threshold)
        decoder_layers = config.extra.get("decoder_layers")
        if config.decoder == "mask_transformer" and decoder_layers is not None:
            self.decoder = MaskTransformer(
                config.num_classes,
                self.encoder.embed_dim,
                num_layers=int(decoder_layers),
                dropout=config.dropout,
            )
        else:
            self.decoder = build_decoder(
                config.decoder, config.num_classes, self.encoder.embed_dim, config.dropout
            )
        if config.extra.get("layer_norm_eps") is not None:
            for module in (*self.encoder.modules(), *self.decoder.modules()):
                if isinstance(module, nn.LayerNorm):
                    module.eps = float(config.extra["layer_norm_eps"])
        self.policy_net: PolicyNet | None = None
        if config.policy == "policy_net":
            as_is = policy_input_norm == "none"
            self.policy_net = PolicyNet(
                pretrained=config.pretrained,
                feature_stride=config.policy_feature_stride,
                input_scale=config.policy_input_scale,
                input_mean=IMAGENET_MEAN if as_is else config.mean,
                input_std=IMAGENET_STD if as_is else config.std,
                pretrained_path=config.policy_pretrained_path,
            )
            self.policy_net.requires_grad_(False)

    def _check_merging(self, config: SegmenterConfig) -> None:
        """One line unless the configured merging (if any) is the model's only reduction and
        fits its backbone."""
        if config.tome_r:
            if config.policy != "none":
                raise ValueError(
                    f"tome_r={config.tome_r} with policy {config.policy}: one token reduction "
                    "at a time (policy none for ToMe)"
                )
            patches = num_patches(config.crop_size, self.patch_size)
            crop = config.crop_size
            self._check_tome(config.tome_r, patches, f"image size {crop}x{crop}")
        if config.algm_threshold:
            if config.policy != "none" or config.tome_r:
                raise ValueError(
                    f"algm_threshold={config.algm_threshold} with policy {config.policy} and "
                    f"tome_r={config.tome_r}: one token reduction at a time (policy none, tome_r 0)"
                )
            self._check_algm(config.algm_threshold)

    def _check_mergeable(self) -> None:
        """One line unless this backbone's blocks can merge tokens (ToMe or ALGM)."""
        reason = tome_refusal(self.encoder.vit)
        if reason is not None:
            raise ValueError(f"backbone '{self.config.backbone}' cannot merge tokens: {reason}")

    def _check_tome(self, r: int, num_patches: int, what: str) -> None:
        """One line unless ToMe can merge ``r`` of ``num_patches`` tokens per block of this
        backbone."""
        self._check_mergeable()
        check_merge_count(r, num_patches, len(self.encoder.vit.blocks), what)

    def _check_algm(self, threshold: float) -> None:
        """One line unless ALGM can merge at ``threshold`` in this backbone's layers."""
        self._check_mergeable()
        check_algm_layers(self.config.algm_layers, len(self.encoder.vit.blocks))
        check_algm_threshold(threshold)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.policy_net is not None:
            self.policy_net.eval()  # frozen: BatchNorm statistics stay those it was trained with
        return self

    def _share_scores(self, images: Tensor, labels: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """``(B, S)`` log-odds that each superpatch is uniform; the K highest share."""
        policy = self.config.policy
        if policy == "policy_net":
            with torch.no_grad():
                return self.policy_net.share_scores(images, grid)
        if policy == "oracle":
            if labels is None:
                raise ValueError("policy 'oracle' needs the label maps: call model(images, labels)")
            return torch.logit(oracle_scores(labels, self.patch_size, self.config.ignore_index))
        return torch.logit(torch.rand(images.shape[0], grid[0] * grid[1], device=images.device))

    def _decode(self, images: Tensor, shared_idx: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(B, n_cls, h, w)`` class scores on the patch grid with the ``(B, K)`` shared
        superpatches (K = 0: the plain Segmenter, no gather or scatter)."""
        layout = plan_layout(shared_idx, grid) if shared_idx.shape[1] else None
        scores = self.decoder(self.encoder(images, layout))
        if layout is not None:
            scores = unshare_tokens(scores, layout)
        return scores.transpose(1, 2).reshape(images.shape[0], -1, *grid)

    def _decode_per_image_k(
        self, images: Tensor, share: Tensor, num_shared: Tensor, grid: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Scores ``(B, n_cls, h, w)`` and shared map ``(B, S)`` with K per image, ``(B,)``:
        one forward per distinct K, so an image's result never depends on its batch."""
        scores, shared = None, torch.zeros_like(share, dtype=torch.bool)
        for k in num_shared.unique().tolist():
            rows = (num_shared == k).nonzero().squeeze(1)
            idx = select_shared(share[rows], k)
            part = self._decode(images[rows], idx, grid)
            scores = part.new_empty(images.shape[0], *part.shape[1:]) if scores is None else scores
            scores[rows] = part
            shared[rows] = shared.new_zeros(len(rows), share.shape[1]).scatter_(1, idx, True)
        return scores, shared

    def _token_scores(
        self,
        images: Tensor,
        labels: Tensor | None,
        num_tokens_shared: int | None,
        share_threshold: float | None = None,
        tome_r: int | None = None,
        algm_threshold: float | None = None,
    ) -> tuple[Tensor, Tensor, float, tuple[int, int]]:
        """Class scores on the patch grid, before upsampling.

        Returns:
            scores ``(B, n_cls, h, w)`` on the (padded) patch grid, in the compute dtype;
            shared superpatch map ``(B, hs, ws)``; tokens the encoder processed per image
            (mean over the batch); the padded image size ``(H', W')``.
        """
        height, width = images.shape[-2:]
        superpatch = superpatch_size(self.patch_size)
        pad_h, pad_w = -height % superpatch, -width % superpatch
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            if labels is not None:
                labels = F.pad(labels, (0, pad_w, 0, pad_h), value=self.config.ignore_index)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        super_grid = superpatch_grid(images.shape[-2], images.shape[-1], self.patch_size)
        padded = (images.shape[-2], images.shape[-1])
        num_superpatches = super_grid[0] * super_grid[1]

        r, algm = tome_r or 0, algm_threshold or 0.0
        if tome_r is None and algm_threshold is None:
            r, algm = self.config.tome_r, self.config.algm_threshold
        if r:
            self._check_tome(r, grid[0] * grid[1], f"image size {padded[0]}x{padded[1]}")
            return self._merged_scores(images, grid, super_grid, r) + (padded,)
        if algm:
            self._check_algm(algm)
            return self._algm_scores(images, grid, super_grid, algm) + (padded,)

        threshold = self._threshold(num_tokens_shared, share_threshold)
        if threshold is not None:
            share = self._share_scores(images, labels, super_grid)
            num_shared = threshold_num_shared(share, threshold, threshold_step(num_superpatches))
            scores, shared = self._decode_per_image_k(images, share, num_shared, grid)
            num_tokens = grid[0] * grid[1] - 3 * num_shared.double().mean().item()
            return scores, shared.view(-1, *super_grid), num_tokens, padded

        k = self.num_tokens_shared if num_tokens_shared is None else num_tokens_shared
        if self.config.policy == "none":
            k = 0
        check_num_shared(k, num_superpatches, f"image size {height}x{width}")
        shared_idx = images.new_zeros(images.shape[0], 0, dtype=torch.long)
        if k > 0:
            shared_idx = select_shared(self._share_scores(images, labels, super_grid), k)
        scores = self._decode(images, shared_idx, grid)
        num_tokens = grid[0] * grid[1] - 3 * k
        return scores, shared_mask(shared_idx, super_grid), num_tokens, padded

    def _merged_scores(
        self, images: Tensor, grid: tuple[int, int], super_grid: tuple[int, int], r: int
    ) -> tuple[Tensor, Tensor, float]:
        """ToMe: scores ``(B, n_cls, h, w)``, no superpatch shared, mean tokens per block."""
        readers = self._key_readers
        tokens = tome_features(self.encoder.vit, readers, images, r, self.config.tome_prop_attn)
        scores = self.decoder(tokens).transpose(1, 2).reshape(images.shape[0], -1, *grid)
        none_shared = images.new_zeros(images.shape[0], 0, dtype=torch.long)
        shared = shared_mask(none_shared, super_grid)
        counts = merged_token_counts(grid[0] * grid[1], r, len(self.encoder.vit.blocks))
        return scores, shared, sum(counts) / len(counts)

    def _algm_scores(
        self, images: Tensor, grid: tuple[int, int], super_grid: tuple[int, int], threshold: float
    ) -> tuple[Tensor, Tensor, float]:
        """ALGM: scores ``(B, n_cls, h, w)``, no superpatch shared, mean tokens per block."""
        merged = algm_features(self.encoder.vit, images, self.config.algm_layers, threshold)
        token_scores = self.decoder(merged.tokens, merged.valid)
        index = merged.sources[..., None].expand(-1, -1, token_scores.shape[-1])
        scores = token_scores.gather(1, index).transpose(1, 2)
        none_shared = images.new_zeros(images.shape[0], 0, dtype=torch.long)
        shared = shared_mask(none_shared, super_grid)
        return scores.reshape(images.shape[0], -1, *grid), shared, merged.mean_tokens

    def _threshold(
        self, num_tokens_shared: int | None, share_threshold: float | None
    ) -> float | None:
        """The threshold of this call: an explicit K means fixed K; policy none never shares."""
        if self.config.policy == "none" or num_tokens_shared is not None:
            return None
        threshold = self.config.share_threshold if share_threshold is None else share_threshold
        if threshold is not None:
            check_threshold(threshold)
        return threshold

    def forward(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        num_tokens_shared: int | None = None,
        upsample: bool = True,
        share_threshold: float | None = None,
        tome_r: int | None = None,
        algm_threshold: float | None = None,
    ) -> SegmenterOutput:
        """Segment images.

        Args:
            images: ``(B, 3, H, W)`` normalised; any size (padded to multiples of 2p inside).
            labels: ``(B, H, W)`` label maps, needed by the ``oracle`` policy only.
            num_tokens_shared: K for this call (default: the configured K, or the configured
                threshold; 0 with policy none).
            upsample: False returns the class scores on the patch grid of the padded image,
                ``(B, n_cls, H' / p, W' / p)``, for a loss that upsamples only the pixels it
                needs (:func:`cts.losses.subgrid_cross_entropy`).
            share_threshold: K per image for this call: the superpatches scoring at least
                this (in (0, 1)), rounded down to a multiple of S / 16.
            tome_r: ToMe for this call, ``r`` tokens merged per block, no sharing (0: off).
            algm_threshold: ALGM for this call at this local threshold, in the configured
                ``algm_layers`` (0: off). Either one given replaces the configured merging
                (``tome_r=0``: no merging of any kind); neither: the configured one.
        """
        height, width = images.shape[-2:]
        scores, shared, num_tokens, padded = self._token_scores(
            images, labels, num_tokens_shared, share_threshold, tome_r, algm_threshold
        )
        if not upsample:
            return SegmenterOutput(scores, shared, num_tokens)
        logits = F.interpolate(scores, size=padded, mode="bilinear", align_corners=False)
        return SegmenterOutput(logits[..., :height, :width], shared, num_tokens)

    def predict(
        self,
        images: Tensor,
        num_tokens_shared: int | None = None,
        share_threshold: float | None = None,
        tome_r: int | None = None,
        algm_threshold: float | None = None,
    ) -> Tensor:
        """Label map ``(B, H, W)`` (int64) of ``(B, 3, H, W)`` normalised images: the argmax
        of ``forward``'s logits (up to ties).

        Inference only: upsampling and argmax are one step
        (:func:`cts.models.upsample.upsample_argmax`) that never writes the ``(B, n_cls, H,
        W)`` scores to memory: compiled, Inductor fuses it into one kernel; eager, only the
        pixels of cells of the patch grid where several classes can win are interpolated.
        """
        height, width = images.shape[-2:]
        scores, _, _, padded = self._token_scores(
            images, None, num_tokens_shared, share_threshold, tome_r, algm_threshold
        )
        return upsample_argmax(scores, padded, (height, width))


def build_segmenter(**kwargs) -> Segmenter:
    """Build a Segmenter; keyword arguments are :class:`SegmenterConfig` fields."""
    unknown = set(kwargs) - set(SegmenterConfig.__dataclass_fields__)
    if unknown:
        allowed = ", ".join(SegmenterConfig.__dataclass_fields__)
        raise TypeError(f"unknown Segmenter option(s) {sorted(unknown)}; allowed: {allowed}")
    return Segmenter(SegmenterConfig(**kwargs))
