"""Pictures of predictions: class colours over the image, shared superpatches outlined, a
legend of the classes shown, panel titles and captions, the confusion matrix.

Arrays are RGB ``(H, W, 3)`` uint8 unless a docstring says otherwise; text is OpenCV's
Hershey font, sized by the picture's width so that it stays legible on small and large ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from cts.data.io import write_image

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK = (0, 0, 0)
PAPER = 255
SWATCH_BORDER = (96, 96, 96)  # so that a white or pale class colour still shows as a swatch
MIN_WIDTH = 360  # narrower pictures are padded so that the legend and caption fit
IGNORE_COLOUR = (0, 0, 0)  # colorize's colour for the ignore label


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB colours, distinct and stable for a given count."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)
    return colours


# Rows per step of colorize / overlay: their temporaries (an index array of 8 bytes per
# pixel, float blends) stay a few MB on a 6000 x 6000 picture instead of gigabytes.
BAND_PIXELS = 2**20


def _row_bands(shape: tuple[int, ...]):
    step = max(1, BAND_PIXELS // max(1, shape[1]))
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def colorize(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8; ignore is black, an id past the palette
    gets its last colour."""
    top = max(int(labels.max(initial=0)), ignore_index, len(colours) - 1)
    table = np.empty((top + 1, 3), np.uint8)
    table[:] = colours[-1]
    table[: len(colours)] = colours
    if ignore_index >= 0:
        table[ignore_index] = IGNORE_COLOUR
    out = np.empty((*labels.shape, 3), np.uint8)
    for rows in _row_bands(labels.shape):
        out[rows] = table[labels[rows].clip(0, None)]
    return out


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5):
    """Blend a colourised label map ``(H, W)`` over an RGB image ``(H, W, 3)`` uint8."""
    out = colorize(labels, colours)
    for rows in _row_bands(labels.shape):
        blend = (1 - alpha) * image[rows].astype(np.float32) + alpha * out[rows]
        out[rows] = blend.clip(0, 255).astype(np.uint8)
    return out


def outline_shared(image: np.ndarray, shared: np.ndarray, superpatch: int) -> np.ndarray:
    """Frame every shared superpatch with a black line outside a white one, so that the frame
    shows on pale and dark regions alike; ``shared`` is ``(hs, ws)`` bool, one per
    ``superpatch x superpatch`` pixel square of ``image``."""
    out = image.copy()
    cells = shared.astype(np.uint8)
    for offset, value in ((0, 0), (1, 255)):
        ring = np.zeros((superpatch, superpatch), np.uint8)
        inner = slice(offset, superpatch - offset)
        ring[offset, inner] = ring[-1 - offset, inner] = 1
        ring[inner, offset] = ring[inner, -1 - offset] = 1
        mask = np.kron(cells, ring).astype(bool)  # (hs * superpatch, ws * superpatch)
        height, width = min(mask.shape[0], out.shape[0]), min(mask.shape[1], out.shape[1])
        out[:height, :width][mask[:height, :width]] = value
    return out


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
    """``(3, H, W)`` normalised float -> ``(H, W, 3)`` uint8 RGB."""
    pixels = image.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return (pixels * 255).clip(0, 255).astype(np.uint8)


def classes_present(*label_maps: np.ndarray, ignore_index: int = 255) -> list[int]:
    """The class ids (non-negative integers) in any of the ``(H, W)`` label maps, most pixels
    first; ignore left out. Counted a band of rows at a time: a 6000 x 6000 map takes 0.1 s
    and no copy, where sorting it (``np.unique``) took 2 s and two."""
    counts = np.zeros(0, np.int64)
    for labels in label_maps:
        for rows in _row_bands(labels.shape):
            band = np.bincount(labels[rows].ravel())
            size = max(len(counts), len(band))
            counts = np.pad(counts, (0, size - len(counts))) + np.pad(band, (0, size - len(band)))
    if 0 <= ignore_index < len(counts):
        counts[ignore_index] = 0
    ids = np.flatnonzero(counts)
    return [int(i) for i in ids[np.argsort(-counts[ids], kind="stable")]]


def legend_entries(
    ids: Sequence[int], names: Sequence[str], colours: np.ndarray
) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, RGB colour)`` per class id, for :func:`legend`."""
    return [(names[i], tuple(int(c) for c in colours[i])) for i in ids]


def class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """``names`` checked against the number of classes, or ``class 0``, ``class 1``, ..."""
    if names is None:
        return [f"class {i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for a model of {num_classes} classes")
    return list(names)


def font_scale(width: int) -> float:
    """OpenCV font scale for text on a picture ``width`` pixels wide (15 to 40 px a line)."""
    return float(np.clip(width / 1300, 0.45, 1.2))


def _thickness(scale: float) -> int:
    return max(1, round(scale * 1.6))


def _text_size(text: str, scale: float) -> tuple[int, int, int]:
    """Width, height above the baseline and depth below it, in pixels."""
    (width, height), depth = cv2.getTextSize(text, FONT, scale, _thickness(scale))
    return width, height, depth


def _wrap(text: str, width: int, scale: float) -> list[str]:
    """Greedy word wrap to lines at most ``width`` pixels wide (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and _text_size(candidate, scale)[0] <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def text_strip(
    text: str, width: int, scale: float | None = None, centre: bool = False
) -> np.ndarray:
    """``(h, width, 3)`` uint8: ``text`` wrapped to the width, black on white."""
    scale = scale or font_scale(width)
    pad = max(4, round(10 * scale))
    lines = _wrap(text, width - 2 * pad, scale)
    _, above, below = _text_size("Ag", scale)
    line = above + below + pad // 2
    strip = np.full((2 * pad + len(lines) * line, width, 3), PAPER, np.uint8)
    for i, words in enumerate(lines):
        x = (width - _text_size(words, scale)[0]) // 2 if centre else pad
        y = pad + i * line + above
        cv2.putText(strip, words, (x, y), FONT, scale, INK, _thickness(scale), cv2.LINE_AA)
    return strip


def legend(
    entries: Sequence[tuple[str, tuple[int, int, int]]], width: int, scale: float | None = None
) -> np.ndarray:
    """``(h, width, 3)`` uint8: a colour swatch and a name per entry, in rows that fit the width.

    ``entries`` are ``(name, RGB colour)``, e.g. from :func:`legend_entries`.
    """
    scale = scale or font_scale(width)
    pad = max(4, round(10 * scale))
    _, above, below = _text_size("Ag", scale)
    swatch = above + below
    row = swatch + pad // 2
    places, x, y = [], pad, pad
    for name, _ in entries:
        item = swatch + pad // 2 + _text_size(name, scale)[0]
        if x > pad and x + item > width - pad:  # next row
            x, y = pad, y + row
        places.append((x, y))
        x += item + 2 * pad
    strip = np.full((y + row + pad if entries else 0, width, 3), PAPER, np.uint8)
    for (name, colour), (x, y) in zip(entries, places, strict=True):
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), colour, cv2.FILLED)
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), SWATCH_BORDER, 1)
        origin = (x + swatch + pad // 2, y + above)
        cv2.putText(strip, name, origin, FONT, scale, INK, _thickness(scale), cv2.LINE_AA)
    return strip


def pad_width(picture: np.ndarray, width: int) -> np.ndarray:
    """``picture`` with white columns added on the right up to ``width``."""
    extra = width - picture.shape[1]
    if extra <= 0:
        return picture
    return np.pad(picture, ((0, 0), (0, extra), (0, 0)), constant_values=PAPER)


def annotate(
    picture: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]], caption: str
) -> np.ndarray:
    """``picture`` on top, then the legend of ``entries``, then the caption; the picture's
    pixels are unchanged at its top left (white padding where the text needs more width)."""
    width = max(picture.shape[1], MIN_WIDTH)
    scale = font_scale(width)
    parts = [pad_width(picture, width), legend(entries, width, scale)]
    return np.concatenate([*parts, text_strip(caption, width, scale)], axis=0)


def titled_panels(panels: Sequence[tuple[str, np.ndarray]], gap: int = 8) -> np.ndarray:
    """Panels ``(title, (H, W, 3))`` of one height side by side, each with its title above,
    ``gap`` white pixels between them."""
    width = sum(p.shape[1] for _, p in panels) + gap * (len(panels) - 1)
    scale = font_scale(width)
    titles = [text_strip(title, panel.shape[1], scale, True) for title, panel in panels]
    height = max(t.shape[0] for t in titles)  # a title wrapped on a narrow panel: all as tall
    columns = []
    for i, (title, (_, panel)) in enumerate(zip(titles, panels, strict=True)):
        title = np.pad(title, ((0, height - title.shape[0]), (0, 0), (0, 0)), constant_values=PAPER)
        columns.append(np.concatenate([title, panel]))
        if i < len(panels) - 1:
            columns.append(np.full((height + panel.shape[0], gap, 3), PAPER, np.uint8))
    return np.concatenate(columns, axis=1)


def colour_bar(height: int, width: int, colormap: int = cv2.COLORMAP_VIRIDIS) -> np.ndarray:
    """``(height, width, 3)`` RGB: the colormap from its top value (255) down to 0."""
    ramp = np.linspace(255, 0, height).round().astype(np.uint8)[:, None]
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, colormap), cv2.COLOR_BGR2RGB)
    return np.repeat(bar, width, axis=1)


def confusion_picture(rows: np.ndarray, names: Sequence[str], cell: int) -> np.ndarray:
    """Heat map of a row-normalised ``(C, C)`` confusion matrix (rows: true class, columns:
    predicted class, values 0..1) with class names, axis titles and a 0-100% colour scale.

    Returns ``(H, W, 3)`` uint8 RGB; cell ``(i, j)`` is the square of ``cell`` pixels at
    ``(top + i * cell, left + j * cell)`` of :func:`confusion_layout`.
    """
    num = len(names)
    heat = cv2.applyColorMap(np.round(rows * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    size = (num * cell, num * cell)
    heat = cv2.resize(cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), size, interpolation=cv2.INTER_NEAREST)
    name_scale = min(cell / 30, 0.5)
    top, left, margin, axis_scale = confusion_layout(names, cell)
    _, above, below = _text_size("Ag", axis_scale)
    bar_width = max(12, cell // 2)
    ticks = ("100%", "50%", "0%")
    tick_width = max(_text_size(t, axis_scale)[0] for t in ticks)
    side = 3 * above + bar_width + tick_width  # gap, bar, gap, tick labels, gap
    size = (top + heat.shape[0] + 2 * above, left + heat.shape[1] + side, 3)
    canvas = np.full(size, PAPER, np.uint8)
    canvas[top:, left:][: heat.shape[0], : heat.shape[1]] = heat

    thick = _thickness(name_scale)
    # cv2.putText cannot write vertically: draw the column names as rows, then rotate.
    columns = np.full((heat.shape[1], margin, 3), PAPER, np.uint8)
    for i, name in enumerate(names):
        width, height, _ = _text_size(name, name_scale)
        baseline = i * cell + (cell + height) // 2
        right_aligned = (left - width - 4, top + baseline)
        cv2.putText(canvas, name, right_aligned, FONT, name_scale, INK, thick, cv2.LINE_AA)
        cv2.putText(columns, name, (4, baseline), FONT, name_scale, INK, thick, cv2.LINE_AA)
    canvas[top - margin : top, left : left + heat.shape[1]] = cv2.rotate(
        columns, cv2.ROTATE_90_COUNTERCLOCKWISE
    )

    thick = _thickness(axis_scale)
    title = "predicted class"
    x = left + (heat.shape[1] - _text_size(title, axis_scale)[0]) // 2
    cv2.putText(canvas, title, (x, above + below), FONT, axis_scale, INK, thick, cv2.LINE_AA)
    title = "true class"
    strip = np.full((above + 2 * below, heat.shape[0], 3), PAPER, np.uint8)
    x = (heat.shape[0] - _text_size(title, axis_scale)[0]) // 2
    cv2.putText(strip, title, (x, above), FONT, axis_scale, INK, thick, cv2.LINE_AA)
    vertical = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    canvas[top : top + heat.shape[0], : vertical.shape[1]] = vertical

    x = left + heat.shape[1] + above
    canvas[top : top + heat.shape[0], x : x + bar_width] = colour_bar(heat.shape[0], bar_width)
    for tick, fraction in zip(ticks, (0, 0.5, 1), strict=True):
        y = top + round(fraction * (heat.shape[0] - 1))
        y = int(np.clip(y + above // 2, top + above, top + heat.shape[0] + above))
        origin = (x + bar_width + above // 2, y)
        cv2.putText(canvas, tick, origin, FONT, axis_scale, INK, thick, cv2.LINE_AA)
    caption = "each row: where the pixels of that true class went, in % of them"
    return np.concatenate([canvas, text_strip(caption, canvas.shape[1], axis_scale)])


def confusion_layout(names: Sequence[str], cell: int) -> tuple[int, int, int, float]:
    """Where :func:`confusion_picture` puts the heat map: ``(top, left)`` of its first cell,
    the width of the class-name margin and the font scale of the axis titles."""
    name_scale = min(cell / 30, 0.5)
    margin = max(_text_size(name, name_scale)[0] for name in names) + 8
    axis_scale = 0.5
    _, above, below = _text_size("Ag", axis_scale)
    title = above + 2 * below
    return title + margin, title + margin, margin, axis_scale


def confusion_matrix_image(
    confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, cell=None
) -> Path:
    """Write a ``(C, C)`` confusion matrix of pixel counts as a labelled PNG heat map
    (atomically), row-normalised: each row shows where that true class's pixels went, in %
    of them, on the 0-100% colour scale beside it. Classes without gt pixels get an empty
    (dark) row. ``cell``: pixels per matrix cell (default: about 1200 for the whole matrix).
    """
    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    cell = cell or int(np.clip(1200 // len(class_names), 6, 40))
    return write_image(path, confusion_picture(rows, class_names, cell))


def eval_scene(
    rgb: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    shared: np.ndarray,
    superpatch: int,
    names: Sequence[str],
    colours: np.ndarray,
    title: str,
    ignore_index: int = 255,
) -> np.ndarray:
    """The evaluation report's picture of one image: input | prediction (shared superpatches
    outlined) | ground truth, titled, a legend of the classes in prediction and ground truth
    (and of ignore where the ground truth has it), a caption that starts with ``title``.

    ``rgb`` ``(H, W, 3)``; ``prediction``, ``truth`` ``(H, W)`` ids; ``shared`` ``(hs, ws)``
    bool, one per ``superpatch x superpatch`` square.
    """
    panels = titled_panels(
        [
            ("input", rgb),
            ("prediction", outline_shared(overlay(rgb, prediction, colours), shared, superpatch)),
            ("ground truth", overlay(rgb, truth, colours)),
        ]
    )
    present = classes_present(prediction, truth, ignore_index=ignore_index)
    entries = legend_entries(present, names, colours)
    if (truth == ignore_index).any():
        entries.append(("ignore (not scored)", IGNORE_COLOUR))
    k = int(shared.sum())
    caption = (
        f"{title}. Prediction with K={k}: {k} of {shared.size} superpatches "
        f"({superpatch}x{superpatch} px) shared one token each, outlined black and white. "
        "Class colours blended half over the input."
    )
    return annotate(panels, entries, caption)
