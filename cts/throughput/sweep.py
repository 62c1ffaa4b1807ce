"""The accuracy-vs-speed sweep of one trained model over K, over sharing thresholds, over
ToMe's ``r`` and over ALGM's threshold: which settings, and its picture."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pandas as pd

from cts.geometry import check_num_shared, num_patches, num_superpatches, tokens_kept
from cts.merging import check_merge_count
from cts.models import Segmenter
from cts.models.algm import check_algm_layers
from cts.models.tome import tome_refusal
from cts.sharing import check_threshold


def sweep_ks(values: Sequence[int], model: Segmenter) -> list[int]:
    """The K to measure, ascending: the swept values and the model's own (none: no sweep),
    each checked against the trained crop before any work. Without a policy every K is the
    plain Segmenter: measured once, at K = 0."""
    ks = sorted({*values, model.num_tokens_shared}) if values else []
    crop = model.config.crop_size
    superpatches = num_superpatches(crop, model.patch_size)
    for k in ks:
        check_num_shared(k, superpatches, f"crop_size {crop}")
    if model.config.policy == "none" and ks:
        return [0]
    return ks


def token_formula(table: pd.DataFrame) -> str:
    """The tokens of a forward as a formula of K, from a non-empty sweep table: a shared
    superpatch (2x2 patches) is one token instead of four."""
    tokens, k = int(table["tokens"].iloc[0]), int(table["num_tokens_shared"].iloc[0])
    # tokens = tokens_kept(N, K) = N - 3K, linear in N: N = tokens - tokens_kept(0, K).
    num_patch_tokens = tokens - tokens_kept(0, k)
    return (
        f"tokens = {num_patch_tokens} − 3·K   (a shared superpatch of 2×2 patches: 1 token, not 4)"
    )


def check_thresholds(values: Sequence[float]) -> list[float]:
    """The sharing thresholds to measure, ascending, each in (0, 1)."""
    for value in values:
        check_threshold(value)
    return sorted(set(values))


def check_tome_rs(values: Sequence[int], model: Segmenter) -> list[int]:
    """ToMe's ``r`` to measure, ascending, each one the trained crop and depth allow, with
    the model's own ``r`` where it was trained merging (none: no sweep); none where the
    backbone cannot merge (rotary positions): said in one line, before any work."""
    if not values:
        return []
    values = [*values, *([model.config.tome_r] if model.config.tome_r else [])]
    reason = tome_refusal(model.encoder.vit)
    if reason is not None:
        raise ValueError(f"sweep_tome_r: {model.config.backbone} cannot merge tokens: {reason}")
    crop, depth = model.config.crop_size, len(model.encoder.vit.blocks)
    for r in values:
        check_merge_count(r, num_patches(crop, model.patch_size), depth, f"crop_size {crop}")
    return sorted(set(values))


def check_algm_thresholds(values: Sequence[float], model: Segmenter) -> list[float]:
    """ALGM's local thresholds to measure, ascending, each in (0, 1), with the model's own
    where it was trained merging so; none where the backbone cannot merge or the model's
    ``algm_layers`` do not fit its depth: said in one line, before any work."""
    if not values:
        return []
    values = [*values, *([model.config.algm_threshold] if model.config.algm_threshold else [])]
    reason = tome_refusal(model.encoder.vit)
    if reason is not None:
        raise ValueError(
            f"sweep_algm_thresholds: {model.config.backbone} cannot merge tokens: {reason}"
        )
    check_algm_layers(model.config.algm_layers, len(model.encoder.vit.blocks))
    for value in values:
        check_threshold(value)
    return sorted(set(values))


def _column_set(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table:
        return pd.Series(False, index=table.index)
    return table[column].notna()


MODES = ("share_threshold", "tome_r", "algm_threshold")  # the column set on each mode's rows


def _by_mode(table: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    """The fixed-K rows, then the rows of each of :data:`MODES` (threshold, ToMe, ALGM)."""
    masks = [_column_set(table, column) for column in MODES]
    fixed = ~pd.concat(masks, axis=1).any(axis=1)
    return (table[fixed], *(table[mask] for mask in masks))


# Where each curve writes its labels, in points from the point: the fixed-K curve above, the
# threshold curve below and ToMe's to the left, so three curves that meet near the trained K
# do not print over each other.
LABEL_PLACES = {
    "fixed": ((0, 8), "center", "bottom"),
    "threshold": ((0, -9), "center", "top"),
    "tome": ((-6, 10), "right", "bottom"),
    "algm": ((6, -4), "left", "top"),
}


def _label(axes, row, text: str, place: str = "fixed") -> None:
    # Short labels: neighbouring K can sit less than an im/s apart, where two-line labels
    # beside the points overprinted each other.
    offset, ha, va = LABEL_PLACES[place]
    axes.annotate(
        text,
        (row.ims_per_sec, row.mIoU),
        textcoords="offset points",
        xytext=offset,
        ha=ha,
        va=va,
        fontsize=7,
    )


# The label of a point of each mode's curve: its setting and the (mean) tokens.
POINT_LABELS = {
    "threshold": lambda row: f"t={row.share_threshold:g} ({row.tokens:.0f})",
    "tome": lambda row: f"r={row.tome_r:g} ({row.tokens:.0f})",
    "algm": lambda row: f"t={row.algm_threshold:g} ({row.tokens:.0f})",
}


def _curve(axes, rows: pd.DataFrame, style: str, colour: str, name: str, mode: str) -> None:
    """One mode's rows as a labelled curve (nothing for no rows)."""
    if len(rows):
        axes.plot(rows["ims_per_sec"], rows["mIoU"], style, color=colour, label=name)
        for row in rows.itertuples():
            _label(axes, row, POINT_LABELS[mode](row), mode)


def plot_curve(
    table: pd.DataFrame, own_k: int, title: str, own: tuple[str, float] | None = None
) -> bytes:
    """PNG of mIoU against im/s: one curve over K (each point labelled with its K), one over
    sharing thresholds (K per image, labelled with the threshold and the mean tokens), one
    over ToMe's ``r`` and one over ALGM's threshold (labelled with the setting and the mean
    tokens per block), on the same axes; the model's trained setting starred: its K, or
    ``own`` (``("tome_r", r)`` / ``("algm_threshold", t)``) for a model trained merging.

    ``table``: one row per setting with ``num_tokens_shared``, ``tokens``, ``mIoU`` and
    ``ims_per_sec``, and ``share_threshold`` / ``tome_r`` / ``algm_threshold`` (empty on
    fixed-K rows); an empty table gives a picture that says there was no sweep.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    fixed, thresholds, tome, algm = _by_mode(table)
    if len(fixed):
        axes.plot(fixed["ims_per_sec"], fixed["mIoU"], "o-", color="tab:blue", label="fixed K")
        for row in fixed.itertuples():
            _label(axes, row, f"K={row.num_tokens_shared:g}")
        if (fixed["num_tokens_shared"] > 0).any():  # a merging model's K row is K = 0 only
            title = f"{title}\n{token_formula(fixed)}"
    _curve(axes, thresholds, "s--", "tab:green", "K per image (threshold)", "threshold")
    _curve(axes, tome, "^:", "tab:purple", "ToMe, r per block", "tome")
    _curve(axes, algm, "D-.", "tab:orange", "ALGM, threshold t (per image)", "algm")
    column, value = own or ("num_tokens_shared", own_k)
    rows = {"num_tokens_shared": fixed, "tome_r": tome, "algm_threshold": algm}[column]
    star = rows[rows[column] == value] if len(rows) else rows
    axes.plot(star["ims_per_sec"], star["mIoU"], "*", color="tab:red", ms=14, label="trained")
    if len(table):
        axes.margins(x=0.12, y=0.2)  # room for the labels inside the frame
        # Where the points leave room: lower left under a CTS model's falling curve, else
        # wherever no point is (a merging model's no-reduction point sits low and left).
        axes.legend(loc="lower left" if len(fixed) > 1 else "best", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no K sweep: sweep_tokens_shared is empty", ha="center")
    axes.set_xlabel("images / s (benchmark batch)")
    axes.set_ylabel("single-scale val mIoU (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
