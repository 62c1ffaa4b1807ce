"""Segment images of any size with a trained or imported Segmenter; write pictures.

Per image ``NAME`` the output folder gets ``NAME_labels.png`` (the class ids as pixel
values in a palette PNG, which viewers show in the class colours; 16-bit grey above 256
classes), ``NAME_color.png`` (the class colours), ``NAME_overlay.png`` (the colours over the
image) and ``NAME_shared.png`` (the image resized to the crop, its prediction overlaid, every
superpatch that shared one token outlined black and white). The last three have a legend of
the predicted classes and a caption below the picture, whose pixels start at the top left.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from cts.data.io import (
    IMAGE_SUFFIXES,
    CorruptFileError,
    read_image,
    write_image,
    write_label_png,
)
from cts.geometry import check_num_shared, num_superpatches, superpatch_size
from cts.inference import EvalGeometry, normalised_resize, predict_labels, scaled_image
from cts.models import Segmenter
from cts.models.upsample import upsample_argmax
from cts.progress import progress_bar
from cts.visualize import (
    annotate,
    class_names_for,
    classes_present,
    colorize,
    denormalize,
    legend_entries,
    outline_shared,
    overlay,
    palette,
)

OUTPUTS = ("labels", "color", "overlay", "shared")


@dataclass
class PredictionReport:
    """What :func:`predict_images` did: images written and images skipped (path, reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def find_images(path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The image itself, or a folder's .jpg/.jpeg/.png files (recursive, sorted; hidden
    files and anything under ``exclude`` left out)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found (an image or a folder of images)")
    skip = Path(exclude).resolve() if exclude is not None else None
    images = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        if skip is not None and (skip == file.resolve() or skip in file.resolve().parents):
            continue
        images.append(file)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return images


def output_stems(images: Sequence[Path], root: Path, out_dir: Path) -> list[Path]:
    """``out_dir/<relative folder>/<stem>`` per image; the full name where stems collide."""
    relative = [image.relative_to(root) for image in images]
    stems = [r.parent / r.stem for r in relative]
    taken = {s: stems.count(s) for s in stems}
    return [
        out_dir / (s if taken[s] == 1 else r.parent / r.name.replace(".", "_"))
        for s, r in zip(stems, relative, strict=True)
    ]


class Predictor:
    """Sliding-window segmentation of whole images plus the one-crop sharing picture.

    Args:
        model: a Segmenter (eval mode is set).
        device: where it runs.
        num_tokens_shared: K for every forward (default: the model's).
        short_side: images are resized to this short side (long side at most 4 times it),
            then windowed as the evaluation does (default: the crop size).
        stride: window stride, at most the crop (default: the crop size; the window is the crop).
        batch_size: windows per forward.
        class_names: one name per class, for the legends (default: ``class 0``, ...).
    """

    def __init__(
        self,
        model: Segmenter,
        device: torch.device | str = "cpu",
        num_tokens_shared: int | None = None,
        short_side: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        class_names: Sequence[str] | None = None,
    ) -> None:
        config = model.config
        self.class_names = class_names_for(config.num_classes, class_names)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.crop = config.crop_size
        k = model.num_tokens_shared if num_tokens_shared is None else num_tokens_shared
        check_num_shared(k, num_superpatches(self.crop, model.patch_size), f"crop_size {self.crop}")
        if config.policy == "none" and k:
            raise ValueError(f"the model has policy none: it cannot share tokens (K={k} given)")
        if config.policy == "oracle" and k:
            raise ValueError("policy oracle needs ground-truth labels: predict with K=0")
        self.num_tokens_shared = k
        self.geometry = EvalGeometry(short_side or self.crop, self.crop, stride or self.crop)
        self.batch_size = batch_size
        self.colours = palette(config.num_classes)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """Window scores on the patch grid: the evaluation upsamples them only where it must
        (:func:`cts.inference.predict_labels`)."""
        out = self.model(images, num_tokens_shared=self.num_tokens_shared, upsample=False)
        return out.logits.float()

    @torch.inference_mode()
    def labels(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> class ids ``(H, W)`` (sliding window of the crop),
        uint8 (uint16 above 256 classes): a 6000 x 6000 map is 36 MB, not 288 as int64."""
        pixels = torch.from_numpy(rgb).to(self.device)
        config = self.model.config
        image = scaled_image(pixels, self.geometry, config.mean, config.std)
        labels = predict_labels(
            self._forward,
            image,
            config.num_classes,
            self.geometry,
            out_size=tuple(rgb.shape[:2]),
            batch_size=self.batch_size,
        )
        if config.num_classes <= 256:
            return labels[0].to(torch.uint8).cpu().numpy()
        return labels[0].to(torch.int32).cpu().numpy().astype(np.uint16)

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(H, W, 3)`` uint8 RGB -> class ids ``(H, W)`` (see :meth:`labels`) and the
        sharing picture."""
        labels = self.labels(rgb)
        pixels = torch.from_numpy(rgb).to(self.device)
        config = self.model.config
        size = (self.crop, self.crop)
        crop = normalised_resize(pixels, size, config.mean, config.std)
        out = self.model(crop, num_tokens_shared=self.num_tokens_shared, upsample=False)
        crop_rgb = denormalize(crop[0].cpu().numpy(), self.model.config.mean, self.model.config.std)
        crop_labels = upsample_argmax(out.logits, size)[0].cpu().numpy()
        picture = outline_shared(
            overlay(crop_rgb, crop_labels, self.colours),
            out.shared[0].cpu().numpy(),
            superpatch_size(self.model.patch_size),
        )
        return labels, picture

    def write(self, rgb: np.ndarray, stem: Path) -> list[Path]:
        """Predict one image and write its four pictures next to ``stem``: the ids as a
        palette PNG, and the colour, overlay and sharing pictures each with a legend of the
        predicted classes and a caption."""
        labels, picture = self.predict(rgb)
        # One legend for the three: the classes of the full-size prediction. The sharing
        # picture's own prediction (one forward of the resized image) can differ in details.
        entries = legend_entries(classes_present(labels), self.class_names, self.colours)
        superpatches = num_superpatches(self.crop, self.model.patch_size)
        side = superpatch_size(self.model.patch_size)
        k, name, (height, width) = self.num_tokens_shared, stem.name, labels.shape
        crop = f"the {self.crop}x{self.crop} crop"
        resized = (
            f"at {crop}" if height == width == self.crop else f"{width}x{height} resized to {crop}"
        )
        pictures = {
            "color": annotate(
                colorize(labels, self.colours), entries, f"{name}: predicted classes"
            ),
            "overlay": annotate(
                overlay(rgb, labels, self.colours),
                entries,
                f"{name}: class colours blended half over the image",
            ),
            "shared": annotate(
                picture,
                entries,
                f"{name} {resized}. K={k}: {k} of {superpatches} superpatches shared (outlined), "
                f"each {side}x{side} px: one token",
            ),
        }
        paths = [write_label_png(stem.parent / f"{name}_labels.png", labels, self.colours)]
        for kind in OUTPUTS[1:]:
            paths.append(write_image(stem.parent / f"{name}_{kind}.png", pictures[kind]))
        return paths


def predict_images(
    predictor: Predictor,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: bool = True,
) -> PredictionReport:
    """Segment an image or every image of a folder into ``out_dir``.

    An image that cannot be read is skipped and listed in the report; the others are still
    written. Subfolders are mirrored in ``out_dir``.
    """
    inputs, out_dir = Path(inputs), Path(out_dir)
    images = find_images(inputs, exclude=out_dir)
    root = inputs if inputs.is_dir() else inputs.parent
    stems = output_stems(images, root, out_dir)
    report = PredictionReport()
    columns = (
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with progress_bar(*columns, disable=not progress) as bar:
        task = bar.add_task("", total=len(images))
        for image, stem in zip(images, stems, strict=True):
            bar.update(task, description=image.name)
            try:
                rgb = read_image(image)
            except (CorruptFileError, ValueError, OSError) as error:
                report.skipped.append((image, str(error)))
            else:
                predictor.write(rgb, stem)
                report.written.append(image)
            bar.advance(task)
    return report
