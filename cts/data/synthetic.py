"""Embedded synthetic dataset: outdoor-like scenes generated from a seed, no download.

What CTS exploits is there (large regions: sky, ground, buildings, water, mountains) and so
is what makes it hard: wavy and slanted boundaries, objects down to thin poles and wires and
small blobs, several classes per image, textures that identify a class while colours
overlap between classes (a per-image random colour around a shared grey-ish palette, plus a
global colour cast), anti-aliased edges, blur and noise in the image while the label map
stays hard. Ignore (255) marks "unknown" objects and, on some objects, a thin outline band.

Each image is a function of ``(seed, split, index)`` only, so a set can be generated in
parallel and reproduced bit for bit.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cts.data.info import DatasetInfo, write_dataset_info
from cts.data.io import staging_dir, write_image
from cts.sharing import IGNORE_INDEX

SUBPIXEL_BITS = 4  # OpenCV drawing with 1/16 pixel precision
_ONE = 1 << SUBPIXEL_BITS


@dataclass(frozen=True)
class ClassStyle:
    """How a class looks: texture kind and parameter ranges, mean colour, contrast.

    Textures: ``gradient`` (ramp along ``angle``), ``stripes`` (sine of ``period`` px along
    ``angle``), ``checker`` (squares of ``period`` px rotated by ``angle``), ``grain``
    (Gaussian-blurred noise of sigma ``period``), ``coarse`` (smooth noise of cell
    ``period`` px). Angles in degrees, 0 = varies along x.
    """

    name: str
    mean_rgb: tuple[float, float, float]
    texture: str
    angle: tuple[float, float] = (0.0, 0.0)
    period: tuple[float, float] = (1.0, 1.0)
    contrast: float = 40.0


STYLES = (
    ClassStyle("sky", (135, 155, 175), "gradient", (80, 100), contrast=30),
    ClassStyle("grass", (110, 130, 95), "grain", period=(0.6, 1.2), contrast=60),
    ClassStyle("road", (120, 118, 115), "grain", period=(2.0, 3.5), contrast=25),
    ClassStyle("building", (145, 132, 122), "stripes", (-5, 5), (7, 13), contrast=50),
    ClassStyle("tree", (95, 118, 88), "coarse", period=(5, 9), contrast=70),
    ClassStyle("water", (100, 125, 140), "stripes", (85, 95), (3, 6), contrast=40),
    ClassStyle("mountain", (118, 112, 108), "coarse", period=(16, 28), contrast=45),
    ClassStyle("vehicle", (135, 115, 110), "checker", (-20, 20), (5, 9), contrast=60),
    ClassStyle("person", (145, 125, 112), "stripes", (35, 55), (4, 7), contrast=55),
    ClassStyle("pole", (125, 122, 120), "gradient", (-10, 10), contrast=40),
    ClassStyle("sign", (150, 135, 110), "stripes", (-55, -35), (8, 12), contrast=60),
    ClassStyle("wire", (90, 88, 92), "gradient", (80, 100), contrast=15),
)
SKY, GRASS, ROAD, BUILDING, TREE, WATER, MOUNTAIN, VEHICLE, PERSON, POLE, SIGN, WIRE = range(12)
TEXTURES = ("gradient", "stripes", "checker", "grain", "coarse")


def extra_style(class_id: int) -> ClassStyle:
    """Style of an object class beyond the designed ones, fixed by its id."""
    rng = np.random.default_rng(class_id)
    angle = float(rng.uniform(-90, 90))
    period = float(rng.uniform(3, 14))
    return ClassStyle(
        f"object_{class_id}",
        tuple(float(v) for v in rng.uniform(90, 160, 3)),
        TEXTURES[int(rng.integers(len(TEXTURES)))],
        (angle - 5, angle + 5),
        (period, period * 1.3),
        contrast=float(rng.uniform(30, 70)),
    )


def class_styles(num_classes: int) -> tuple[ClassStyle, ...]:
    """Styles of classes ``0..num_classes-1``: the designed ones first, then extras."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: the scenes need at least 2 (sky, ground)")
    if num_classes >= IGNORE_INDEX:
        raise ValueError(f"num_classes={num_classes}: at most {IGNORE_INDEX - 1}")
    return STYLES[:num_classes] + tuple(extra_style(k) for k in range(len(STYLES), num_classes))


# --- textures ------------------------------------------------------------------------------


def _pattern(
    kind: str, angle: float, period: float, box: tuple[int, int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """Texture pattern in [0, 1] over ``box = (x, y, w, h)`` in image coordinates."""
    x0, y0, w, h = box
    theta = math.radians(angle)
    ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    along = xs * math.cos(theta) + ys * math.sin(theta)  # (h, w) by broadcasting
    if kind == "gradient":
        return (along - along.min()) / max(float(np.ptp(along)), 1.0)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(along * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
    if kind == "checker":
        across = -xs * math.sin(theta) + ys * math.cos(theta)
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(np.float32)
    if kind == "grain":
        noise = cv2.GaussianBlur(rng.standard_normal((h, w), np.float32), (0, 0), period)
    else:  # coarse: bicubic upsampling of a low-resolution noise grid
        cells = rng.standard_normal((h // int(period) + 2, w // int(period) + 2), np.float32)
        noise = cv2.resize(cells, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(0.5 + 0.25 * noise / (float(noise.std()) + 1e-6), 0, 1)


class _Scene:
    """An image being painted layer by layer, with its hard label map."""

    def __init__(self, size: int, styles: tuple[ClassStyle, ...], rng: np.random.Generator):
        self.size = size
        self.rng = rng
        self.styles = styles
        self.image = np.zeros((size, size, 3), np.float32)
        self.label = np.full((size, size), IGNORE_INDEX, np.uint8)
        # Per-image colours around each class's mean: broad enough that colour ranges of
        # different classes overlap.
        self.colors = [
            np.clip(np.asarray(s.mean_rgb) + rng.normal(0, 35, 3), 15, 240).astype(np.float32)
            for s in styles
        ]
        self.horizon = _wave(
            rng, size, rng.uniform(0.3, 0.6) * size, rng.uniform(0, 0.05) * size, 0
        )

    def on_ground(self, depth: float) -> tuple[float, float, float]:
        """A random column x, the ground y at relative ``depth`` (0 = horizon, 1 = bottom)
        there, and the perspective size factor at that y."""
        x = self.rng.uniform(0, self.size)
        top = float(self.horizon[int(x)])
        y = top + depth * (self.size - top)
        far = float(self.horizon.mean())
        return x, y, 0.3 + 1.2 * (y - far) / max(self.size - far, 1.0)

    def has(self, class_id: int) -> bool:
        return class_id < len(self.styles)

    def canvas(self) -> np.ndarray:
        return np.zeros((self.size, self.size), np.uint8)

    def texture(self, class_id: int, box: tuple[int, int, int, int]) -> np.ndarray:
        rng = self.rng
        if class_id == IGNORE_INDEX:
            texture = str(rng.choice(TEXTURES))
            style = ClassStyle(
                "unknown", tuple(rng.uniform(60, 200, 3)), texture, (-90, 90), (3, 15)
            )
            color = np.asarray(style.mean_rgb, dtype=np.float32)
        else:
            style, color = self.styles[class_id], self.colors[class_id]
        angle, period = rng.uniform(*style.angle), rng.uniform(*style.period)
        pattern = _pattern(style.texture, angle, period, box, rng)
        second = color + rng.normal(0, style.contrast, 3).astype(np.float32)
        return color + (second - color) * pattern[..., None]

    def paint(self, class_id: int, alpha: np.ndarray, outline: int = 0) -> None:
        """Composite class texture through an anti-aliased ``alpha`` (uint8, 255 = inside);
        the label takes the class where alpha >= 1/2, or ignore in an ``outline`` band."""
        x, y, w, h = cv2.boundingRect(alpha)
        if w == 0 or h == 0:
            return
        a = alpha[y : y + h, x : x + w].astype(np.float32)[..., None] / 255
        region = self.image[y : y + h, x : x + w]
        region += (self.texture(class_id, (x, y, w, h)) - region) * a
        inside = a[..., 0] >= 0.5
        self.label[y : y + h, x : x + w][inside] = class_id
        if outline:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * outline + 1,) * 2)
            band = cv2.morphologyEx(inside.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
            self.label[y : y + h, x : x + w][band] = IGNORE_INDEX

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Camera effects (illumination ramp, colour cast, blur, noise) -> uint8 image."""
        rng, size = self.rng, self.size
        ramp = np.linspace(-1, 1, size, dtype=np.float32)
        ramp = ramp[None, :] if rng.random() < 0.5 else ramp[:, None]
        light = 1 + rng.uniform(-0.15, 0.15) * ramp
        image = self.image * light[..., None] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.0))
        image += rng.uniform(2, 5) * rng.standard_normal(image.shape, np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), self.label


# --- shapes: anti-aliased alpha canvases, coordinates in pixels (floats) -----------------


def _points(points) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _point(xy) -> tuple[int, int]:
    x, y = _points(xy)
    return int(x), int(y)


def _fill(alpha: np.ndarray, points) -> np.ndarray:
    cv2.fillPoly(alpha, [_points(points)], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    return alpha


def _disc(alpha: np.ndarray, center, radius: float) -> None:
    cv2.circle(alpha, _point(center), round(radius * _ONE), 255, -1, cv2.LINE_AA, SUBPIXEL_BITS)


def _stroke(alpha: np.ndarray, points, thickness: int) -> np.ndarray:
    cv2.polylines(alpha, [_points(points)], False, 255, thickness, cv2.LINE_AA, SUBPIXEL_BITS)
    return alpha


def _below_curve(size: int, curve: np.ndarray) -> np.ndarray:
    """Alpha of the region under ``curve`` (y per column), anti-aliased by coverage."""
    ys = np.arange(size, dtype=np.float32)[:, None]
    return (np.clip(ys - curve[None, :] + 0.5, 0, 1) * 255).astype(np.uint8)


def _wave(
    rng: np.random.Generator, size: int, base: float, amplitude: float, rough: float
) -> np.ndarray:
    """A horizon-like curve, ``(size,)`` y values: two sines plus ``rough`` sharp peaks."""
    xs = np.arange(size, dtype=np.float32)
    curve = np.full(size, base, np.float32)
    for amp, wavelength in (
        (amplitude, rng.uniform(0.5, 1.5)),
        (amplitude / 4, rng.uniform(0.1, 0.3)),
    ):
        curve += amp * np.sin(2 * np.pi * xs / (wavelength * size) + rng.uniform(0, 2 * np.pi))
    if rough:  # triangle wave: peaks pointing up
        triangle = 2 * np.abs((xs / (rng.uniform(0.15, 0.4) * size) + rng.random()) % 1 - 0.5)
        curve -= rough * (1 - triangle)
    return curve


def _blob(scene: _Scene, center, radius: float) -> np.ndarray:
    """A random star-shaped polygon of about ``radius``."""
    rng = scene.rng
    corners = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.5, 1.0, corners)
    outline = np.asarray(center) + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    return _fill(scene.canvas(), outline)


# --- scene layers, back to front ---------------------------------------------------------


def _landscape(scene: _Scene) -> None:
    """Sky, optional mountain ridge, ground (grass, road or water) below a wavy horizon,
    a second ground behind a slanted boundary, a road to a vanishing point, ground patches."""
    rng, size, s = scene.rng, scene.size, float(scene.size)
    scene.paint(SKY, np.full((size, size), 255, np.uint8))
    if scene.has(MOUNTAIN) and rng.random() < 0.5:
        base = float(scene.horizon.mean()) - rng.uniform(0.08, 0.2) * s
        ridge = _wave(rng, size, base, rng.uniform(0.01, 0.04) * s, rng.uniform(0.03, 0.1) * s)
        scene.paint(MOUNTAIN, _below_curve(size, ridge))
    odds = {GRASS: 3.0, ROAD: 1.0, WATER: 2.0}
    grounds = [c for c in odds if scene.has(c)]
    p = np.array([odds[c] for c in grounds])
    scene.paint(int(rng.choice(grounds, p=p / p.sum())), _below_curve(size, scene.horizon))
    far = float(scene.horizon.mean())
    if rng.random() < 0.6:
        y_left, y_right = far + rng.uniform(0.1, 0.9, 2) * (s - far)
        field = [[0, y_left], [s, y_right], [s, s], [0, s]]
        scene.paint(int(rng.choice(grounds)), _fill(scene.canvas(), field))
    if scene.has(ROAD) and rng.random() < 0.5:
        vanish = rng.uniform(0.2, 0.8) * s
        top = float(scene.horizon[int(vanish)]) + 2
        left, right = np.sort(rng.uniform(-0.3, 1.3, 2) * s)
        right = max(right, left + 0.3 * s)
        half = rng.uniform(0.005, 0.03) * s
        road = [[vanish - half, top], [vanish + half, top], [right, s], [left, s]]
        scene.paint(ROAD, _fill(scene.canvas(), road))
    for _ in range(rng.poisson(2.5)):  # puddles, lawns, gravel
        center = (rng.uniform(0, s), far + rng.uniform(0.1, 1) * (s - far))
        patch = _blob(scene, center, rng.uniform(0.04, 0.15) * s)
        patch[: int(scene.horizon.max())] = 0
        scene.paint(int(rng.choice(grounds)), patch)


def _buildings(scene: _Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.integers(1, 7)):
        cx, base, _ = scene.on_ground(rng.uniform(0, 0.15))
        w, h = rng.uniform(0.08, 0.3) * s, rng.uniform(0.1, 0.4) * s
        tilt = rng.uniform(-0.03, 0.03) * w
        outline = [[cx - w / 2, base], [cx + w / 2, base], [cx + w / 2 + tilt, base - h]]
        if rng.random() < 0.4:  # gabled roof
            outline.append([cx + tilt, base - h - rng.uniform(0.1, 0.4) * w])
        outline.append([cx - w / 2 + tilt, base - h])
        scene.paint(BUILDING, _fill(scene.canvas(), outline))


def _trees(scene: _Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(3.5)):
        cx, base, _ = scene.on_ground(rng.uniform(0, 0.4))
        crown = rng.uniform(0.04, 0.12) * s
        trunk = [
            [cx - crown * 0.1, base],
            [cx + crown * 0.1, base],
            [cx + crown * 0.1, base - crown * 1.5],
            [cx - crown * 0.1, base - crown * 1.5],
        ]
        alpha = _fill(scene.canvas(), trunk)
        for _ in range(rng.integers(4, 12)):
            center = (
                cx + rng.normal(0, 0.6 * crown),
                base - 1.6 * crown + rng.normal(0, 0.5 * crown),
            )
            _disc(alpha, center, rng.uniform(0.3, 0.7) * crown)
        scene.paint(TREE, alpha)


def _vehicles(scene: _Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(2.0)):
        cx, y, scale = scene.on_ground(rng.uniform(0.05, 0.9))
        w = rng.uniform(0.08, 0.2) * s * scale
        h = w * rng.uniform(0.35, 0.55)
        c = h * 0.35  # windscreen chamfer
        body = [
            [cx - w / 2, y],
            [cx + w / 2, y],
            [cx + w / 2, y - 0.6 * h],
            [cx + w / 4, y - 0.6 * h],
            [cx + w / 4 - c, y - h],
            [cx - w / 4 + c, y - h],
            [cx - w / 4, y - 0.6 * h],
            [cx - w / 2, y - 0.6 * h],
        ]
        alpha = _fill(scene.canvas(), body)
        for wheel in (cx - w / 3, cx + w / 3):
            _disc(alpha, (wheel, y), 0.22 * h)
        scene.paint(VEHICLE, alpha, outline=int(rng.integers(2, 4)) if rng.random() < 0.3 else 0)


def _people(scene: _Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(3.5)):
        cx, y, scale = scene.on_ground(rng.uniform(0.02, 0.95))
        h = rng.uniform(0.04, 0.12) * s * scale
        alpha = scene.canvas()
        cv2.ellipse(
            alpha,
            _point((cx, y - 0.42 * h)),
            _point((0.14 * h, 0.42 * h)),
            rng.uniform(-8, 8),
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            SUBPIXEL_BITS,
        )
        _disc(alpha, (cx, y - 0.92 * h), 0.09 * h)
        scene.paint(PERSON, alpha, outline=2 if rng.random() < 0.3 else 0)


def _poles_and_signs(scene: _Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(2.5)):
        x, y, scale = scene.on_ground(rng.uniform(0, 0.7))
        top = (x + rng.normal(0, 0.01 * s), y - rng.uniform(0.2, 0.5) * s * scale)
        thickness = max(2, round(rng.uniform(0.004, 0.012) * s * scale))
        scene.paint(POLE, _stroke(scene.canvas(), [(x, y), top], thickness))
        if scene.has(SIGN) and rng.random() < 0.5:
            r = rng.uniform(0.015, 0.04) * s
            corners = 3 if rng.random() < 0.5 else 4
            angles = np.arange(corners) * 2 * np.pi / corners + rng.uniform(0, np.pi)
            sign = np.stack([top[0] + r * np.cos(angles), top[1] + r * np.sin(angles)], 1)
            scene.paint(SIGN, _fill(scene.canvas(), sign))


def _wires(scene: _Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(1.5)):
        ends = np.array([[-0.05 * s, rng.uniform(0, 0.5) * s], [1.05 * s, rng.uniform(0, 0.5) * s]])
        t = np.linspace(0, 1, 24)[:, None]
        sag = rng.uniform(0.02, 0.12) * s * 4 * t * (1 - t)
        line = ends[0] + (ends[1] - ends[0]) * t + np.concatenate([np.zeros_like(sag), sag], 1)
        scene.paint(WIRE, _stroke(scene.canvas(), line, max(2, round(0.004 * s))))


def _blobs(scene: _Scene) -> None:
    """Objects of the extra classes, then "unknown" objects labelled ignore."""
    rng, s = scene.rng, float(scene.size)
    for class_id in range(len(STYLES), len(scene.styles)):
        for _ in range(rng.poisson(0.5)):
            center = rng.uniform(0.1, 0.9, 2) * s
            scene.paint(class_id, _blob(scene, center, rng.uniform(0.03, 0.12) * s))
    for _ in range(rng.poisson(1.0)):
        center = rng.uniform(0.1, 0.9, 2) * s
        scene.paint(IGNORE_INDEX, _blob(scene, center, rng.uniform(0.02, 0.08) * s))


def render_scene(
    size: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image ``(size, size, 3)`` uint8 RGB and label ``(size, size)`` uint8."""
    scene = _Scene(size, class_styles(num_classes), rng)
    _landscape(scene)
    for layer, class_id, chance in (
        (_buildings, BUILDING, 0.7),
        (_trees, TREE, 1.0),
        (_vehicles, VEHICLE, 1.0),
        (_people, PERSON, 1.0),
        (_poles_and_signs, POLE, 1.0),
        (_wires, WIRE, 1.0),
    ):
        if scene.has(class_id) and rng.random() < chance:
            layer(scene)
    _blobs(scene)
    return scene.finish()


# --- dataset -------------------------------------------------------------------------------


def _init_worker(parent: int) -> None:
    """Pool worker set-up: one OpenCV thread each, and die with the parent, even when it is
    SIGKILLed (an orphaned worker would wait on its task queue forever)."""
    cv2.setNumThreads(1)
    # The parent handles Ctrl-C and SIGTERM and then terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _write_sample(args: tuple[Path, str, int, int, int, int]) -> None:
    folder, split, index, seed, size, num_classes = args
    # One generator per image from (seed, split, index): independent of the worker that
    # renders it and of the other images.
    rng = np.random.default_rng((seed, ("train", "val").index(split), index))
    image, label = render_scene(size, num_classes, rng)
    name = f"scene_{index:06d}"
    write_image(folder / "images" / split / f"{name}.jpg", image)
    write_image(folder / "masks" / split / f"{name}.png", label)


def generate_scene_dataset(
    root: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 512,
    num_classes: int = 12,
    seed: int = 0,
    workers: int | None = None,
) -> DatasetInfo:
    """Write a synthetic dataset in the canonical layout (JPEG images, PNG label maps).

    The folder is built beside ``root`` and renamed into place when complete; ``root`` must
    not exist. Classes beyond the 12 designed ones are extra blob classes with their own
    textures; fewer keep the first ``num_classes`` of sky, grass, road, building, tree,
    water, mountain, vehicle, person, pole, sign, wire.

    Args:
        workers: processes rendering in parallel; None = one per CPU (at most 8), 1 renders
            in this process. The output does not depend on it.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one image per split, got {num_train=} {num_val=}")
    if image_size < 64:
        raise ValueError(f"image_size={image_size}: at least 64")
    styles = class_styles(num_classes)
    info = DatasetInfo(
        name="synthetic",
        class_names=tuple(s.name for s in styles),
        base_size=image_size,
        crop_size=image_size,
        window=image_size,
        stride=image_size,
        source={
            "generator": "cts.data.synthetic",
            "num_train": num_train,
            "num_val": num_val,
            "image_size": image_size,
            "num_classes": num_classes,
            "seed": seed,
        },
    )
    workers = workers or min(os.cpu_count() or 1, 8)
    with staging_dir(root) as folder:
        jobs = [(folder, "train", i, seed, image_size, num_classes) for i in range(num_train)]
        jobs += [(folder, "val", i, seed, image_size, num_classes) for i in range(num_val)]
        if workers == 1 or len(jobs) < 2 * workers:
            for job in jobs:
                _write_sample(job)
        else:
            # spawn, not fork: a fork copies the state of OpenCV's and OpenMP's thread pools
            # from a parent that used them (a notebook, a test session), and the worker can
            # deadlock on a lock one of those threads held.
            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
            try:
                list(pool.map(_write_sample, jobs, chunksize=8))
            except BaseException:
                # An interrupt must not wait for the queued images: stop the workers now.
                for process in list(pool._processes.values()):
                    process.terminate()
                raise
            finally:
                pool.shutdown(cancel_futures=True)
        write_dataset_info(folder, info)
    return info
