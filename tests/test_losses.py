"""The subgrid cross-entropy: exactly the full-resolution loss at the pixels it samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cts.losses import class_weights, subgrid_cross_entropy, upsample_at


@pytest.mark.parametrize(
    "size, grid, stride, offset",
    [
        ((512, 512), (32, 32), 4, (1, 3)),
        ((256, 320), (16, 20), 4, (3, 0)),
        ((96, 96), (6, 6), 3, (2, 1)),
    ],
)
def test_upsample_at_equals_the_subsampled_interpolation(size, grid, stride, offset):
    scores = torch.randn(2, 5, *grid)
    full = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    expected = full[..., offset[0] :: stride, offset[1] :: stride]
    torch.testing.assert_close(upsample_at(scores, size, stride, offset), expected)


def test_stride_one_is_the_full_resolution_loss_with_ignore():
    scores = torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 128, 128))
    labels[:, :10] = 255
    full = F.interpolate(scores, size=(128, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        subgrid_cross_entropy(scores, labels, 1), F.cross_entropy(full, labels, ignore_index=255)
    )


def test_strided_loss_is_the_loss_of_the_sampled_pixels_and_is_seeded():
    scores = torch.randn(2, 5, 8, 8, requires_grad=True)
    labels = torch.randint(0, 5, (2, 128, 128))
    weight = torch.rand(5) + 0.5
    loss = subgrid_cross_entropy(scores, labels, 4, torch.Generator().manual_seed(0), weight=weight)
    oy, ox = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    full = F.interpolate(scores, size=(128, 128), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(
        full[..., oy::4, ox::4], labels[:, oy::4, ox::4], weight=weight, ignore_index=255
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_strided_loss_averages_to_the_full_loss_over_all_offsets():
    scores = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 64, 64))
    full = F.interpolate(scores, size=(64, 64), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(full, labels, reduction="none")
    means = [per_pixel[:, y::4, x::4].mean() for y in range(4) for x in range(4)]
    torch.testing.assert_close(torch.stack(means).mean(), per_pixel.mean())


def test_bad_stride_is_an_error():
    with pytest.raises(ValueError, match="stride=0"):
        subgrid_cross_entropy(torch.zeros(1, 2, 2, 2), torch.zeros(1, 32, 32, dtype=torch.long), 0)


def test_class_weights_favour_rare_classes_and_keep_the_loss_scale():
    frequencies = torch.tensor([0.64, 0.32, 0.04, 0.0])
    weights = class_weights(frequencies, 0.5)
    torch.testing.assert_close(weights[:3] * frequencies[:3].sqrt(), weights[:1].expand(3) * 0.8)
    torch.testing.assert_close((weights * frequencies).sum(), torch.tensor(1.0))
    assert weights[3] == weights[:3].max()
    assert torch.equal(class_weights(frequencies, 0.0), torch.ones(4))
    with pytest.raises(ValueError, match="all zero"):
        class_weights(torch.zeros(3), 0.5)
