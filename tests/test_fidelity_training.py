"""Training with configs/*.yaml computes what the authors' code does (docs/fidelity.md).

The authors' values are cited from tue-mps/cts-segmenter: segm/train.py, segm/config.yml,
segm/optim/scheduler.py, segm/model/*.py, segm/data/config/*.py (mmsegmentation 0.14.1
pipelines), policynet/train.py and policynet/policynet/*.py; timm 0.4.12 for the optimizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cts.data.transforms import (
    PolicyTransform,
    TrainTransform,
    keep_ratio_size,
    photometric_distortion,
    random_crop,
)
from cts.engine import TrainLoop, TrainState
from cts.models.segmenter import Segmenter
from cts.policy_training import policy_lr_schedule, policy_recipe
from cts.segmenter_training import (
    build_optimizer,
    lr_schedule,
    segmenter_loss,
    weight_decay_groups,
)
from cts.sharing import policy_targets
from cts_stages.common import segmenter_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("ade20k", "pascal_context", "cityscapes")
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# segm/config.yml (epochs, batch_size, learning_rate, crop_size) and the train split sizes
# (ADE20K 20210, Pascal-Context train.txt 4998, Cityscapes train 2975); the loader keeps the
# last partial batch (drop_last False): len(train_loader) = ceil(size / batch).
AUTHORS = {
    "ade20k": dict(epochs=64, train_images=20210, batch_size=8, lr=1e-3, crop_size=512, k=103),
    "pascal_context": dict(
        epochs=256, train_images=4998, batch_size=16, lr=1e-3, crop_size=480, k=90
    ),
    "cityscapes": dict(epochs=216, train_images=2975, batch_size=8, lr=1e-2, crop_size=768, k=336),
}
AUTHORS_MIN_LR = 1e-5  # segm/train.py --min-lr


def config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


def authors_lr(i: int, lr: float, iterations: int, warmup: int = 0) -> float:
    """segm/optim/scheduler.py PolynomialLR after ``i`` step_update calls (power 0.9)."""
    if i == 0:
        return lr
    if i < warmup:
        coef = i / warmup * (1 - warmup / iterations) ** 0.9
    else:
        coef = (1 - i / iterations) ** 0.9
    return (lr - AUTHORS_MIN_LR) * coef + AUTHORS_MIN_LR


def schedule_of(params: dict):
    """The segmenter's lr factor per step with the params' optimizer, lr and warm-up."""
    return lr_schedule(
        params["optimizer"], params["iterations"], params["lr"], params["warmup_iterations"]
    )


class RecordingSGD(torch.optim.SGD):
    """Records the learning rate and the gradients of every step, and does not move."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.lrs: list[float] = []
        self.grads: list[dict[int, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        self.grads.append(
            {
                id(p): p.grad.detach().clone()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )


# --- the loss -------------------------------------------------------------------------


def tiny_paper_segmenter(params: dict) -> Segmenter:
    """configs/ade20k.yaml's model (mask transformer, policy net, 150 classes) built by the
    pipeline's own code, but 2 ViT-Ti blocks on 96x96 crops, dropout and drop-path off."""
    config = segmenter_config(params, num_classes=150)
    config.dropout = 0.0
    torch.manual_seed(0)
    return Segmenter(config)


def test_training_loss_and_gradients_are_full_resolution_cross_entropy():
    params = config("ade20k")
    params.update(
        backbone="vit_tiny_patch16_384",
        depth=2,
        crop_size=96,
        num_tokens_shared=3,  # of 9 superpatches: the sharing path runs
        pretrained=False,
        drop_path_rate=0.0,
    )
    assert params["loss_stride"] == 1 and params["class_weight_power"] == 0
    model = tiny_paper_segmenter(params)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 96, generator=generator)
    labels = torch.randint(0, 150, (2, 96, 96), generator=generator)
    labels[:, :20, :30] = 255  # ignored pixels (the padding of a small image)
    labels[1, 50:] = 7
    batch = {"image": images, "label": labels}

    # Our training step: the loss and count the stage builds, through the training loop.
    optimizer = RecordingSGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss_fn, count_fn = segmenter_loss(
        model.num_tokens_shared,
        params["train_unshared_fraction"],
        params["seed"],
        params["loss_stride"],
        255,
        None,
        lambda: 0,
    )
    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        loss_fn=loss_fn,
        count_fn=count_fn,
        iterations=1,
        device=torch.device("cpu"),
        precision="fp32",
    )
    state = loop.run(TrainState(), iter([batch]))
    ours_loss = state.history[-1]["loss"]

    # Independently: the authors' CrossEntropyLoss(ignore_index=255) on the class scores
    # bilinearly upsampled to the crop, same weights, same shared superpatches.
    model.train()
    model.zero_grad(set_to_none=True)
    scores = model(images, labels, num_tokens_shared=3, upsample=False).logits
    assert scores.shape == (2, 150, 6, 6)
    logits = F.interpolate(scores, size=(96, 96), mode="bilinear", align_corners=False)
    reference = F.cross_entropy(logits, labels, ignore_index=255)
    reference.backward()

    assert ours_loss == pytest.approx(reference.item(), abs=1e-5)
    named = dict(model.named_parameters())
    checked = [
        "encoder.vit.patch_embed.proj.weight",
        "encoder.vit.pos_embed",
        "encoder.vit.blocks.0.attn.qkv.weight",
        "encoder.vit.blocks.1.mlp.fc2.bias",
        "decoder.cls_emb",
        "decoder.proj_patch",
        "decoder.blocks.1.attn.proj.weight",
        "decoder.mask_norm.weight",
    ]
    # The gradients' largest entries are 0.017 (qkv) to 1.4 (cls_emb), their medians 6e-5
    # (qkv) to 0.03, and ours differ by at most ~1e-6 of the largest: a tolerance of 1e-5 of
    # each tensor's largest entry (not 1e-5 absolute, half the median qkv entry).
    for name in checked:
        ours, theirs = optimizer.grads[0][id(named[name])], named[name].grad
        assert theirs.abs().max() > 0, name
        assert gradients_match(ours, theirs), name
    # A wrong small entry fails: the median-sized entry of the qkv gradient, 10% off (by
    # 6e-6, which atol=1e-5 let through).
    theirs = named["encoder.vit.blocks.0.attn.qkv.weight"].grad
    wrong = theirs.clone().flatten()
    median = (wrong.abs() - wrong.abs().median()).abs().argmin()
    wrong[median] *= 1.1
    assert not gradients_match(wrong.view_as(theirs), theirs)


def gradients_match(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal within 1e-5 of the reference's largest entry."""
    return torch.allclose(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


# --- optimizer and learning-rate schedule ---------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_poly_lr_at_first_middle_and_last_iteration_is_the_authors(name):
    params = config(name)
    lr, iterations = params["lr"], params["iterations"]
    factor = schedule_of(params)
    for i in (0, 1, iterations // 2, iterations - 1, iterations):
        assert lr * factor(i) == pytest.approx(authors_lr(i, lr, iterations), rel=1e-9, abs=1e-15)
    assert lr * factor(iterations) == pytest.approx(AUTHORS_MIN_LR)  # their end value


def test_lr_steps_once_per_iteration_in_the_training_loop():
    params = dict(config("ade20k"), iterations=5, lr=0.01)
    model = torch.nn.Linear(3, 2)
    optimizer = RecordingSGD(model.parameters(), lr=params["lr"])
    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(params)),
        loss_fn=lambda net, batch: net(batch["x"]).sum(),
        count_fn=lambda batch: torch.tensor(1),
        iterations=5,
        device=torch.device("cpu"),
    )
    batches = iter([{"x": torch.ones(1, 3)}] * 5)
    loop.run(TrainState(), batches)
    assert optimizer.lrs == pytest.approx([authors_lr(i, 0.01, 5) for i in range(5)])


def test_warmup_follows_the_authors_scheduler():
    params = dict(config("ade20k"), iterations=100, warmup_iterations=10, lr=0.01)
    factor = schedule_of(params)
    for i in (0, 1, 5, 9, 10, 50, 99):
        assert 0.01 * factor(i) == pytest.approx(authors_lr(i, 0.01, 100, warmup=10))


def test_sgd_is_timms_nesterov_sgd_without_weight_decay():
    params = config("ade20k")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, params["optimizer"], params["lr"], params["weight_decay"])
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["nesterov"] is True  # timm 0.4.12 create_optimizer: "sgd" is Nesterov
        assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0
        assert group["lr"] == params["lr"]


def test_weight_decay_skips_what_timm_skipped():
    params = dict(config("ade20k"), backbone="vit_tiny_patch16_384", depth=1, crop_size=64)
    params.update(pretrained=False, num_tokens_shared=1)
    model = Segmenter(segmenter_config(params, num_classes=5))
    no_decay, decay = weight_decay_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"encoder.vit.pos_embed", "encoder.vit.cls_token", "decoder.cls_emb"} <= skipped
    assert {"encoder.vit.blocks.0.norm1.weight", "encoder.vit.blocks.0.attn.qkv.bias"} <= skipped
    assert {"encoder.vit.patch_embed.proj.weight", "decoder.proj_patch"} <= decayed
    assert all(p.ndim > 1 for p in decay["params"])
    assert not any(n.startswith("policy_net.") for n in skipped | decayed)  # frozen


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


# --- config values ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_config_schedule_is_the_authors(name):
    params, authors = config(name), AUTHORS[name]
    epoch = math.ceil(authors["train_images"] / authors["batch_size"])
    assert params["iterations"] == authors["epochs"] * epoch
    assert params["batch_size"] == authors["batch_size"]
    assert params["lr"] == authors["lr"]
    assert params["crop_size"] == authors["crop_size"]
    assert params["num_tokens_shared"] == authors["k"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_recipe_is_the_authors(name):
    params = config(name)
    authors = dict(
        backbone="vit_small_patch16_384",
        pretrained=True,
        decoder="mask_transformer",
        policy="policy_net",
        optimizer="sgd",
        weight_decay=0.0,
        warmup_iterations=0,
        drop_path_rate=0.1,
        class_weight_power=0.0,
        loss_stride=1,
        train_scale_range=[0.5, 2.0],
        photometric=True,
        train_unshared_fraction=0.0,
        grad_accum_steps=1,
        policy_feature_stride=32,
        policy_input_scale=1.0,
        policy_iterations=50000,
        policy_batch_size=8,
        policy_lr=5e-5,
        policy_weight_decay=1e-3,
    )
    assert {key: params[key] for key in authors} == authors


def test_dataset_long_side_caps_are_the_authors():
    from cts.data import ade20k, cityscapes, pascal_context

    assert ade20k.dataset_info().max_ratio == 4
    assert pascal_context.dataset_info().max_ratio == 8
    assert cityscapes.dataset_info().max_ratio == 2


def test_train_segmenter_gives_the_transform_the_datasets_long_side_cap(tmp_path, monkeypatch):
    import cts_stages.train_segmenter as stage
    from cts_stages.params import load_params

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


def mmseg_random_crop(label: np.ndarray, crop: int, rng, cat_max_ratio: float = 0.75):
    """mmseg 0.14.1 RandomCrop.__call__ and get_crop_bbox, written out (np.random.randint
    as Generator.integers): the window's top-left corner and how many tests it took."""

    def bbox():
        margin_h, margin_w = max(label.shape[0] - crop, 0), max(label.shape[1] - crop, 0)
        return rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)

    top, left = bbox()
    for tries in range(10):
        labels, cnt = np.unique(label[top : top + crop, left : left + crop], return_counts=True)
        cnt = cnt[labels != 255]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
            return (top, left), tries
        top, left = bbox()
    return (top, left), 10  # the eleventh draw, untested


def test_crop_is_mmsegs_random_crop_window_by_window():
    """Windows pass or fail by the share of the largest class among the labelled pixels
    (ignore left out, a one-class window failing, a share of exactly 3/4 failing): a 28 x 28
    block of class 1, a 16 x 16 block of class 2 (3/4 of a window holding it and class 0
    only) and ignore rows, so some windows pass at once, some after retries, some never."""
    label = np.zeros((96, 96), np.uint8)
    label[:28, :28] = 1
    label[44:60, 44:60] = 2
    label[76:] = 255
    image = coordinate_image(96, 96)
    tries = set()
    for seed in range(60):
        (top, left), tried = mmseg_random_crop(label, 32, rng(seed))
        tries.add(tried)
        window, crop = random_crop(image, label, 32, rng(seed))
        assert (int(window[0, 0, 0]), int(window[0, 0, 1])) == (top, left), seed
        assert np.array_equal(crop, label[top : top + 32, left : left + 32])
    assert tries == set(range(11))  # the first window, every retry, the eleventh


def test_crop_keeps_the_eleventh_draw_after_ten_failures():
    # One class: every test fails; the window is the eleventh draw of mmseg's sequence.
    label = np.zeros((64, 64), np.uint8)
    (top, left), tried = mmseg_random_crop(label, 32, rng(3))
    image, crop = random_crop(coordinate_image(64, 64), label, 32, rng(3))
    assert tried == 10 and (int(image[0, 0, 0]), int(image[0, 0, 1])) == (top, left)
    assert crop.shape == (32, 32)


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


def mmseg_photometric_distortion(rgb: np.ndarray, rng) -> np.ndarray:
    """mmseg 0.14.1 PhotoMetricDistortion.__call__ written out, on the BGR image mmcv
    loads (np.random.randint / uniform as the Generator's integers / uniform)."""

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img):
        return convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    def hsv_channel(img, channel, change):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, channel] = change(hsv[:, :, channel])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)

    img = np.ascontiguousarray(rgb[..., ::-1])
    if rng.integers(2):  # brightness
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):  # saturation
        img = hsv_channel(img, 1, lambda s: convert(s, alpha=rng.uniform(0.5, 1.5)))
    if rng.integers(2):  # hue
        img = hsv_channel(img, 0, lambda h: (h.astype(int) + rng.integers(-18, 18)) % 180)
    if mode == 0:
        img = contrast(img)
    return img[..., ::-1]


class CoinFlips:
    """A seeded generator whose coin flips (``integers(2)``) are given in order; every
    other draw comes from the generator."""

    def __init__(self, flips: list[int], seed: int) -> None:
        self.flips, self.inner = list(flips), np.random.default_rng(seed)

    def integers(self, *args):
        return self.flips.pop(0) if args == (2,) else self.inner.integers(*args)

    def uniform(self, *args):
        return self.inner.uniform(*args)


def colourful_image() -> np.ndarray:
    """Every level of every channel, saturated and grey pixels among them."""
    return np.random.default_rng(11).integers(0, 256, (16, 32, 3), dtype=np.uint8)


# Coin flips in mmseg's order: brightness, mode (1: contrast first), [contrast], saturation,
# hue, [contrast].
STEPS = {
    "brightness": [1, 0, 0, 0, 0],
    "contrast first": [0, 1, 1, 0, 0],
    "contrast last": [0, 0, 0, 0, 1],
    "saturation": [0, 0, 1, 0, 0],
    "hue": [0, 0, 0, 1, 0],
    "all, contrast first": [1, 1, 1, 1, 1],
    "all, contrast last": [1, 0, 1, 1, 1],
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("seed", [0, 2, 3])  # draws that change the image
def test_photometric_distortion_step_is_mmsegs(step, seed):
    image = colourful_image()
    expected = mmseg_photometric_distortion(image, CoinFlips(STEPS[step], seed))
    out = photometric_distortion(image.copy(), CoinFlips(STEPS[step], seed))
    assert not np.array_equal(expected, image)
    assert np.array_equal(out, expected)


def test_photometric_distortion_is_mmsegs_on_seeded_draws():
    image = colourful_image()
    for seed in range(20):
        expected = mmseg_photometric_distortion(image, rng(seed))
        assert np.array_equal(photometric_distortion(image.copy(), rng(seed)), expected), seed


def test_photometric_ranges_are_mmsegs():
    """brightness +-32, contrast and saturation x[0.5, 1.5], from the draws' extremes."""
    grey, shifts, scales = np.full((2, 2, 3), 128, np.uint8), [], []
    for seed in range(200):
        shifts.append(
            int(photometric_distortion(grey, CoinFlips(STEPS["brightness"], seed))[0, 0, 0]) - 128
        )
        scales.append(
            int(photometric_distortion(grey, CoinFlips(STEPS["contrast last"], seed))[0, 0, 0])
            / 128
        )
    assert -32 <= min(shifts) <= -30 and 30 <= max(shifts) <= 31  # uint8: truncated
    assert 0.5 <= min(scales) <= 0.52 and 1.48 <= max(scales) <= 1.5


# --- policy net ------------------------------------------------------------------------


def test_policy_recipes_are_the_authors():
    ade, pcontext, cityscapes = (policy_recipe(n) for n in CONFIGS)
    assert (ade.crop, ade.border_ignore, ade.constant_lr) == (False, True, True)
    assert (pcontext.crop, pcontext.short_side, pcontext.border_ignore) == (True, 512, False)
    assert (cityscapes.crop, cityscapes.short_side, cityscapes.border_ignore) == (
        True,
        None,
        False,
    )
    assert pcontext.constant_lr and cityscapes.constant_lr
    # policynet/train.py: AdamW at a constant lr, no schedule.
    for recipe in (ade, pcontext, cityscapes):
        factor = policy_lr_schedule(recipe, 50000)
        assert [factor(i) for i in (0, 1, 25000, 49999)] == [1.0] * 4
    # Synthetic and folder data keep this project's recipe (the default run unchanged).
    default = policy_recipe("synthetic")
    assert (default.crop, default.border_ignore, default.constant_lr) == (False, True, False)
    assert policy_lr_schedule(default, 10)(5) < 1.0


def test_policy_crop_recipe_resizes_the_short_side_then_crops():
    # Pascal-Context's geometry (short side 512, long side int(512 * long / short) as
    # torchvision's resize, a 480 crop at int(u * margin), then the flip) at a smaller
    # scale: a 59x100 image to short side 96 is 96x162 (162.7 truncated), then a 64 crop.
    # (Small images: OpenCV's thread pool, used on large ones, can deadlock the loader
    # workers that later tests fork from this process.)
    transform = PolicyTransform(size=64, patch_size=16, crop=True, short_side=96, **HALF)
    label = np.zeros((59, 100), np.uint8)
    out = transform(np.zeros((59, 100, 3), np.uint8), label, rng(2))
    assert out["image"].shape == (3, 64, 64) and out["target"].shape == (2, 2)
    # By hand: bilinear resize to 162 x 96 (w, h), the crop at int(u * margin), the flip,
    # then (x / 255 - 0.5) / 0.5.
    draws = rng(2)
    top, left = int(draws.random() * (96 - 64)), int(draws.random() * (162 - 64))
    image = np.random.default_rng(7).integers(0, 256, (59, 100, 3), dtype=np.uint8)
    window = cv2.resize(image, (162, 96), interpolation=cv2.INTER_LINEAR)
    window = window[top : top + 64, left : left + 64]
    if draws.random() < 0.5:
        window = window[:, ::-1]
    expected = torch.from_numpy((window.transpose(2, 0, 1) / 255 - 0.5) / 0.5).float()
    torch.testing.assert_close(transform(image, label, rng(2))["image"], expected)


def test_policy_crop_recipe_without_resize_crops_the_full_image():
    transform = PolicyTransform(size=32, patch_size=8, crop=True, flip=False, **HALF)
    out = transform(coordinate_image(64, 128), np.zeros((64, 128), np.uint8), rng(5))
    draws = rng(5)
    top, left = int(draws.random() * 32), int(draws.random() * 96)
    restored = ((out["image"] * 0.5 + 0.5) * 255).round()
    assert (int(restored[0, 0, 0]), int(restored[1, 0, 0])) == (top, left)


def test_policy_targets_without_the_border_rule():
    labels = torch.full((1, 64, 64), 3)
    labels[0, :4, :4] = 255  # one class + ignore in a border superpatch
    assert policy_targets(labels, 16)[0, 0, 0] == 255
    assert policy_targets(labels, 16, border_ignore=False)[0, 0, 0] == 0
    transform = PolicyTransform(size=64, patch_size=16, flip=False, border_ignore=False, **HALF)
    out = transform(np.zeros((64, 64, 3), np.uint8), labels[0].numpy().astype(np.uint8), rng())
    assert out["target"][0, 0] == 0 and out["target"][1, 1] == 1
