"""Training with configs/*.yaml computes what the authors' code does (docs/fidelity.md).

The authors' values are cited from tue-mps/cts-segmenter: segm/train.py, segm/config.yml,
segm/optim/scheduler.py, segm/model/*.py, segm/data/config/*.py (mmsegmentation 0.14.1
pipelines), policynet/train.py and policynet/policynet/*.py; timm 0.4.12 for the optimizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cts.data.transforms import (
    TrainTransform,
    crop_box,
    keep_ratio_size,
    photometric_distortion,
    random_crop,
)
from cts.models.segmenter import Segmenter
from stages.common import segmenter_config

REPO = Path(__file__).resolve().parents[1]
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


# --- dropout and drop-path -------------------------------------------------------------


def test_drop_path_and_dropout_sit_where_segmenter_puts_them():
    params = dict(config("ade20k"), pretrained=False, crop_size=64, num_tokens_shared=1)
    model = Segmenter(segmenter_config(params, num_classes=150))
    vit = model.encoder.vit
    # Encoder: stochastic depth linear from 0 to 0.1 over the 12 blocks, no dropout.
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in vit.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    encoder_dropouts = [m.p for m in vit.modules() if isinstance(m, torch.nn.Dropout)]
    assert encoder_dropouts and set(encoder_dropouts) == {0.0}
    # Decoder: 2 blocks, dropout 0.1 on the attention weights, after the attention
    # projection, after the MLP's GELU and its output; no drop-path; LayerNorm eps 1e-5.
    blocks = model.decoder.blocks
    assert len(blocks) == 2
    for block in blocks:
        assert block.attn.attn_drop.p == 0.1 and block.attn.proj_drop.p == 0.1
        assert block.mlp.drop1.p == 0.1 and block.mlp.drop2.p == 0.1
        assert isinstance(block.drop_path1, torch.nn.Identity)
        assert isinstance(block.drop_path2, torch.nn.Identity)
        assert block.norm1.eps == 1e-5 and block.norm2.eps == 1e-5
        assert block.attn.num_heads == 384 // 64


def test_dataset_long_side_caps_are_the_authors():
    from cts.data import ade20k, cityscapes, pascal_context

    assert ade20k.dataset_info().max_ratio == 4
    assert pascal_context.dataset_info().max_ratio == 8
    assert cityscapes.dataset_info().max_ratio == 2


def test_train_segmenter_gives_the_transform_the_datasets_long_side_cap(tmp_path, monkeypatch):
    import stages.train_segmenter as stage
    from stages.params import load_params

    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "dataset.yaml").write_text("name: mine\nbase_size: 64\nmax_ratio: 8\n")
    params = load_params(REPO / "params.yaml")
    params.update(data_root=str(tmp_path), policy="none", pretrained=False, device="cpu")

    class Built(Exception):
        pass

    def capture(*args, **kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(stage, "TrainTransform", capture)
    with pytest.raises(Built) as built:
        stage.run(params, resume_training=False)
    assert built.value.args[0]["max_ratio"] == 8


# --- augmentation ----------------------------------------------------------------------


def test_rescale_caps_the_long_side_at_max_ratio():
    # mmseg Resize(img_scale=(4 * 512, 512), ratio_range) at ratio 2: a 300x2000 panorama
    # is limited by its long side (4096), not scaled to a 1024 short side.
    assert keep_ratio_size(300, 2000, 512, 2.0, 4) == (614, 4096)
    assert keep_ratio_size(375, 500, 520, 0.5, 8) == (260, 347)
    assert keep_ratio_size(1024, 2048, 1024, 1.5, 2) == (1536, 3072)
    transform = TrainTransform(
        base_size=100, crop_size=1000, scale_range=(1.0, 1.0), cat_max_ratio=1.0, **HALF
    )
    label = transform(np.zeros((40, 400, 3), np.uint8), np.zeros((40, 400), np.uint8), rng())
    labelled = label["label"] != 255
    assert (int(labelled.any(1).sum()), int(labelled.any(0).sum())) == (40, 400)


def test_rescale_rounds_half_up():
    # 14x25 to a 7-pixel short side: factor 0.5, width 12.5 -> mmcv int(12.5 + 0.5) = 13
    # (Python's round would give 12).
    assert keep_ratio_size(14, 25, 7, 1.0, 4) == (7, 13)
    transform = TrainTransform(
        base_size=7, crop_size=64, scale_range=(1.0, 1.0), cat_max_ratio=1.0, **HALF
    )
    out = transform(np.zeros((14, 25, 3), np.uint8), np.zeros((14, 25), np.uint8), rng())
    labelled = out["label"] != 255
    assert (int(labelled.any(1).sum()), int(labelled.any(0).sum())) == (7, 13)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def coordinate_image(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def test_crop_keeps_the_eleventh_draw_after_ten_failures():
    # mmseg RandomCrop: draw, then 10 x (test; if it fails, draw again): after ten failed
    # tests the eleventh window is used untested.
    label = np.zeros((64, 64), np.uint8)  # one class: every test fails
    image, crop = random_crop(coordinate_image(64, 64), label, 32, rng(3))
    draws = [crop_box(label.shape, 32, r) for r in [rng(3)] for _ in range(11)]
    assert (int(image[0, 0, 0]), int(image[0, 0, 1])) == draws[10]
    assert crop.shape == (32, 32)


def test_crop_keeps_the_first_window_that_passes():
    label = (np.arange(64)[None] // 8 % 4).repeat(64, 0).astype(np.uint8)  # every crop passes
    image, _ = random_crop(coordinate_image(64, 64), label, 32, rng(4))
    assert (int(image[0, 0, 0]), int(image[0, 0, 1])) == crop_box(label.shape, 32, rng(4))


class RecordingRng:
    """A generator that takes every branch (integers(2) -> 1) and records its calls."""

    def __init__(self) -> None:
        self.inner = np.random.default_rng(0)
        self.integer_calls: list[tuple] = []

    def integers(self, *args):
        self.integer_calls.append(args)
        return 1 if args == (2,) else self.inner.integers(*args)

    def uniform(self, *args):
        return self.inner.uniform(*args)


def test_hue_shift_is_drawn_from_minus_18_to_17():
    # numpy's randint(-18, 18) in mmseg's PhotoMetricDistortion excludes +18.
    recorder = RecordingRng()
    photometric_distortion(np.full((4, 4, 3), 100, np.uint8), recorder)
    assert (-18, 18) in recorder.integer_calls
    assert all(call in ((2,), (-18, 18)) for call in recorder.integer_calls)
