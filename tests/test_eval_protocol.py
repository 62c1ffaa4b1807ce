"""Our evaluation against an independent reference of the CTS / Segmenter authors' protocol.

The reference below is written from the authors' code path (tue-mps/cts-segmenter
segm/eval/miou.py -> segm/model/utils.py `inference`, on mmseg 0.x `MultiScaleFlipAug` +
keep-ratio `Resize` with img_scale = (max_ratio * im_size, im_size)); it does not call
cts.inference.
"""

import pytest
import torch
import torch.nn.functional as F

import cts  # noqa: F401  (applies the torchvision import fix)
from cts.inference import EvalGeometry, predict_logits
from cts.models import Segmenter, SegmenterConfig

PAPER_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
BASE, MAX_RATIO, WINDOW, STRIDE = 64, 2, 64, 40
NUM_CLASSES = 5


def mmseg_rescale(image, im_size, max_ratio, ratio):
    """MultiScaleFlipAug's scale for ``ratio`` and Resize(keep_ratio=True) of the image."""
    scale = (int(max_ratio * im_size * ratio), int(im_size * ratio))
    h, w = image.shape[-2:]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = (int(h * factor + 0.5), int(w * factor + 0.5))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def segmenter_resize(image, smaller_size):
    """segm.model.utils.resize: upsample so that the short side is the window."""
    h, w = image.shape[2:]
    if h < w:
        h_res, w_res = smaller_size, w / h * smaller_size
    else:
        h_res, w_res = h / w * smaller_size, smaller_size
    if min(h, w) < smaller_size:
        return F.interpolate(image, (int(h_res), int(w_res)), mode="bilinear", align_corners=False)
    return image


def segmenter_inference(model, images_and_flips, ori_shape, window, stride):
    """segm.model.utils.inference: per image, windows, merge, resize, unflip, softmax, mean."""
    total = torch.zeros(NUM_CLASSES, *ori_shape)
    for image, flip in images_and_flips:
        image = segmenter_resize(image, window)
        _, _, h, w = image.shape
        h_anchors = [a for a in range(0, h, stride) if a < h - window] + [h - window]
        w_anchors = [a for a in range(0, w, stride) if a < w - window] + [w - window]
        logit = torch.zeros(NUM_CLASSES, h, w)
        count = torch.zeros(1, h, w)
        for ha in h_anchors:
            for wa in w_anchors:
                crop = image[:, :, ha : ha + window, wa : wa + window]
                logit[:, ha : ha + window, wa : wa + window] += model(crop)[0]
                count[:, ha : ha + window, wa : wa + window] += 1
        logit = F.interpolate((logit / count)[None], ori_shape, mode="bilinear")[0]
        if flip:
            logit = logit.flip(2)
        total += logit.softmax(0)
    return total / len(images_and_flips)


def reference_probabilities(model, image, ratios, flip):
    scaled = [mmseg_rescale(image, BASE, MAX_RATIO, r) for r in ratios]
    inputs = [(s, False) for s in scaled]
    if flip:
        inputs += [(s.flip(-1), True) for s in scaled]
    return segmenter_inference(model, inputs, tuple(image.shape[-2:]), WINDOW, STRIDE)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = SegmenterConfig(
        backbone="vit_tiny_patch16_384",
        num_classes=NUM_CLASSES,
        crop_size=WINDOW,
        num_tokens_shared=2,
        depth=2,
        policy_input_scale=1.0,
        policy_feature_stride=32,
    )
    segmenter = Segmenter(config).eval()
    return lambda images: segmenter(images).logits


@torch.no_grad()
@pytest.mark.parametrize(
    ("size", "ratios", "flip"),
    [
        ((45, 70), (1.0,), False),  # short side below base: upsampled, not padded
        ((150, 97), (1.0,), False),  # downscaled, windows overlap
        ((30, 100), (1.0,), False),  # long side capped by max_ratio, then up to the window
        ((45, 70), PAPER_RATIOS, True),
        ((30, 100), PAPER_RATIOS, True),
    ],
)
def test_probabilities_equal_the_authors_protocol(model, size, ratios, flip):
    image = torch.randn(1, 3, *size)
    geometry = EvalGeometry(base_size=BASE, window=WINDOW, stride=STRIDE, max_ratio=MAX_RATIO)
    ours = predict_logits(model, image, NUM_CLASSES, geometry, scales=ratios, flip=flip)
    expected = reference_probabilities(model, image, ratios, flip)
    assert ours.shape == (1, NUM_CLASSES, *size)
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=0)
