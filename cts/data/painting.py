"""Painting synthetic scenes: class styles and textures, the canvas with its hard label map,
anti-aliased shapes.

A :class:`Scene` is painted back to front: each shape is an anti-aliased alpha canvas
(uint8, 255 = inside, drawn with subpixel precision), composited with its class's texture;
the label map takes the class where the alpha is at least 1/2. The scenes themselves (which
layers, where) are composed in :mod:`cts.data.synthetic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

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


class Scene:
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
        self.horizon = wave(rng, size, rng.uniform(0.3, 0.6) * size, rng.uniform(0, 0.05) * size, 0)

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


def point(xy) -> tuple[int, int]:
    """``(x, y)`` in pixels -> OpenCV's fixed-point subpixel coordinates."""
    x, y = _points(xy)
    return int(x), int(y)


def fill(alpha: np.ndarray, points) -> np.ndarray:
    """Fill the polygon ``points`` ``(n, 2)`` into ``alpha``; returns ``alpha``."""
    cv2.fillPoly(alpha, [_points(points)], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    return alpha


def disc(alpha: np.ndarray, center, radius: float) -> None:
    """Fill a disc into ``alpha``."""
    cv2.circle(alpha, point(center), round(radius * _ONE), 255, -1, cv2.LINE_AA, SUBPIXEL_BITS)


def stroke(alpha: np.ndarray, points, thickness: int) -> np.ndarray:
    """Draw the open polyline ``points`` ``(n, 2)``, ``thickness`` px wide, into ``alpha``;
    returns ``alpha``."""
    cv2.polylines(alpha, [_points(points)], False, 255, thickness, cv2.LINE_AA, SUBPIXEL_BITS)
    return alpha


def below_curve(size: int, curve: np.ndarray) -> np.ndarray:
    """Alpha of the region under ``curve`` (y per column), anti-aliased by coverage."""
    ys = np.arange(size, dtype=np.float32)[:, None]
    return (np.clip(ys - curve[None, :] + 0.5, 0, 1) * 255).astype(np.uint8)


def wave(
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


def blob(scene: Scene, center, radius: float) -> np.ndarray:
    """A random star-shaped polygon of about ``radius``."""
    rng = scene.rng
    corners = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.5, 1.0, corners)
    outline = np.asarray(center) + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    return fill(scene.canvas(), outline)
