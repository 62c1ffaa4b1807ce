"""Pictures of predictions: class colours over the image, shared superpatches outlined."""

from __future__ import annotations

import numpy as np


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB colours, distinct and stable for a given count."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)
    return colours


def colorize(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8; ignore is black."""
    out = np.zeros((*labels.shape, 3), np.uint8)
    valid = labels != ignore_index
    out[valid] = colours[np.clip(labels[valid], 0, len(colours) - 1)]
    return out


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5):
    """Blend a colourised label map ``(H, W)`` over an RGB image ``(H, W, 3)`` uint8."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(labels, colours)
    return blend.clip(0, 255).astype(np.uint8)


def outline_shared(image: np.ndarray, shared: np.ndarray, superpatch: int) -> np.ndarray:
    """Draw a white frame around every shared superpatch; ``shared`` is ``(hs, ws)`` bool."""
    out = image.copy()
    frame = np.zeros(shared.shape[:2] + (superpatch, superpatch), bool)
    frame[..., 0, :] = frame[..., -1, :] = frame[..., :, 0] = frame[..., :, -1] = True
    frame &= shared[..., None, None]
    mask = frame.transpose(0, 2, 1, 3).reshape(shared.shape[0] * superpatch, -1)
    height, width = min(mask.shape[0], out.shape[0]), min(mask.shape[1], out.shape[1])
    out[:height, :width][mask[:height, :width]] = 255
    return out


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
    """``(3, H, W)`` normalised float -> ``(H, W, 3)`` uint8 RGB."""
    pixels = image.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return (pixels * 255).clip(0, 255).astype(np.uint8)
