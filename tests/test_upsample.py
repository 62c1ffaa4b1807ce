"""upsample_argmax: the labels of F.interpolate(bilinear) + argmax without the full scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import cts.models.upsample as upsample
from cts.data.synthetic import render_scene
from cts.models.upsample import argmax_classes, upsample_argmax

MARGIN = 1e-4  # pixels whose two best upsampled scores are closer count as ties


def reference(scores: torch.Tensor, size, out_size=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of the old formula and, per pixel, whether it is a tie."""
    upsampled = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    if out_size is not None:
        upsampled = upsampled[:, :, : out_size[0], : out_size[1]]
    top2 = upsampled.topk(min(2, upsampled.shape[1]), dim=1).values
    tie = (top2[:, 0] - top2[:, -1] <= MARGIN) & (upsampled.shape[1] > 1)
    return upsampled.argmax(1), tie


def decoder_layout(scores: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` with classes innermost in memory, as the decoder's scores are."""
    return scores.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def trained_like_scores(batch: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Scores a trained model would give on the patch grid of synthetic scenes: log of each
    class's share of the 16x16 patch, plus noise (confident inside regions, mixed at
    boundaries), ``(B, C, 32, 32)``."""
    rng = np.random.default_rng(seed)
    labels = torch.stack(
        [torch.from_numpy(render_scene(512, 12, rng)[1].astype(np.int64)) for _ in range(batch)]
    )
    labels = torch.where(labels < classes, labels, 0)  # the ignore value, if any
    share = F.avg_pool2d(F.one_hot(labels, classes).permute(0, 3, 1, 2).float(), 16)
    noise = torch.randn(share.shape, generator=torch.Generator().manual_seed(seed))
    return decoder_layout(4 * torch.log(share + 0.02) + 0.3 * noise)


@pytest.fixture(params=["cells", "default"])
def method(request, monkeypatch):
    """``cells``: the cell method for every size (the default keeps it to cells of at least
    16 pixels and resamples smaller ratios with F.interpolate)."""
    if request.param == "cells":
        monkeypatch.setattr(upsample, "MIN_CELL_PIXELS", 0)
    return request.param


@pytest.mark.parametrize(
    ("grid", "size", "out_size"),
    [
        ((32, 32), (512, 512), None),  # patch 16, the paper's crop
        ((8, 7), (128, 112), (120, 100)),  # padded to superpatches, cropped back (odd sizes)
        ((5, 9), (83, 131), (83, 130)),  # a ratio that is no integer
        ((1, 6), (16, 96), None),  # a single row of patches
        ((12, 10), (7, 5), None),  # downsampling (cells of one pixel)
    ],
)
@pytest.mark.parametrize("classes", [1, 2, 7, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_labels_equal_the_reference_off_ties(method, grid, size, out_size, classes, dtype):
    generator = torch.Generator().manual_seed(classes)
    scores = decoder_layout(3 * torch.randn(2, classes, *grid, generator=generator)).to(dtype)
    expected, tie = reference(scores, size, out_size)
    labels = upsample_argmax(scores, size, out_size)
    assert labels.dtype == torch.int64 and labels.shape == expected.shape
    assert torch.equal(labels[~tie], expected[~tie])


@pytest.mark.parametrize("classes", [12, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_model_scores_give_the_same_labels(classes, dtype):
    scores = trained_like_scores(4, classes).to(dtype)
    expected, tie = reference(scores, (512, 512))
    labels = upsample_argmax(scores, (512, 512))
    assert (labels == expected).float().mean() >= 0.9999
    assert torch.equal(labels[~tie], expected[~tie])


def test_under_bf16_autocast_the_arithmetic_stays_fp32():
    scores = trained_like_scores(2, 12).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels = upsample_argmax(scores, (512, 512))
    expected, tie = reference(scores, (512, 512))
    assert torch.equal(labels[~tie], expected[~tie])


def test_ties_go_to_the_first_class_as_argmax(method):
    scores = torch.zeros(1, 4, 3, 3)
    scores[:, 1:3] = 1.0  # classes 1 and 2 tie everywhere
    assert (upsample_argmax(scores, (48, 48)) == 1).all()
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, float("nan"), 1, 2]])
    assert torch.equal(argmax_classes(values), values.argmax(1))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scores_give_the_reference_labels(bad):
    scores = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    scores[0, 2, 1, 1] = bad
    expected = F.interpolate(scores, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(upsample_argmax(scores, (64, 64)), expected.argmax(1))


def test_out_size_outside_size_is_refused():
    with pytest.raises(ValueError, match="within size"):
        upsample_argmax(torch.zeros(1, 2, 4, 4), (64, 64), (65, 64))


def test_full_resolution_scores_are_never_allocated():
    # The old eager path wrote the (B, C, H, W) fp32 scores (here 24 MiB) before the argmax.
    scores = trained_like_scores(2, 12)
    upsample_argmax(scores, (512, 512))  # interpolation taps cached
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        labels = upsample_argmax(scores, (512, 512))
    largest = max(event.cpu_memory_usage for event in prof.events())
    full_scores = 2 * 12 * 512 * 512 * 4
    assert largest <= labels.numel() * labels.element_size() < full_scores / 2


def test_compiled_and_traced_forwards_trace_the_reference_formula():
    scores = trained_like_scores(1, 12)
    torch.compiler.reset()
    compiled = torch.compile(
        lambda s: upsample_argmax(s, (512, 512), (500, 510)), backend="eager", fullgraph=True
    )
    expected = F.interpolate(scores, size=(512, 512), mode="bilinear").argmax(1)[:, :500, :510]
    assert torch.equal(compiled(scores), expected)
    torch.compiler.reset()


def test_works_with_gradients_enabled_after_inference_mode():
    scores = trained_like_scores(1, 12)
    with torch.inference_mode():
        first = upsample_argmax(scores, (512, 512))  # taps cached under inference_mode
    second = upsample_argmax(scores.clone().requires_grad_(), (512, 512))
    assert torch.equal(first, second)
