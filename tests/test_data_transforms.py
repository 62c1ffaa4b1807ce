"""Augmentation: geometry, class-ratio crops, flip alignment, padding, policy targets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cts.data.transforms import (
    PolicyTransform,
    TrainTransform,
    ValTransform,
    max_class_ratio,
    photometric_distortion,
    random_crop,
)
from cts.sharing import policy_targets

HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def rngs(n):
    return [np.random.default_rng((0, 0, i)) for i in range(n)]


def test_crop_respects_class_ratio():
    label = np.zeros((100, 200), np.uint8)
    label[:, 120:] = 1  # a 100-wide crop passes only if it starts right of x = 45
    label[:5] = 255
    image = np.zeros((100, 200, 3), np.uint8)
    for rng in rngs(20):
        _, crop = random_crop(image, label, 100, rng, cat_max_ratio=0.75)
        assert crop.shape == (100, 100)
        assert max_class_ratio(crop) < 0.75
    # Without the rule many crops are dominated by one class.
    ratios = [max_class_ratio(random_crop(image, label, 100, r, 1.0)[1]) for r in rngs(20)]
    assert sum(r >= 0.75 for r in ratios) >= 3


def test_crop_gives_up_after_tries():
    label = np.zeros((64, 64), np.uint8)  # one class: no crop can pass
    image, crop = random_crop(np.zeros((64, 64, 3), np.uint8), label, 32, rngs(1)[0])
    assert crop.shape == (32, 32) and image.shape == (32, 32, 3)


def test_an_image_no_larger_than_the_crop_is_its_only_crop_and_draws_nothing():
    label = np.zeros((64, 48), np.uint8)  # one class: every try would fail the ratio test
    image = np.zeros((64, 48, 3), np.uint8)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out_image, crop = random_crop(image, label, 64, rng)
    assert out_image is image and crop is label
    assert rng.bit_generator.state == state


def test_max_class_ratio_ignores_ignore():
    label = np.array([[0, 0, 0, 1], [255, 255, 255, 255]], np.uint8)
    assert max_class_ratio(label) == 0.75
    assert max_class_ratio(np.array([[3, 255]], np.uint8)) == 1.0


def test_train_output_and_padding():
    transform = TrainTransform(base_size=64, crop_size=96, scale_range=(1.0, 1.0), **HALF)
    image = np.full((64, 80, 3), 255, np.uint8)
    label = np.ones((64, 80), np.uint8)
    out = transform(image, label, rngs(1)[0])
    assert out["image"].shape == (3, 96, 96) and out["image"].dtype == torch.float32
    assert out["label"].shape == (96, 96) and out["label"].dtype == torch.int64
    assert (out["label"][64:] == 255).all() and (out["label"][:, 80:] == 255).all()
    assert (out["image"][:, 64:] == 0).all() and (out["image"][:, :, 80:] == 0).all()
    assert (out["label"][:64, :80] == 1).all()


def test_train_without_photometric_keeps_the_colours():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    label = np.zeros((64, 64), np.uint8)
    transform = TrainTransform(64, 64, scale_range=(1.0, 1.0), photometric=False, **HALF)
    for rng in rngs(6):
        out = transform(image, label, rng)["image"]
        restored = (out * 0.5 + 0.5) * 255
        plain = torch.from_numpy(image).permute(2, 0, 1).float()
        assert torch.allclose(restored, plain, atol=1e-3) or torch.allclose(
            restored, plain.flip(-1), atol=1e-3
        )


def test_train_rescale_range():
    sizes = set()
    for rng in rngs(30):
        transform = TrainTransform(base_size=100, crop_size=1000, cat_max_ratio=1.0, **HALF)
        label = transform(np.zeros((50, 100, 3), np.uint8), np.zeros((50, 100), np.uint8), rng)[
            "label"
        ]
        sizes.add(int((label != 255).any(1).sum()))  # rescaled height = short side
    assert min(sizes) >= 50 and max(sizes) <= 200 and max(sizes) - min(sizes) > 60


def test_flip_keeps_image_and_label_aligned():
    # Grey image whose brightness encodes the label: photometric distortion keeps grey
    # grey and brightness order, so any misalignment shows as a dark "1" pixel.
    label = np.zeros((64, 64), np.uint8)
    label[:, :20] = 1
    label[40:, 44:] = 1
    image = np.where(label[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, 2)
    transform = TrainTransform(base_size=64, crop_size=64, scale_range=(1.0, 1.0), **HALF)
    flipped = 0
    for rng in rngs(16):
        out = transform(image, label, rng)
        grey = out["image"][0].numpy()
        lab = out["label"].numpy()
        ones = cv2.erode((lab == 1).astype(np.uint8), np.ones((3, 3))) > 0
        zeros = cv2.erode((lab == 0).astype(np.uint8), np.ones((3, 3))) > 0
        assert grey[ones].min() > grey[zeros].max()
        flipped += lab[0, -1] == 1
    assert 0 < flipped < 16


def test_photometric_distortion_changes_colours_only():
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    outputs = [photometric_distortion(image.copy(), rng) for rng in rngs(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 6


def test_same_rng_same_sample():
    transform = TrainTransform(base_size=64, crop_size=48, **HALF)
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)
    label = (np.arange(96)[None] // 20).repeat(64, 0).astype(np.uint8)
    a = transform(image, label, np.random.default_rng(5))
    b = transform(image, label, np.random.default_rng(5))
    c = transform(image, label, np.random.default_rng(6))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])


def test_val_keeps_original_size():
    # The evaluation protocol resizes the original image per scale: the loader must not.
    image = np.zeros((64, 100, 3), np.uint8)
    image[:, 50:] = 255
    out = ValTransform(**HALF)(image, np.zeros((64, 100), np.uint8), rngs(1)[0])
    assert out["image"].shape == (3, 64, 100) and out["label"].shape == (64, 100)
    assert out["image"][:, :, :50].unique().tolist() == [-1.0]
    assert out["image"][:, :, 50:].unique().tolist() == [1.0]


def test_policy_targets_match_resized_label():
    label = np.zeros((96, 160), np.uint8)
    label[:, 100:] = 1
    label[:10, :10] = 255
    image = np.zeros((96, 160, 3), np.uint8)
    transform = PolicyTransform(size=(64, 128), patch_size=8, **HALF)
    seen = set()
    for rng in rngs(8):
        out = transform(image, label, rng)
        assert out["image"].shape == (3, 64, 128) and out["target"].shape == (4, 8)
        resized = cv2.resize(label, (128, 64), interpolation=cv2.INTER_NEAREST)
        for candidate in (resized, resized[:, ::-1]):
            expected = policy_targets(torch.from_numpy(candidate.astype(np.int64))[None], 8)[0]
            if torch.equal(out["target"], expected):
                seen.add(candidate is resized)
                break
        else:
            pytest.fail("targets match neither the label nor its flip")
    assert seen == {True, False}
