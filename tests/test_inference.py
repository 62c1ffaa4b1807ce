import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cts  # noqa: F401  (applies the torchvision import fix)
from cts.inference import (
    EvalGeometry,
    evaluate,
    normalised_resize,
    predict_labels,
    predict_logits,
    scaled_image,
    scaled_size,
    sliding_window_logits,
    window_fitting_size,
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
    [((16, 24), 8, 8), ((16, 24), 8, 5), ((15, 21), 6, 4), ((8, 8), 8, 8), ((8, 20), 8, 6)],
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


def test_image_smaller_than_window_or_stride_larger_than_window_is_refused():
    with pytest.raises(ValueError, match="image 5x7 is smaller than the 8x8 window"):
        sliding_window_logits(column_in_window, torch.ones(2, 3, 5, 7), NUM_CLASSES, 8, 4)
    with pytest.raises(ValueError, match="stride 9 is larger than window 8"):
        sliding_window_logits(column_in_window, torch.ones(2, 3, 8, 8), NUM_CLASSES, 8, 9)
    with pytest.raises(ValueError, match="stride 9 is larger than window 8"):
        EvalGeometry(base_size=8, window=8, stride=9)


def test_batch_size_chunks_whole_windows():
    seen = []

    def model(images: Tensor) -> Tensor:
        seen.append(images.shape[0])
        return column_in_window(images)

    sliding_window_logits(model, torch.zeros(2, 3, 8, 16), NUM_CLASSES, 8, 4, batch_size=5)
    assert seen == [4, 2]  # 3 windows x 2 images, at most 2 whole windows per forward


def test_scaled_size_rounds_half_up_and_caps_the_long_side():
    # 4 x 13 to short side 2: 2 x 6.5 rounds up to 2 x 7 (Python's round gives 2 x 6).
    assert scaled_size(4, 13, EvalGeometry(base_size=2, window=2, stride=2, max_ratio=10), 1) == (
        2,
        7,
    )
    # base 9 at ratio 0.5: short side int(4.5) = 4, long side at most int(2 * 4.5) = 9.
    geometry = EvalGeometry(base_size=9, window=4, stride=4, max_ratio=2)
    assert scaled_size(10, 40, geometry, 0.5) == (2, 9)
    assert scaled_size(40, 10, geometry, 0.5) == (9, 2)


def test_scaled_size_is_computed_from_the_original_image():
    geometry = EvalGeometry(base_size=512, window=512, stride=512, max_ratio=4)
    assert scaled_size(480, 640, geometry, 1.0) == (512, 683)
    assert scaled_size(480, 640, geometry, 0.75) == (384, 512)
    assert scaled_size(100, 1000, geometry, 1.0) == (205, 2048)  # long side cap 4 x 512


def test_window_fitting_size_upsamples_short_images_to_the_window():
    assert window_fitting_size(384, 512, 512) == (512, 682)  # int(512 * 512 / 384)
    assert window_fitting_size(700, 300, 512) == (1194, 512)
    assert window_fitting_size(512, 700, 512) == (512, 700)


@torch.no_grad()
def test_single_scale_is_softmax_of_model(conv):
    image = torch.randn(1, 3, 12, 18)
    geometry = EvalGeometry(base_size=12, window=8, stride=4)
    probs = predict_logits(conv, image, NUM_CLASSES, geometry)
    torch.testing.assert_close(probs, conv(image).softmax(1))


@torch.no_grad()
def test_flip_is_undone_for_equivariant_model(conv):
    image = torch.randn(1, 3, 12, 18)
    kwargs = dict(num_classes=NUM_CLASSES, geometry=EvalGeometry(base_size=12, window=8, stride=4))
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
        EvalGeometry(base_size=6, window=6, stride=6),
        flip=True,
    )
    torch.testing.assert_close(probs, probs.flip(-1))
    assert not torch.allclose(probs[..., 0], probs[..., 1])


@torch.no_grad()
def test_multi_scale_of_a_scale_equivariant_model_is_its_full_resolution_softmax(conv):
    # A 1x1 conv commutes with bilinear resizing up to interpolation error, and every
    # scale's probabilities are resized back to the original size: for a smooth image,
    # all scales and flips agree with the single-scale result.
    image = F.interpolate(torch.randn(1, 3, 5, 7), size=(40, 56), mode="bilinear")
    geometry = EvalGeometry(base_size=40, window=16, stride=12)
    single = predict_logits(conv, image, NUM_CLASSES, geometry)
    multi = predict_logits(
        conv, image, NUM_CLASSES, geometry, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True
    )
    torch.testing.assert_close(multi, single, atol=0.02, rtol=0)
    assert multi.shape == (1, NUM_CLASSES, 40, 56)


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
        nn.Identity(),
        loader,
        3,
        EvalGeometry(base_size=8, window=6, stride=4),
        device="cpu",
        progress=False,
    )
    assert metric.confusion.sum() == 8 * 12 * 2 + 11 * 8 - 3
    assert metric.compute() == pytest.approx({"mIoU": 100.0, "pixel_acc": 100.0, "mean_acc": 100.0})


@pytest.fixture(scope="module")
def segmenter():
    from cts.models import build_segmenter

    torch.manual_seed(0)
    return build_segmenter(
        backbone="vit_tiny_patch16_384", num_classes=5, crop_size=64, num_tokens_shared=2, depth=2
    ).eval()


def off_ties(probs: Tensor) -> Tensor:
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] > 1e-5


@torch.no_grad()
@pytest.mark.parametrize(
    ("size", "base", "scales", "flip", "out_size"),
    [
        ((64, 64), 64, (1.0,), False, None),  # one window covers the image: no logits written
        ((64, 64), 64, (1.0,), False, (48, 80)),  # ... but the labels are at another size
        ((45, 70), 64, (1.0,), False, None),  # upsampled to the window, overlapping windows
        ((150, 97), 64, (1.0,), False, None),  # downscaled
        ((45, 70), 64, (0.75, 1.0, 1.5), True, None),  # probabilities averaged
    ],
)
@pytest.mark.parametrize("coarse", [False, True])
def test_labels_are_the_argmax_of_the_probabilities(
    segmenter, size, base, scales, flip, out_size, coarse
):
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    geometry = EvalGeometry(base_size=base, window=64, stride=40, max_ratio=2)

    def logits(x: Tensor) -> Tensor:
        return segmenter(x).logits

    def scores(x: Tensor) -> Tensor:  # the patch grid, upsampled by the evaluation
        return segmenter(x, upsample=False).logits

    probs = predict_logits(logits, image, 5, geometry, scales, flip, out_size)
    model = scores if coarse else logits
    labels = predict_labels(model, image, 5, geometry, scales, flip, out_size)
    assert labels.shape == probs.argmax(1).shape and labels.dtype == torch.int64
    keep = off_ties(probs)
    assert keep.float().mean() > 0.99
    assert torch.equal(labels[keep], probs.argmax(1)[keep])


@torch.no_grad()
def test_coarse_outputs_are_upsampled_to_the_window_as_the_model_does(segmenter):
    image = torch.randn(1, 3, 64, 150, generator=torch.Generator().manual_seed(1))
    full = sliding_window_logits(lambda x: segmenter(x).logits, image, 5, 64, 40)
    coarse = sliding_window_logits(lambda x: segmenter(x, upsample=False).logits, image, 5, 64, 40)
    torch.testing.assert_close(coarse, full, rtol=0, atol=0)


def test_a_coarse_grid_that_does_not_divide_the_window_is_refused():
    with pytest.raises(ValueError, match="nor a grid that divides it"):
        sliding_window_logits(
            lambda x: torch.zeros(x.shape[0], NUM_CLASSES, 3, 3), torch.zeros(1, 3, 8, 8), 4, 8, 8
        )


def test_normalised_resize_equals_normalising_then_resizing():
    rng = np.random.default_rng(0)
    rgb = torch.from_numpy(rng.integers(0, 256, (301, 457, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    full = (rgb.permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / (
        torch.tensor(std).view(1, 3, 1, 1)
    )
    expected = F.interpolate(full, size=(128, 190), mode="bilinear", align_corners=False)
    result = normalised_resize(rgb, (128, 190), mean, std)
    assert result.shape == (1, 3, 128, 190)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    geometry = EvalGeometry(base_size=64, window=64, stride=64)
    scaled = scaled_image(rgb, geometry, mean, std)
    assert scaled.shape[-2:] == scaled_size(301, 457, geometry, 1.0) == (64, 97)
