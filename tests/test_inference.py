import pytest
import torch
from torch import Tensor, nn

import cts  # noqa: F401  (applies the torchvision import fix)
from cts.inference import (
    evaluate,
    predict_logits,
    resize_to_short_side,
    sliding_window_logits,
)

NUM_CLASSES = 4


@pytest.fixture
def conv() -> nn.Module:
    """A 1x1 conv: translation and flip equivariant, so windowing must not change it."""
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, 1).eval()


def column_in_window(images: Tensor) -> Tensor:
    """Logits equal to each pixel's column inside the crop, whatever the content."""
    b, _, h, w = images.shape
    return torch.arange(w, dtype=torch.float32).expand(b, NUM_CLASSES, h, w)


@torch.no_grad()
@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [((16, 24), 8, 8), ((16, 24), 8, 5), ((15, 21), 6, 4), ((5, 7), 8, 8), ((5, 20), 8, 6)],
)
@pytest.mark.parametrize("batch_size", [None, 1, 5])
def test_sliding_window_equals_full_forward(conv, size, window, stride, batch_size):
    images = torch.randn(2, 3, *size)
    logits = sliding_window_logits(conv, images, NUM_CLASSES, window, stride, batch_size)
    assert logits.shape == (2, NUM_CLASSES, *size)
    torch.testing.assert_close(logits, conv(images))


def test_overlapping_windows_average_logits():
    # width 6, window 4, stride 2: windows at x=0 and x=2, columns 2-3 are seen twice.
    logits = sliding_window_logits(column_in_window, torch.zeros(1, 3, 4, 6), NUM_CLASSES, 4, 2)
    expected = torch.tensor([0, 1, (2 + 0) / 2, (3 + 1) / 2, 2, 3])
    torch.testing.assert_close(logits, expected.expand(1, NUM_CLASSES, 4, 6))


def test_last_window_is_flush_with_border():
    # width 7, window 4, stride 2: windows at x=0, 2 and 3 (moved back from 4).
    logits = sliding_window_logits(column_in_window, torch.zeros(1, 3, 4, 7), NUM_CLASSES, 4, 2)
    expected = torch.tensor([0, 1, (2 + 0) / 2, (3 + 1 + 0) / 3, (2 + 1) / 2, (3 + 2) / 2, 3])
    torch.testing.assert_close(logits[0, 0, 0], expected)


def test_image_smaller_than_window_is_padded_and_cropped():
    seen = []

    def model(images: Tensor) -> Tensor:
        seen.append(images.shape)
        return column_in_window(images)

    logits = sliding_window_logits(model, torch.ones(2, 3, 5, 7), NUM_CLASSES, 8, 4)
    assert seen == [(2, 3, 8, 8)]
    torch.testing.assert_close(logits, torch.arange(7.0).expand(2, NUM_CLASSES, 5, 7))


def test_batch_size_chunks_whole_windows():
    seen = []

    def model(images: Tensor) -> Tensor:
        seen.append(images.shape[0])
        return column_in_window(images)

    sliding_window_logits(model, torch.zeros(2, 3, 8, 16), NUM_CLASSES, 8, 4, batch_size=5)
    assert seen == [4, 2]  # 3 windows x 2 images, at most 2 whole windows per forward


def test_resize_to_short_side():
    assert resize_to_short_side(torch.zeros(1, 3, 10, 20), 5).shape == (1, 3, 5, 10)
    assert resize_to_short_side(torch.zeros(2, 3, 30, 20), 16).shape == (2, 3, 24, 16)


@torch.no_grad()
def test_single_scale_is_softmax_of_model(conv):
    image = torch.randn(1, 3, 12, 18)
    probs = predict_logits(conv, image, NUM_CLASSES, short_side=12, window=8, stride=4)
    torch.testing.assert_close(probs, conv(image).softmax(1))


@torch.no_grad()
def test_flip_is_undone_for_equivariant_model(conv):
    image = torch.randn(1, 3, 12, 18)
    kwargs = dict(num_classes=NUM_CLASSES, short_side=12, window=8, stride=4)
    plain = predict_logits(conv, image, **kwargs)
    flipped = predict_logits(conv, image, flip=True, **kwargs)
    torch.testing.assert_close(flipped, plain)


def test_flip_averages_mirrored_predictions():
    # Content-independent, position-dependent logits: averaging a pass with its mirror
    # must give a left-right symmetric map.
    probs = predict_logits(
        lambda x: column_in_window(x) * torch.arange(NUM_CLASSES).view(1, -1, 1, 1),
        torch.zeros(1, 3, 6, 6),
        NUM_CLASSES,
        short_side=6,
        window=6,
        stride=6,
        flip=True,
    )
    torch.testing.assert_close(probs, probs.flip(-1))
    assert not torch.allclose(probs[..., 0], probs[..., 1])


@torch.no_grad()
def test_multi_scale_flip_shapes(conv):
    image = torch.randn(1, 3, 10, 15)
    probs = predict_logits(
        conv,
        image,
        NUM_CLASSES,
        short_side=8,
        window=8,
        stride=6,
        scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
        flip=True,
        out_size=(20, 30),
    )
    assert probs.shape == (1, NUM_CLASSES, 20, 30)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 20, 30))


def test_evaluate_tensor_and_list_batches():
    # Images are one-hot labels at short side 8 and the model is the identity: exact predictions.
    def sample(h: int, w: int) -> tuple[Tensor, Tensor]:
        label = torch.randint(0, 3, (h, w))
        label[0, 0] = 255
        image = nn.functional.one_hot(label.clamp(max=2), 3).permute(2, 0, 1).float()
        return image, label

    (a, la), (b, lb), (c, lc) = sample(8, 12), sample(8, 12), sample(11, 8)
    loader = [
        {"image": torch.stack([a, b]), "label": torch.stack([la, lb])},
        {"image": [c], "label": [lc]},
    ]
    metric = evaluate(
        nn.Identity(), loader, 3, short_side=8, window=6, stride=4, device="cpu", progress=False
    )
    assert metric.confusion.sum() == 8 * 12 * 2 + 11 * 8 - 3
    assert metric.compute() == pytest.approx({"mIoU": 100.0, "pixel_acc": 100.0, "mean_acc": 100.0})
