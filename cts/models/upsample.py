"""Labels of bilinearly upsampled class scores, without the full-resolution scores.

``F.interpolate(scores, size, mode="bilinear", align_corners=False).argmax(1)`` writes
``B x n_cls x H x W`` fp32 scores and reads them back, and the CPU argmax kernel over the
class dimension is slow (``max(1).indices``, the same labels, is up to 10x faster).
Compiled, Inductor fuses both into one kernel; eager, that step was 44 of the 181 ms a CTS
forward of the default model took on two CPU cores, and 17.7 of 30.1 ms for ViT-S on an
H200 in bf16, a cost that token sharing cannot reduce.

Inside a cell of the low-resolution grid (the pixels between two neighbouring source rows
and two neighbouring source columns: 16 x 16 pixels at patch size 16), every upsampled
value of a class is a convex combination of that class's four corner values (half-pixel
centres, clamped at the borders). So the class with the best smallest corner has at least
that value everywhere in the cell, and a class whose largest corner is below it can never
win there. :func:`upsample_argmax`

1. finds each cell's candidate classes from its four corners (a 256th of the values);
2. labels every cell left with one candidate at once: most cells of a trained model;
3. interpolates the other cells' pixels for their candidates only, in tiers of candidate
   counts (4, 16, 64, all), a chunk of cells at a time, and takes the argmax.

The labels are those of the reference formula up to rounding: only a pixel whose two best
classes differ by a few float32 ulps (a tie) can get the other one. The interpolation
weights are read off ``F.interpolate`` itself, and the values are interpolated along the
columns, then the rows, as its CPU kernel does. Where cells are small (resizing by less than
4x4 pixels per source point), the reference upsampling with the faster argmax is used.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Cells are labelled in tiers by their number of candidate classes, each tier interpolating
# only as many classes as its width; past the last tier, every class.
CANDIDATE_TIERS = (4, 16, 64)
# Below this many pixels per cell, finding the candidates costs more than it saves.
MIN_CELL_PIXELS = 16


def chunk_values(device: torch.device) -> int:
    """Values (pixels x classes) interpolated at a time: on a CPU 2**20 fp32 (4 MiB, in
    the L3 cache; 2**16-2**18 cost more in op launches than they gain in cache hits), on a
    GPU 2**26 (256 MiB: few kernel launches; not measured)."""
    return 2**20 if device.type == "cpu" else 2**26


def argmax_classes(scores: Tensor) -> Tensor:
    """``scores.argmax(1)``: the first class with the largest value, NaN counting as the
    largest, as ``max(1).indices``, which the CPU computes up to 10x faster for few classes
    (12 classes at 512 x 683: 3 against 37 ms on one core)."""
    return scores.max(1).indices


def upsample_argmax_reference(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(scores, size, bilinear).argmax(1)`` in fp32 whatever the autocast."""
    with torch.autocast(scores.device.type, enabled=False):
        upsampled = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    return upsampled.argmax(dim=1)


def _tracing() -> bool:
    """Inside torch.compile / torch.export / the TorchScript tracer (ONNX export)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class _Axis(NamedTuple):
    """1-D bilinear (``align_corners=False``) resampling: output point ``i`` is
    ``w0[i] * x[a[i]] + w1[i] * x[b[i]]`` with ``b = a + 1``, or ``b = a`` where the second
    weight is 0 (the clamped borders, points on a source point)."""

    a: Tensor
    b: Tensor
    w0: Tensor
    w1: Tensor


class _Pairs(NamedTuple):
    """The output rows (or columns) grouped by the pair of source rows they lie between;
    the rows of a pair are consecutive: pair ``p`` covers ``start[p] .. start[p] +
    count[p] - 1``.

    a, b: ``(P,)`` source rows; start: ``(P,)``; pair_of_row: ``(n_rows,)``; w0, w1:
    ``(P, F)`` weights of the pair's rows (F = the largest count; 0 past the count); valid:
    ``(P, F)`` which of them exist.
    """

    a: Tensor
    b: Tensor
    start: Tensor
    pair_of_row: Tensor
    w0: Tensor
    w1: Tensor
    valid: Tensor


def _axis(n_in: int, n_out: int) -> _Axis:
    """The taps F.interpolate uses to resample ``n_in`` points to ``n_out`` (read off its
    output for the identity: the weights are its own, rounding included)."""
    identity = torch.eye(n_in, dtype=torch.float32).unsqueeze(0)  # channel k = basis e_k
    matrix = F.interpolate(identity, size=n_out, mode="linear", align_corners=False)[0].T
    a = (matrix > 0).to(torch.uint8).argmax(1)  # the first tap: its weight is > 0
    b = (a + 1).clamp(max=n_in - 1)
    w1 = matrix.gather(1, b[:, None])[:, 0]
    second = (b > a) & (w1 > 0)
    b, w1 = torch.where(second, b, a), torch.where(second, w1, 0.0)
    return _Axis(a, b, matrix.gather(1, a[:, None])[:, 0], w1)


@functools.lru_cache(maxsize=64)
def _pairs(n_in: int, n_out: int, n_rows: int, device: torch.device) -> _Pairs:
    """:class:`_Pairs` of the first ``n_rows`` output points of ``n_in -> n_out``."""
    # Ordinary tensors even when first asked for under inference_mode, so that a later call
    # with gradients enabled may use them.
    with torch.inference_mode(False), torch.no_grad():
        axis = _axis(n_in, n_out)
        a, b = axis.a[:n_rows], axis.b[:n_rows]
        new = torch.ones(n_rows, dtype=torch.bool)
        new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        start = new.nonzero().squeeze(1)
        count = torch.diff(start, append=torch.tensor([n_rows]))
        pair_of_row = new.cumsum(0) - 1
        offset = torch.arange(n_rows) - start[pair_of_row]
        shape = (len(start), int(count.max()))
        w0, w1 = torch.zeros(shape), torch.zeros(shape)
        w0[pair_of_row, offset] = axis.w0[:n_rows]
        w1[pair_of_row, offset] = axis.w1[:n_rows]
        valid = torch.arange(shape[1]) < count[:, None]
        parts = (a[start], b[start], start, pair_of_row, w0, w1, valid)
        return _Pairs(*(x.contiguous().to(device) for x in parts))


def upsample_argmax(
    scores: Tensor, size: tuple[int, int], out_size: tuple[int, int] | None = None
) -> Tensor:
    """``(B, n_cls, h, w)`` scores -> ``(B, H', W')`` int64 labels of their bilinear
    upsampling to ``size = (H, W)``, cropped to its top-left ``out_size = (H', W')``
    (default: ``size``).

    The labels of ``F.interpolate(scores.float(), size, mode="bilinear",
    align_corners=False).argmax(1)[:, :H', :W']`` up to ties, computed in fp32 whatever the
    autocast (bf16 upsampled scores would flip near-tied pixels), without materialising the
    ``(B, n_cls, H, W)`` scores (module docstring). Under ``torch.compile`` /
    ``torch.export`` / tracing the reference formula is traced instead: Inductor fuses it
    into one kernel that never writes the scores, and ONNX has Resize and ArgMax.
    """
    height, width = size
    out_h, out_w = out_size or size
    if not (0 < out_h <= height and 0 < out_w <= width):
        raise ValueError(f"out_size {out_size} must be positive and within size {size}")
    if _tracing():
        return upsample_argmax_reference(scores, size)[:, :out_h, :out_w]
    h, w = scores.shape[-2:]
    if (h, w) == (height, width):  # nothing to resample
        return argmax_classes(scores[:, :, :out_h, :out_w].float())
    with torch.autocast(scores.device.type, enabled=False):
        # inf x a weight of 0 is NaN in the cells' arithmetic, not in the reference's.
        small = height * width < MIN_CELL_PIXELS * h * w
        if small or scores.numel() == 0 or not bool(torch.isfinite(scores).all()):
            upsampled = F.interpolate(
                scores.float(), size=size, mode="bilinear", align_corners=False
            )
            return argmax_classes(upsampled[:, :, :out_h, :out_w])
        return _upsample_argmax(scores.float(), (height, width), (out_h, out_w))


def _upsample_argmax(scores: Tensor, size: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
    batch, classes, h, w = scores.shape
    out_h, out_w = out_size
    device = scores.device
    ys, xs = _pairs(h, size[0], out_h, device), _pairs(w, size[1], out_w, device)
    grid = (batch, len(ys.a), len(xs.a))

    # 1. The four corners of every cell (image, row pair, column pair), classes last (the
    # decoder's scores are already laid out so): (cells, C) each.
    channels_last = scores.permute(0, 2, 3, 1)
    corners = []
    for rows in (channels_last.index_select(1, ys.a), channels_last.index_select(1, ys.b)):
        for columns in (xs.a, xs.b):
            corners.append(rows.index_select(2, columns).reshape(-1, classes))

    # 2. Inside a cell every value is a convex combination of the class's corner values, and
    # the class with the best smallest corner has at least that value everywhere: a class
    # whose largest corner is below it never wins there.
    low = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(*corners[2:]))
    high = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(*corners[2:]))
    candidate = high >= low.amax(-1, keepdim=True)
    count = candidate.sum(-1)  # >= 1
    cell, cls = candidate.nonzero(as_tuple=True)  # by cell, then ascending class
    first = count.cumsum(0) - count  # the cell's first entry in (cell, cls)
    cell_labels = cls[first]  # the label of a cell left with one class (most cells)
    labels = _expand(cell_labels.view(grid), ys.pair_of_row, xs.pair_of_row)

    # 3. The pixels of the other cells from their candidates, in tiers of candidate counts;
    # the last tier takes every class. Candidates ascend, so the first maximum among them is
    # the reference's.
    entry_count = count[cell]
    slot = torch.arange(len(cell), device=device) - first[cell]  # rank among its candidates
    lower = 1
    for width in (*[t for t in CANDIDATE_TIERS if t < classes], classes):
        cells = ((count > lower) & (count <= width)).nonzero().squeeze(1)
        if len(cells):
            table = None
            if width < classes:
                # (n, width) candidate classes, padded with the first one (a repeat never
                # wins the argmax over the slot before it).
                rank = torch.full_like(count, -1)
                rank[cells] = torch.arange(len(cells), device=device)
                keep = ((entry_count > lower) & (entry_count <= width)).nonzero().squeeze(1)
                table = cell_labels[cells, None].repeat(1, width)
                table[rank[cell[keep]], slot[keep]] = cls[keep]
            _label_cells(labels.view(-1), cells, table, corners, ys, xs, grid)
        lower = width
    return labels


def _expand(cell_labels: Tensor, row_cells: Tensor, column_cells: Tensor) -> Tensor:
    """``(B, Py, Px)`` -> ``(B, len(row_cells), len(column_cells))``: each pixel gets its
    cell's value. Selecting whole rows is a copy of contiguous memory, selecting columns
    is not, so the columns are selected on the transposed small map."""
    by_column = cell_labels.transpose(1, 2).index_select(1, column_cells)  # (B, W', Py)
    return by_column.transpose(1, 2).contiguous().index_select(1, row_cells)


def _label_cells(
    flat_labels: Tensor,
    cells: Tensor,
    table: Tensor | None,
    corners: list[Tensor],
    ys: _Pairs,
    xs: _Pairs,
    grid: tuple[int, int, int],
) -> None:
    """Write the labels of the pixels of ``cells`` (``(n,)`` indices into the ``(cells, C)``
    corner values), the argmax among the classes of ``table`` (``(n, width)``) or, if None,
    all classes; a chunk of cells at a time."""
    _, num_y, num_x = grid
    out_h, out_w = len(ys.pair_of_row), len(xs.pair_of_row)
    classes = corners[0].shape[1]
    width = classes if table is None else table.shape[1]
    per_y, per_x = ys.w0.shape[1], xs.w0.shape[1]
    device = cells.device
    rows, columns = torch.arange(per_y, device=device), torch.arange(per_x, device=device)
    offset = rows[:, None] * out_w + columns  # (Fy, Fx) from a cell's first pixel
    step = max(1, chunk_values(device) // (per_y * per_x * width))
    for start in range(0, len(cells), step):
        chunk = cells[start : start + step]
        choice = None if table is None else table[start : start + step]
        if choice is None:
            values = [corner.index_select(0, chunk) for corner in corners]
        else:
            index = (chunk[:, None] * classes + choice).view(-1)
            values = [corner.view(-1).index_select(0, index).view(-1, width) for corner in corners]
        py, px = chunk // num_x % num_y, chunk % num_x
        weights = [ys.w0.index_select(0, py), ys.w1.index_select(0, py)]  # (n, Fy)
        weights += [xs.w0.index_select(0, px), xs.w1.index_select(0, px)]  # (n, Fx)
        best = _argmax_upsampled(values, weights, choice)  # (n, Fy, Fx)

        # Pixels past a border cell's rows or columns (Fy x Fx is the largest cell) write
        # the cell's first pixel again, with its value: no mask, no conflicting writes.
        image = chunk // (num_x * num_y)
        ystart, xstart = ys.start.index_select(0, py), xs.start.index_select(0, px)
        first_pixel = ((image * out_h + ystart) * out_w + xstart)[:, None, None]
        valid = ys.valid.index_select(0, py)[:, :, None] & xs.valid.index_select(0, px)[:, None]
        pixels = torch.where(valid, first_pixel + offset, first_pixel)
        best = torch.where(valid, best, best[:, :1, :1])
        flat_labels.index_put_((pixels.view(-1),), best.view(-1))


def _argmax_upsampled(values: list[Tensor], weights: list[Tensor], choice: Tensor | None) -> Tensor:
    """First argmax over the classes of the bilinear interpolation inside cells.

    values: the four corners' ``(n, width)`` values (top-left, top-right, bottom-left,
    bottom-right); weights: ``(n, Fy)`` of the top and bottom row and ``(n, Fx)`` of the
    left and right column per pixel; choice: ``(n, width)`` the classes of the values
    (None: width is every class). Returns ``(n, Fy, Fx)`` class indices.
    """
    wy0, wy1, wx0, wx1 = weights
    n = values[0].shape[0]
    # Along the columns, then the rows, as F.interpolate's CPU kernel: (n, width, Fy, Fx),
    # each class's pixels contiguous, where max(1) is fastest.
    top = torch.addcmul(values[0][..., None] * wx0[:, None], values[1][..., None], wx1[:, None])
    bottom = torch.addcmul(values[2][..., None] * wx0[:, None], values[3][..., None], wx1[:, None])
    upsampled = top[:, :, None] * wy0[:, None, :, None]
    upsampled.addcmul_(bottom[:, :, None], wy1[:, None, :, None])
    best = argmax_classes(upsampled)
    if choice is None:
        return best
    return choice.gather(1, best.view(n, -1)).view_as(best)
