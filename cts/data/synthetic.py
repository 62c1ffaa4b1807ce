"""Embedded synthetic dataset: outdoor-like scenes generated from a seed, no download.

What CTS exploits is there (large regions: sky, ground, buildings, water, mountains) and so
is what makes it hard: wavy and slanted boundaries, objects down to thin poles and wires and
small blobs, several classes per image, textures that identify a class while colours
overlap between classes (a per-image random colour around a shared grey-ish palette, plus a
global colour cast), anti-aliased edges, blur and noise in the image while the label map
stays hard. Ignore (255) marks "unknown" objects and, on some objects, a thin outline band.

The layers of a scene are composed here; the styles, textures, canvas and shapes they paint
with are in :mod:`cts.data.painting`. Each image is a function of ``(seed, split, index)``
only, so a set can be generated in parallel and reproduced bit for bit.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from cts.data.info import DatasetInfo, write_dataset_info
from cts.data.io import staging_dir, write_image
from cts.data.painting import (
    BUILDING,
    GRASS,
    MOUNTAIN,
    PERSON,
    POLE,
    ROAD,
    SIGN,
    SKY,
    STYLES,
    SUBPIXEL_BITS,
    TREE,
    VEHICLE,
    WATER,
    WIRE,
    Scene,
    below_curve,
    blob,
    class_styles,
    disc,
    fill,
    point,
    stroke,
    wave,
)
from cts.sharing import IGNORE_INDEX

# --- scene layers, back to front ---------------------------------------------------------


def _landscape(scene: Scene) -> None:
    """Sky, optional mountain ridge, ground (grass, road or water) below a wavy horizon,
    a second ground behind a slanted boundary, a road to a vanishing point, ground patches."""
    rng, size, s = scene.rng, scene.size, float(scene.size)
    scene.paint(SKY, np.full((size, size), 255, np.uint8))
    if scene.has(MOUNTAIN) and rng.random() < 0.5:
        base = float(scene.horizon.mean()) - rng.uniform(0.08, 0.2) * s
        ridge = wave(rng, size, base, rng.uniform(0.01, 0.04) * s, rng.uniform(0.03, 0.1) * s)
        scene.paint(MOUNTAIN, below_curve(size, ridge))
    odds = {GRASS: 3.0, ROAD: 1.0, WATER: 2.0}
    grounds = [c for c in odds if scene.has(c)]
    p = np.array([odds[c] for c in grounds])
    scene.paint(int(rng.choice(grounds, p=p / p.sum())), below_curve(size, scene.horizon))
    far = float(scene.horizon.mean())
    if rng.random() < 0.6:
        y_left, y_right = far + rng.uniform(0.1, 0.9, 2) * (s - far)
        field = [[0, y_left], [s, y_right], [s, s], [0, s]]
        scene.paint(int(rng.choice(grounds)), fill(scene.canvas(), field))
    if scene.has(ROAD) and rng.random() < 0.5:
        vanish = rng.uniform(0.2, 0.8) * s
        top = float(scene.horizon[int(vanish)]) + 2
        left, right = np.sort(rng.uniform(-0.3, 1.3, 2) * s)
        right = max(right, left + 0.3 * s)
        half = rng.uniform(0.005, 0.03) * s
        road = [[vanish - half, top], [vanish + half, top], [right, s], [left, s]]
        scene.paint(ROAD, fill(scene.canvas(), road))
    for _ in range(rng.poisson(2.5)):  # puddles, lawns, gravel
        center = (rng.uniform(0, s), far + rng.uniform(0.1, 1) * (s - far))
        patch = blob(scene, center, rng.uniform(0.04, 0.15) * s)
        patch[: int(scene.horizon.max())] = 0
        scene.paint(int(rng.choice(grounds)), patch)


def _buildings(scene: Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.integers(1, 7)):
        cx, base, _ = scene.on_ground(rng.uniform(0, 0.15))
        w, h = rng.uniform(0.08, 0.3) * s, rng.uniform(0.1, 0.4) * s
        tilt = rng.uniform(-0.03, 0.03) * w
        outline = [[cx - w / 2, base], [cx + w / 2, base], [cx + w / 2 + tilt, base - h]]
        if rng.random() < 0.4:  # gabled roof
            outline.append([cx + tilt, base - h - rng.uniform(0.1, 0.4) * w])
        outline.append([cx - w / 2 + tilt, base - h])
        scene.paint(BUILDING, fill(scene.canvas(), outline))


def _trees(scene: Scene) -> None:
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
        alpha = fill(scene.canvas(), trunk)
        for _ in range(rng.integers(4, 12)):
            center = (
                cx + rng.normal(0, 0.6 * crown),
                base - 1.6 * crown + rng.normal(0, 0.5 * crown),
            )
            disc(alpha, center, rng.uniform(0.3, 0.7) * crown)
        scene.paint(TREE, alpha)


def _vehicles(scene: Scene) -> None:
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
        alpha = fill(scene.canvas(), body)
        for wheel in (cx - w / 3, cx + w / 3):
            disc(alpha, (wheel, y), 0.22 * h)
        scene.paint(VEHICLE, alpha, outline=int(rng.integers(2, 4)) if rng.random() < 0.3 else 0)


def _people(scene: Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(3.5)):
        cx, y, scale = scene.on_ground(rng.uniform(0.02, 0.95))
        h = rng.uniform(0.04, 0.12) * s * scale
        alpha = scene.canvas()
        cv2.ellipse(
            alpha,
            point((cx, y - 0.42 * h)),
            point((0.14 * h, 0.42 * h)),
            rng.uniform(-8, 8),
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            SUBPIXEL_BITS,
        )
        disc(alpha, (cx, y - 0.92 * h), 0.09 * h)
        scene.paint(PERSON, alpha, outline=2 if rng.random() < 0.3 else 0)


def _poles_and_signs(scene: Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(2.5)):
        x, y, scale = scene.on_ground(rng.uniform(0, 0.7))
        top = (x + rng.normal(0, 0.01 * s), y - rng.uniform(0.2, 0.5) * s * scale)
        thickness = max(2, round(rng.uniform(0.004, 0.012) * s * scale))
        scene.paint(POLE, stroke(scene.canvas(), [(x, y), top], thickness))
        if scene.has(SIGN) and rng.random() < 0.5:
            r = rng.uniform(0.015, 0.04) * s
            corners = 3 if rng.random() < 0.5 else 4
            angles = np.arange(corners) * 2 * np.pi / corners + rng.uniform(0, np.pi)
            sign = np.stack([top[0] + r * np.cos(angles), top[1] + r * np.sin(angles)], 1)
            scene.paint(SIGN, fill(scene.canvas(), sign))


def _wires(scene: Scene) -> None:
    rng, s = scene.rng, float(scene.size)
    for _ in range(rng.poisson(1.5)):
        ends = np.array([[-0.05 * s, rng.uniform(0, 0.5) * s], [1.05 * s, rng.uniform(0, 0.5) * s]])
        t = np.linspace(0, 1, 24)[:, None]
        sag = rng.uniform(0.02, 0.12) * s * 4 * t * (1 - t)
        line = ends[0] + (ends[1] - ends[0]) * t + np.concatenate([np.zeros_like(sag), sag], 1)
        scene.paint(WIRE, stroke(scene.canvas(), line, max(2, round(0.004 * s))))


def _blobs(scene: Scene) -> None:
    """Objects of the extra classes, then "unknown" objects labelled ignore."""
    rng, s = scene.rng, float(scene.size)
    for class_id in range(len(STYLES), len(scene.styles)):
        for _ in range(rng.poisson(0.5)):
            center = rng.uniform(0.1, 0.9, 2) * s
            scene.paint(class_id, blob(scene, center, rng.uniform(0.03, 0.12) * s))
    for _ in range(rng.poisson(1.0)):
        center = rng.uniform(0.1, 0.9, 2) * s
        scene.paint(IGNORE_INDEX, blob(scene, center, rng.uniform(0.02, 0.08) * s))


def render_scene(
    size: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image ``(size, size, 3)`` uint8 RGB and label ``(size, size)`` uint8."""
    scene = Scene(size, class_styles(num_classes), rng)
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
