"""The toy world's shapes and textures: boolean masks over coordinates ``(dx, dy)`` relative to an object's centre, in
units of its radius (y points down), and brightness patterns that move with the object.

The categories that use them (and the rest of the vocabulary) are defined in :mod:`utils.toy_world`.
"""

from __future__ import annotations

import numpy as np


def _disk(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return dx**2 + dy**2 <= 1.0


def _triangle(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (dy <= 0.8) & (np.abs(dx) <= 0.95 * (dy + 1.0) / 1.8)


def _square(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8


def _star(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    return rho <= 0.55 + 0.45 * np.cos(5 * theta + np.pi / 2)


def _ellipse(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return dx**2 + (dy / 0.55) ** 2 <= 1.0


def _diamond(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.abs(dx) + np.abs(dy) <= 1.0


def _ring(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    rho2 = dx**2 + dy**2
    return (rho2 <= 1.0) & (rho2 >= 0.5**2)


def _cross(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0))


def _bowl(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (dx**2 + (dy + 0.3) ** 2 <= 1.0) & (dy >= -0.3)


def _wide_rect(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 0.5)


def _crescent(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return (dx**2 + dy**2 <= 1.0) & ((dx - 0.5) ** 2 + (dy + 0.15) ** 2 > 0.8**2)


def _hexagon(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    return (ay <= 0.866) & (0.866 * ax + 0.5 * ay <= 0.866)


SHAPES = {
    "disk": _disk,
    "triangle": _triangle,
    "square": _square,
    "star": _star,
    "ellipse": _ellipse,
    "diamond": _diamond,
    "ring": _ring,
    "cross": _cross,
    "bowl": _bowl,
    "wide_rect": _wide_rect,
    "crescent": _crescent,
    "hexagon": _hexagon,
}


def texture_gain(texture: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Brightness multiplier in [0.6, 1] of a texture at object-relative coordinates (moves with the object)."""
    if texture == "plain":
        return np.ones_like(dx)
    if texture == "stripes":
        return np.where(np.floor(dx * 2.5) % 2 == 0, 1.0, 0.6)
    if texture == "checker":
        return np.where((np.floor(dx * 2.0) + np.floor(dy * 2.0)) % 2 == 0, 1.0, 0.6)
    if texture == "dots":
        fx, fy = dx * 2.5 - np.round(dx * 2.5), dy * 2.5 - np.round(dy * 2.5)
        return np.where(fx**2 + fy**2 <= 0.3**2, 0.6, 1.0)
    raise ValueError(f"unknown texture {texture!r}")
