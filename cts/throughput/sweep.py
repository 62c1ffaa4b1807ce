"""The accuracy-vs-speed sweep of one trained model over K, over sharing thresholds, over
ToMe's ``r`` and over ALGM's threshold: which settings, and its picture."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
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


# Where a label may sit, in points from its point, in the order tried: each curve starts on
# its own side (fixed K above, thresholds below, ToMe up-left, ALGM down-right), so that
# curves meeting near the trained K keep their labels apart; the first place free of other
# labels, markers and lines wins (:func:`_place_labels`).
_ABOVE, _BELOW = ((0, 7), "center", "bottom"), ((0, -8), "center", "top")
_LEFT, _RIGHT = ((-7, 0), "right", "center"), ((7, 0), "left", "center")
_UP_LEFT, _DOWN_RIGHT = ((-5, 7), "right", "bottom"), ((5, -7), "left", "top")
_UP_RIGHT, _DOWN_LEFT = ((5, 7), "left", "bottom"), ((-5, -7), "right", "top")
_NEAR = (_ABOVE, _BELOW, _LEFT, _RIGHT, _UP_LEFT, _DOWN_RIGHT, _UP_RIGHT, _DOWN_LEFT)
_FAR = [((n * dx, n * dy), ha, va) for n in (2, 3) for (dx, dy), ha, va in _NEAR]
LABEL_PLACES = {
    "fixed": [_ABOVE, _UP_RIGHT, _UP_LEFT, _RIGHT, _LEFT, _BELOW, *_FAR],
    "threshold": [_BELOW, _DOWN_RIGHT, _DOWN_LEFT, _RIGHT, _LEFT, _ABOVE, *_FAR],
    "tome": [_UP_LEFT, _ABOVE, _LEFT, _UP_RIGHT, _RIGHT, _BELOW, *_FAR],
    "algm": [_DOWN_RIGHT, _RIGHT, _BELOW, _DOWN_LEFT, _LEFT, _ABOVE, *_FAR],
}


Label = tuple  # (the annotation, its places): what _place_labels arranges


def _label(axes, row, text: str, place: str = "fixed") -> Label:
    """A label for ``row``'s point, at its curve's first place until :func:`_place_labels`."""
    places = LABEL_PLACES[place]
    (offset, ha, va) = places[0]
    point = (row.ims_per_sec, row.mIoU)
    leader = {"arrowstyle": "-", "color": "0.6", "lw": 0.5, "shrinkA": 0, "shrinkB": 4}
    note = axes.annotate(
        text, point, textcoords="offset points", xytext=offset, fontsize=7, arrowprops=leader
    )
    note.set(ha=ha, va=va)
    return note, places


def _place_labels(figure, axes, labels: Sequence[Label]) -> None:
    """Each label at its first place that overlaps no marker, line or label placed before
    it, inside the axes; where none is free, the place that overlaps least. A label moved
    beyond the nearest places keeps a thin line to its point."""
    renderer = figure.canvas.get_renderer()
    taken = _plotted_boxes(figure, axes)  # then each label, once placed
    frame = axes.get_window_extent(renderer)
    for note, places in labels:
        costs = []
        for offset, ha, va in places:
            note.set(position=offset, ha=ha, va=va)
            box = _text_box(note, renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            cost = sum(_overlap(box, other) for other in taken) + (0 if inside else 1e6)
            costs.append((cost, offset, ha, va))
            if costs[-1][0] == 0:
                break
        _, offset, ha, va = min(costs, key=lambda cost: cost[0])
        note.set(position=offset, ha=ha, va=va)
        taken.append(_text_box(note, renderer).expanded(1.1, 1.3))  # a gap to the next
        note.arrow_patch.set_visible(offset not in [near for near, _, _ in _NEAR])


def _text_box(note, renderer):
    """The pixel box of an annotation's text, its leader line aside."""
    from matplotlib.text import Text

    note.update_positions(renderer)
    return Text.get_window_extent(note, renderer)


def _plotted_boxes(figure, axes) -> list:
    """Pixel boxes of every marker (the star's larger) and of points along the lines."""
    from matplotlib.transforms import Bbox

    boxes = []
    for line in axes.get_lines():
        points = axes.transData.transform(line.get_xydata())
        if len(points) > 1:  # 10 points on each segment, 2 px each
            steps = np.linspace(0, 1, 12)[1:-1, None, None]
            along = (points[:-1] + steps * (points[1:] - points[:-1])).reshape(-1, 2)
            boxes += [Bbox.from_bounds(x - 1, y - 1, 2, 2) for x, y in along]
        size = line.get_markersize() * figure.dpi / 72
        boxes += [Bbox.from_bounds(x - size / 2, y - size / 2, size, size) for x, y in points]
    return boxes


def _overlap(a, b) -> float:
    """Area in pixels that two boxes share."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0) * max(height, 0)


# The label of a point of each mode's curve: its setting and the (mean) tokens.
POINT_LABELS = {
    "threshold": lambda row: f"t={row.share_threshold:g} ({row.tokens:.0f})",
    "tome": lambda row: f"r={row.tome_r:g} ({row.tokens:.0f})",
    "algm": lambda row: f"t={row.algm_threshold:g} ({row.tokens:.0f})",
}


def _curve(axes, rows: pd.DataFrame, style: str, colour: str, name: str, mode: str) -> list[Label]:
    """One mode's rows as a curve, and its points' labels (nothing for no rows)."""
    if not len(rows):
        return []
    axes.plot(rows["ims_per_sec"], rows["mIoU"], style, color=colour, label=name)
    return [_label(axes, row, POINT_LABELS[mode](row), mode) for row in rows.itertuples()]


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
    labels = []
    if len(fixed):
        axes.plot(fixed["ims_per_sec"], fixed["mIoU"], "o-", color="tab:blue", label="fixed K")
        labels += [_label(axes, row, f"K={row.num_tokens_shared:g}") for row in fixed.itertuples()]
        if (fixed["num_tokens_shared"] > 0).any():  # a merging model's K row is K = 0 only
            title = f"{title}\n{token_formula(fixed)}"
    labels += _curve(axes, thresholds, "s--", "tab:green", "K per image (threshold)", "threshold")
    labels += _curve(axes, tome, "^:", "tab:purple", "ToMe, r per block", "tome")
    labels += _curve(axes, algm, "D-.", "tab:orange", "ALGM, threshold t (per image)", "algm")
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
    _place_labels(figure, axes, labels)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
