"""Segment images of any size with a trained or imported Segmenter; write pictures.

Per image ``NAME`` (its full file name, so ``x.png``, ``x.jpg`` and ``x_png.png`` each get
their own pictures, in the subfolder the image has under the input folder) the output folder
gets ``NAME_labels.png`` (the class ids as pixel values in a palette PNG, which viewers show
in the class colours; 16-bit grey above 256 classes), ``NAME_color.png`` (the class colours),
``NAME_overlay.png`` (the colours over the image) and ``NAME_shared.png`` (the image resized
to the crop, its prediction overlaid, every superpatch that shared one token outlined black
and white). The last three have a legend of the predicted classes and a caption below the
picture, whose pixels start at the top left.

The labels are computed as the evaluation computes them (:mod:`cts.inference`), with the
sizes the checkpoint was evaluated with (``eval_geometry`` in a trained checkpoint).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
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
from cts.geometry import (
    check_num_shared,
    num_patches,
    num_superpatches,
    superpatch_size,
    tokens_kept,
)
from cts.import_checkpoint import load_model_and_geometry
from cts.inference import EvalGeometry, normalised_resize, predict_labels, scaled_image
from cts.models import Segmenter, SegmenterOutput
from cts.models.upsample import upsample_argmax
from cts.progress import progress_bar
from cts.sharing import check_threshold
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
    """The image itself, or a folder's .jpg/.jpeg/.png files (recursive, through symlinked
    folders too; sorted; hidden files and folders and anything under ``exclude`` left out).
    A link to a folder that holds it (a loop) is not entered again."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found (an image or a folder of images)")
    skip = Path(exclude).resolve() if exclude is not None else None
    images = sorted(
        file
        for file in _files(path, frozenset())
        if file.suffix.lower() in IMAGE_SUFFIXES
        and (skip is None or not file.resolve().is_relative_to(skip))
    )
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return images


def _files(folder: Path, above: frozenset[Path]) -> Iterator[Path]:
    """Files under ``folder``, not hidden, following symlinked folders except into a folder
    of ``above`` (the real paths of the folders that hold it). A broken link is listed: its
    image is then reported unreadable, not silently left out."""
    real = folder.resolve()
    if real in above:
        return
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _files(entry, above | {real})
        elif entry.is_file() or entry.is_symlink():
            yield entry


def output_stems(images: Sequence[Path], root: Path, out_dir: Path) -> list[Path]:
    """``out_dir/<relative path of the image>`` per image, its file name kept whole: the
    pictures ``<that>_<kind>.png`` of two inputs never collide (kinds are not file names)."""
    return [out_dir / image.relative_to(root) for image in images]


def output_paths(stem: Path) -> list[Path]:
    """The pictures of one image, in :data:`OUTPUTS` order."""
    return [stem.parent / f"{stem.name}_{kind}.png" for kind in OUTPUTS]


def plan_outputs(
    inputs: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False
) -> list[tuple[Path, Path]]:
    """``(image, output stem)`` per input image, checked before any work: ``out_dir`` must be
    a folder or not exist yet (no file in its place or above it), and none of the pictures
    may exist unless ``force``."""
    inputs, out_dir = Path(inputs), Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(
                    f"output folder {out_dir}: {folder} is a file, not a folder: give --out a "
                    "new or existing folder"
                )
            break
    images = find_images(inputs, exclude=out_dir)
    root = inputs if inputs.is_dir() else inputs.parent
    stems = output_stems(images, root, out_dir)
    existing = [path for stem in stems for path in output_paths(stem) if path.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(
            f"{existing[0]} exists{more}: pass --force to overwrite, or give another --out"
        )
    return list(zip(images, stems, strict=True))


def window_geometry(
    crop: int,
    stored: EvalGeometry | None = None,
    short_side: int | None = None,
    stride: int | None = None,
) -> EvalGeometry:
    """The sliding-window sizes: the checkpoint's evaluation geometry (``stored``), else
    the crop as short side, window and stride with a long side at most 4 times the short
    one; ``short_side`` and ``stride`` replace its base size and stride."""
    base = stored or EvalGeometry(crop, crop, crop)
    return EvalGeometry(
        short_side or base.base_size, base.window, stride or base.stride, base.max_ratio
    )


def missing_geometry_note(checkpoint: str | os.PathLike, crop: int) -> str:
    """One line for a checkpoint without evaluation sizes: what is done instead."""
    return (
        f"note: {checkpoint} stores no evaluation geometry (an import, or trained before "
        f"checkpoints kept it): images are resized to a short side of {crop} (long side at "
        f"most 4 times it), windows of {crop} with stride {crop}; --short-side and --stride "
        "set them"
    )


def sharing_setting(
    model: Segmenter, num_tokens_shared: int | None = None, share_threshold: float | None = None
) -> tuple[int | None, float | None]:
    """``(K, None)`` for a fixed K, ``(None, t)`` for K per image by threshold ``t``.

    An explicit K wins, then an explicit threshold, then the model's own (its threshold if it
    was configured with one, else its K). A setting the model cannot run is one line.
    """
    config = model.config
    if num_tokens_shared is not None and share_threshold is not None:
        raise ValueError(
            f"num_tokens_shared={num_tokens_shared} and share_threshold={share_threshold}: "
            "give one (a fixed K, or K per image by threshold)"
        )
    threshold = config.share_threshold if share_threshold is None else share_threshold
    if num_tokens_shared is None and threshold is not None and config.policy != "none":
        check_threshold(threshold)
        _check_policy_shares(config.policy, f"share_threshold={threshold}")
        return None, threshold
    if num_tokens_shared is None and share_threshold is not None:
        raise ValueError(f"the model has policy none: it cannot share tokens ({share_threshold=})")
    k = model.num_tokens_shared if num_tokens_shared is None else num_tokens_shared
    check_num_shared(
        k, num_superpatches(config.crop_size, model.patch_size), f"crop_size {config.crop_size}"
    )
    if k:
        _check_policy_shares(config.policy, f"K={k}")
    return k, None


def _check_policy_shares(policy: str, setting: str) -> None:
    if policy == "none":
        raise ValueError(f"the model has policy none: it cannot share tokens ({setting} given)")
    if policy == "oracle":
        raise ValueError(f"policy oracle needs ground-truth labels: predict with K=0 ({setting})")


class Predictor:
    """Sliding-window segmentation of whole images plus the one-crop sharing picture.

    Args:
        model: a Segmenter (eval mode is set).
        device: where it runs.
        num_tokens_shared: K for every forward (default: the model's, see
            :func:`sharing_setting`).
        share_threshold: K per image instead: superpatches the policy scores at least this
            share a token (default: the model's threshold, if it has one).
        short_side: images are resized to this short side (long side at most ``max_ratio``
            times it), then windowed as the evaluation does (default: the geometry's base
            size).
        stride: window stride, at most the window (default: the geometry's).
        batch_size: windows per forward.
        class_names: one name per class, for the legends (default: ``class 0``, ...).
        geometry: the sizes the checkpoint was evaluated with
            (:func:`cts.checkpoint.stored_eval_geometry`); None: see :func:`window_geometry`.
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
        geometry: EvalGeometry | None = None,
        share_threshold: float | None = None,
    ) -> None:
        config = model.config
        self.class_names = class_names_for(config.num_classes, class_names)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.crop = config.crop_size
        self.num_tokens_shared, self.share_threshold = sharing_setting(
            model, num_tokens_shared, share_threshold
        )
        self.geometry = window_geometry(self.crop, geometry, short_side, stride)
        self.batch_size = batch_size
        self.colours = palette(config.num_classes)

    def with_sharing(
        self, num_tokens_shared: int | None = None, share_threshold: float | None = None
    ) -> Predictor:
        """This predictor (same model, sizes, names) with another sharing setting; both None:
        the model's own."""
        other = copy.copy(self)
        other.num_tokens_shared, other.share_threshold = sharing_setting(
            self.model, num_tokens_shared, share_threshold
        )
        return other

    def _model_output(self, images: torch.Tensor) -> SegmenterOutput:
        return self.model(
            images,
            num_tokens_shared=self.num_tokens_shared,
            share_threshold=self.share_threshold,
            upsample=False,
        )

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """Window scores on the patch grid: the evaluation upsamples them only where it must
        (:func:`cts.inference.predict_labels`)."""
        return self._model_output(images).logits.float()

    @torch.inference_mode()
    def labels(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> class ids ``(H, W)`` (sliding window, :attr:`geometry`),
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
        sharing picture (see :meth:`sharing_picture`)."""
        return self.labels(rgb), self.sharing_picture(rgb)[0]

    @torch.inference_mode()
    def sharing_picture(self, rgb: np.ndarray) -> tuple[np.ndarray, int]:
        """The image resized to the crop, one forward's prediction overlaid and every shared
        superpatch outlined, ``(crop, crop, 3)`` uint8; and how many superpatches shared."""
        pixels = torch.from_numpy(rgb).to(self.device)
        config = self.model.config
        size = (self.crop, self.crop)
        crop = normalised_resize(pixels, size, config.mean, config.std)
        out = self._model_output(crop)
        crop_rgb = denormalize(crop[0].cpu().numpy(), config.mean, config.std)
        crop_labels = upsample_argmax(out.logits, size)[0].cpu().numpy()
        shared = out.shared[0].cpu().numpy()
        overlaid = overlay(crop_rgb, crop_labels, self.colours)
        picture = outline_shared(overlaid, shared, superpatch_size(self.model.patch_size))
        return picture, int(shared.sum())

    def _sharing_caption(self, num_shared: int) -> str:
        patch = self.model.patch_size
        side, patches = superpatch_size(patch), num_patches(self.crop, patch)
        setting = (
            f"K={num_shared}"
            if self.share_threshold is None
            else f"threshold {self.share_threshold:g}"
        )
        return (
            f"{setting}: {num_shared} of {num_superpatches(self.crop, patch)} superpatches "
            f"shared (outlined), each {side}x{side} px: one token; "
            f"{tokens_kept(patches, num_shared)} of {patches} tokens"
        )

    def write(self, rgb: np.ndarray, stem: Path) -> list[Path]:
        """Predict one image and write its four pictures next to ``stem``: the ids as a
        palette PNG, and the colour, overlay and sharing pictures each with a legend of the
        predicted classes and a caption."""
        labels = self.labels(rgb)
        picture, num_shared = self.sharing_picture(rgb)
        # One legend for the three: the classes of the full-size prediction. The sharing
        # picture's own prediction (one forward of the resized image) can differ in details.
        entries = legend_entries(classes_present(labels), self.class_names, self.colours)
        name, (height, width) = stem.name, labels.shape
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
                picture, entries, f"{name} {resized}. {self._sharing_caption(num_shared)}"
            ),
        }
        paths = output_paths(stem)
        write_label_png(paths[0], labels, self.colours)
        for kind, path in zip(OUTPUTS[1:], paths[1:], strict=True):
            write_image(path, pictures[kind])
        return paths


def load_predictor(
    checkpoint: str | os.PathLike,
    device: torch.device | str = "cpu",
    num_tokens_shared: int | None = None,
    short_side: int | None = None,
    stride: int | None = None,
    class_names: Sequence[str] | None = None,
    trust: bool = False,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    share_threshold: float | None = None,
) -> Predictor:
    """A :class:`Predictor` of a cts or original checkpoint, windowing images with the sizes
    the checkpoint was evaluated with; one without them is said once through ``warn``
    (:func:`missing_geometry_note`). ``trust``: see :func:`cts.load_model`."""
    model, geometry = load_model_and_geometry(checkpoint, device, num_tokens_shared, trust=trust)
    if geometry is None:
        warn(missing_geometry_note(checkpoint, model.config.crop_size))
    return Predictor(
        model,
        device,
        num_tokens_shared,
        short_side,
        stride,
        class_names=class_names,
        geometry=geometry,
        share_threshold=share_threshold,
    )


def predict_images(
    predictor: Predictor,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: bool = True,
    force: bool = False,
) -> PredictionReport:
    """Segment an image or every image of a folder into ``out_dir``.

    An image that cannot be read is skipped and listed in the report; the others are still
    written. Subfolders are mirrored in ``out_dir``. Pictures that exist stop it before any
    work (:func:`plan_outputs`) unless ``force``.
    """
    plan = plan_outputs(inputs, out_dir, force)
    report = PredictionReport()
    columns = (
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with progress_bar(*columns, disable=not progress) as bar:
        task = bar.add_task("", total=len(plan))
        for image, stem in plan:
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
