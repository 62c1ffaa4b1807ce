"""The rows of the throughput table (the paper's settings, or any backbone sharing serves)
and the policy-net settings each row can be measured with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cts.geometry import paper_num_shared, superpatch_size
from cts.models.vit import backbone_patch_size
from cts.paper import paper_setting


@dataclass(frozen=True)
class TableRow:
    """One row of the paper's throughput table (Segmenter + mask transformer, patch 16)."""

    key: str
    label: str
    backbone: str
    crop_size: int
    num_tokens_shared: int
    num_classes: int
    dataset: str


def _table_row(key: str, setting: str) -> TableRow:
    """The row of the paper's setting (:data:`cts.paper.PAPER_SETTINGS`) under ``key``."""
    row = paper_setting(setting)
    return TableRow(
        key,
        row.label,
        row.backbone,
        row.crop_size,
        row.num_tokens_shared,
        row.num_classes,
        row.dataset_label,
    )


# The settings whose throughput the authors' code was timed at (every row of their table
# but Pascal-Context ViT-S 480).
PAPER_TABLE = (
    _table_row("vit_ti_512", "ade20k-vit-ti"),
    _table_row("vit_s_512", "ade20k-vit-s"),
    _table_row("vit_b_512", "ade20k-vit-b"),
    _table_row("vit_l_640", "ade20k-vit-l-640"),
    _table_row("vit_s_768", "cityscapes-vit-s"),
)


@dataclass(frozen=True)
class PolicySetting:
    """Where the policy net looks: the image resized by ``input_scale``, the feature level of
    stride ``feature_stride``. All three settings give the same superpatch grid."""

    name: str
    input_scale: float
    feature_stride: int

    @property
    def label(self) -> str:
        return f"{self.name} (x{self.input_scale:g}, stride {self.feature_stride})"


# Multiply-adds per 512x512 image: paper (full resolution, stride 32) 1.90 G; half (the
# table's default) 0.32 G; quarter (the pipeline's default) 0.037 G, precision@103 93.8%
# against 92.3% for half on the embedded data.
POLICY_SETTINGS = {
    setting.name: setting
    for setting in (
        PolicySetting("paper", 1.0, 32),
        PolicySetting("half", 0.5, 16),
        PolicySetting("quarter", 0.25, 8),
    )
}


def resolve_policies(names: Sequence[str]) -> tuple[str, ...]:
    """Policy settings by name, each once, in the order given (empty: ``half``)."""
    unknown = [name for name in names if name not in POLICY_SETTINGS]
    if unknown:
        raise ValueError(f"policy {unknown}: allowed {', '.join(POLICY_SETTINGS)}")
    return tuple(dict.fromkeys(names)) or ("half",)


def backbone_row(key: str) -> TableRow:
    """A row for any backbone sharing serves, ``NAME`` or ``NAME@CROP``: Segmenter on
    ADE20K's 150 classes at ``CROP`` (default: 512 rounded down to a multiple of the
    superpatch, 504 for a /14 ViT), K for the paper's 30% fewer tokens (``ceil(N / 10)``)."""
    name, _, crop_text = key.partition("@")
    patch = backbone_patch_size(name)
    superpatch = superpatch_size(patch)
    crop = int(crop_text) if crop_text.isdigit() else 512 // superpatch * superpatch
    if (crop_text and not crop_text.isdigit()) or crop < superpatch or crop % superpatch:
        raise ValueError(
            f"row {key!r}: the crop must be a positive multiple of {superpatch} "
            f"(2 x {name}'s patch size), e.g. {name}@{512 // superpatch * superpatch}"
        )
    k = paper_num_shared(crop, patch)
    return TableRow(key, f"{name} {crop}", name, crop, k, 150, "ADE20K")


def select_rows(keys: Iterable[str] | None) -> tuple[TableRow, ...]:
    """Rows by key, the paper's in its order, then backbone rows (:func:`backbone_row`) in
    the order given (None or empty: the paper's rows)."""
    keys = list(keys or [])
    known = {row.key: row for row in PAPER_TABLE}
    backbones = []
    for key in (k for k in keys if k not in known):
        try:
            backbones.append(backbone_row(key))
        except ValueError as error:
            if not str(error).startswith("unknown backbone"):
                raise
            raise ValueError(
                f"unknown row {key!r}: use {', '.join(known)}, or a timm backbone name "
                "(NAME or NAME@CROP, e.g. vit_small_patch14_reg4_dinov2@504)"
            ) from error
    paper = tuple(row for row in PAPER_TABLE if not keys or row.key in keys)
    return paper + tuple(backbones)
