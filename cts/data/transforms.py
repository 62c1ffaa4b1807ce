"""Training, validation and policy-network transforms (OpenCV + NumPy, then torch).

Every transform is called as ``transform(image, label, rng) -> dict of tensors`` with
``image`` ``(H, W, 3)`` uint8 RGB, ``label`` ``(H, W)`` uint8 (class ids after the dataset's
label map, ``ignore_index`` = no class) and ``rng`` the sample's own generator, so results
are a function of the sample key only. Geometry follows mmsegmentation's Segmenter
pipeline: random rescale, crop with a class-ratio cap, flip, photometric distortion,
normalisation, padding. Mean and std are in [0, 1] units (timm's ``pretrained_cfg``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from cts.sharing import IGNORE_INDEX, policy_targets


def resize_short_side(image: np.ndarray, size: float, interpolation: int) -> np.ndarray:
    """Resize so the short side becomes ``size`` pixels, keeping the aspect ratio."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, new_size, interpolation=interpolation)


def keep_ratio_size(
    height: int, width: int, base_size: int, ratio: float, max_ratio: float
) -> tuple[int, int]:
    """``(height, width)`` after mmsegmentation's keep-ratio ``Resize`` at ``ratio``.

    The target scale is ``(int(max_ratio * base_size * ratio), int(base_size * ratio))``
    (long, short); the image is scaled by the largest factor that fits both, long side
    within the first and short side within the second, and each side rounded half up
    (mmcv's ``imrescale``: ``int(x * factor + 0.5)``).
    """
    long_target = int(max_ratio * base_size * ratio)
    short_target = int(base_size * ratio)
    factor = min(long_target / max(height, width), short_target / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def crop_box(shape: tuple[int, ...], crop_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Random top-left corner of a ``crop_size`` square (clipped to the image) in ``shape``."""
    top = rng.integers(0, max(shape[0] - crop_size, 0) + 1)
    left = rng.integers(0, max(shape[1] - crop_size, 0) + 1)
    return int(top), int(left)


def max_class_ratio(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of the most frequent class among the labelled pixels; 1.0 with fewer than 2
    classes (such a crop never passes the class-ratio test, as in mmsegmentation)."""
    counts = np.bincount(label.ravel(), minlength=256)
    counts[ignore_index] = 0
    if np.count_nonzero(counts) < 2:
        return 1.0
    return float(counts.max() / counts.sum())


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop_size: int,
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``crop_size`` crop where no class covers ``cat_max_ratio`` or more of the
    labelled pixels, as mmsegmentation's ``RandomCrop``: a window is drawn, then up to
    ``max_tries`` times it is tested and, if it fails, replaced by a new draw; after
    ``max_tries`` failures the last draw (the ``max_tries + 1``-th, untested) is kept."""
    if label.shape[0] <= crop_size and label.shape[1] <= crop_size:
        return image, label  # the one possible crop: no class-ratio test to repeat
    top, left = crop_box(label.shape, crop_size, rng)
    if cat_max_ratio < 1:
        for _ in range(max_tries):
            window = label[top : top + crop_size, left : left + crop_size]
            if max_class_ratio(window, ignore_index) < cat_max_ratio:
                break
            top, left = crop_box(label.shape, crop_size, rng)
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    return image[window], label[window]


def _affine(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion on uint8 RGB: each with probability 1/2,
    brightness +-32, contrast x[0.5, 1.5] (before or after the colour steps, at random),
    saturation x[0.5, 1.5], hue shift an integer in [-18, 18) (OpenCV's 0..180 hue scale;
    mmsegmentation draws it with numpy's ``randint(-18, 18)``, whose upper end is excluded)."""
    if rng.integers(2):
        image = _affine(image, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _affine(image, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _affine(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + rng.integers(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        image = _affine(image, alpha=rng.uniform(0.5, 1.5))
    return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)``: ``(x / 255 - mean) / std``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def pad_to(image: Tensor, label: Tensor, size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Pad ``(3, H, W)`` / ``(H, W)`` at the bottom and right to ``size`` (image 0, label
    ``ignore_index``)."""
    height, width = label.shape
    if height >= size and width >= size:
        return image, label
    padded_image = image.new_zeros(3, max(height, size), max(width, size))
    padded_image[:, :height, :width] = image
    padded_label = label.new_full((max(height, size), max(width, size)), ignore_index)
    padded_label[:height, :width] = label
    return padded_image, padded_label


def _label_tensor(label: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class TrainTransform:
    """Segmenter training augmentation.

    Random keep-ratio rescale at ``r ~ U(scale_range)``: short side to ``base_size * r``,
    long side at most ``max_ratio * base_size * r`` (:func:`keep_ratio_size`); random crop
    to ``crop_size`` with at most ``cat_max_ratio`` of one class (10 tries), horizontal flip
    (p = 0.5), photometric distortion (unless ``photometric`` is False), normalisation,
    padding to ``crop_size`` (image 0 after normalisation, label ``ignore_index``).

    Returns ``{"image": (3, crop, crop) float32, "label": (crop, crop) int64}``.
    """

    def __init__(
        self,
        base_size: int,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        photometric: bool = True,
        max_ratio: float = 4,
    ) -> None:
        self.base_size = base_size
        self.max_ratio = max_ratio
        self.crop_size = crop_size
        self.photometric = photometric
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale_range = scale_range
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Tensor]:
        ratio = rng.uniform(*self.scale_range)
        height, width = keep_ratio_size(*label.shape[:2], self.base_size, ratio, self.max_ratio)
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        image, label = random_crop(
            image, label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index
        )
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        image_t, label_t = pad_to(
            normalize(image, self.mean, self.std),
            _label_tensor(label),
            self.crop_size,
            self.ignore_index,
        )
        return {"image": image_t, "label": label_t}


class ValTransform:
    """Validation: the image normalised at its original size, the label as it is.

    The evaluation protocol (:mod:`cts.inference`) resizes the original image once per
    scale, as mmsegmentation's ``MultiScaleFlipAug`` does, and scores at the label's
    resolution. Images of one split therefore differ in size: batch them one at a time.

    Returns ``{"image": (3, H, W) float32, "label": (H, W) int64}``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Tensor]:
        return {"image": normalize(image, self.mean, self.std), "label": _label_tensor(label)}


class PolicyTransform:
    """Policy-network samples and their superpatch targets.

    Two geometries, those of the authors' per-dataset policy data (``policynet/policynet/
    data_*.py``):

    - ``crop=False`` (ADE20K): the whole image resized to ``size`` (label with nearest
      interpolation);
    - ``crop=True`` (Pascal-Context, Cityscapes): the short side resized to ``short_side``
      (None: the image as it is; the long side ``int(short_side * long / short)``, as
      torchvision's ``resize``), then a ``size`` crop at a uniform random offset
      (``int(u * margin)`` for top, then left), padded (image 0 after normalisation, label
      ``ignore_index``) if the image is smaller.

    Then a horizontal flip (p = 0.5 when ``flip``) and the targets of
    :func:`cts.sharing.policy_targets` (1 uniform, 0 not, ``ignore_index``; the border rule
    only when ``border_ignore``, as the authors' ADE20K targets and not their others).

    Returns ``{"image": (3, H, W) float32, "target": (H / 2p, W / 2p) int64}``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        size: int | tuple[int, int] = 512,
        patch_size: int = 16,
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
        crop: bool = False,
        short_side: int | None = None,
        border_ignore: bool = True,
    ) -> None:
        self.height, self.width = (size, size) if isinstance(size, int) else size
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_size = patch_size
        self.flip = flip
        self.ignore_index = ignore_index
        self.crop = crop
        self.short_side = short_side
        self.border_ignore = border_ignore

    def _resize_short_side(
        self, image: np.ndarray, label: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        height, width = label.shape
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.short_side, int(self.short_side * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)  # (w, h)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        return image, cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)

    def _random_crop(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        top = int(rng.random() * max(label.shape[0] - self.height, 0))
        left = int(rng.random() * max(label.shape[1] - self.width, 0))
        window = (slice(top, top + self.height), slice(left, left + self.width))
        return image[window], label[window]

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Tensor]:
        if not self.crop:
            size = (self.width, self.height)
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        else:
            if self.short_side is not None:
                image, label = self._resize_short_side(image, label)
            image, label = self._random_crop(image, label, rng)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image_t, label_t = normalize(image, self.mean, self.std), _label_tensor(label)
        height, width = label_t.shape
        if (height, width) != (self.height, self.width):  # a crop of a smaller image
            padded = image_t.new_zeros(3, self.height, self.width)
            padded[:, :height, :width] = image_t
            image_t = padded
            label_t = torch.nn.functional.pad(
                label_t, (0, self.width - width, 0, self.height - height), value=self.ignore_index
            )
        targets = policy_targets(
            label_t[None], self.patch_size, self.ignore_index, border_ignore=self.border_ignore
        )
        return {"image": image_t, "target": targets[0]}
