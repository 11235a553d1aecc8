"""The toy world's vocabulary: object categories, background scenes and concept classes.

Categories differ in shape, colour, size and texture so that tiny models can tell them apart. A world uses the first
``n_categories`` categories and the first ``n_backgrounds`` backgrounds. The order puts the most distinct shapes first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Category:
    name: str  # noun used in captions, tags and mask labels
    shape: str  # key of SHAPES
    colour_name: str
    rgb: tuple[float, float, float]
    size: float  # radius multiplier over the world's minimum radius
    texture: str  # "plain" | "stripes" | "checker" | "dots"
    verb: str
    concepts: tuple[str, ...]


@dataclass(frozen=True)
class Background:
    name: str  # caption phrase, e.g. "blue water"
    noun: str  # mask category, e.g. "water"
    top: tuple[float, float, float]  # colour at the top of the frame
    bottom: tuple[float, float, float]  # colour at the bottom
    pattern: str  # "waves" | "blades" | "lane" | "grain" | "stars" | "plain"
    preposition: str
    concepts: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category("ball", "disk", "red", (0.90, 0.10, 0.10), 1.00, "plain", "rolls", ("toy", "sports equipment")),
    Category("bird", "triangle", "yellow", (1.00, 0.85, 0.10), 1.00, "plain", "flies", ("animal", "bird")),
    Category("box", "square", "purple", (0.55, 0.20, 0.75), 1.30, "checker", "slides", ("container",)),
    Category("flower", "star", "pink", (1.00, 0.45, 0.75), 1.20, "dots", "sways", ("plant",)),
    Category("fish", "ellipse", "orange", (1.00, 0.50, 0.00), 1.15, "stripes", "swims", ("animal", "fish")),
    Category("kite", "diamond", "cyan", (0.10, 0.90, 0.90), 1.15, "checker", "flies", ("toy",)),
    Category("donut", "ring", "brown", (0.55, 0.30, 0.10), 1.15, "plain", "rolls", ("food",)),
    Category("cactus", "cross", "lime", (0.50, 1.00, 0.20), 1.20, "stripes", "hops", ("plant",)),
    Category("boat", "bowl", "white", (0.98, 0.98, 0.98), 1.30, "stripes", "sails", ("vehicle",)),
    Category("car", "wide_rect", "blue", (0.10, 0.20, 0.90), 1.30, "plain", "drives", ("vehicle",)),
    Category("moon", "crescent", "pale yellow", (0.95, 0.95, 0.60), 1.15, "plain", "drifts", ("celestial body",)),
    Category("turtle", "hexagon", "dark green", (0.10, 0.40, 0.15), 1.15, "checker", "crawls", ("animal", "reptile")),
)

BACKGROUNDS: tuple[Background, ...] = (
    Background("blue water", "water", (0.25, 0.45, 0.80), (0.08, 0.22, 0.55), "waves", "over", ("water body",)),
    Background("green grass", "grass", (0.35, 0.65, 0.30), (0.15, 0.45, 0.12), "blades", "on", ("plant",)),
    Background("grey road", "road", (0.50, 0.50, 0.50), (0.35, 0.35, 0.35), "lane", "on", ("roadway",)),
    Background("yellow sand", "sand", (0.90, 0.82, 0.55), (0.78, 0.66, 0.40), "grain", "on", ("landscape feature",)),
    Background("night sky", "sky", (0.02, 0.02, 0.12), (0.10, 0.10, 0.30), "stars", "in", ("sky",)),
    Background("white snow", "snow", (0.95, 0.95, 0.98), (0.82, 0.85, 0.92), "plain", "on", ("landscape feature",)),
)

#: Categories that find_key_obj treats as people/animals (displacement doubled, preferred as key objects).
PRIORITY_NAMES: tuple[str, ...] = ("bird", "fish", "turtle")


def concept_classes(n_categories: int, n_backgrounds: int) -> list[str]:
    """The concept classes of a world, in first-use order over its categories then backgrounds."""
    names: list[str] = []
    for item in (*CATEGORIES[:n_categories], *BACKGROUNDS[:n_backgrounds]):
        names += [c for c in item.concepts if c not in names]
    return names


# ---------------------------------------------------------------------------------------------------------------------
# shapes: boolean masks over coordinates (dx, dy) relative to the centre, in units of the radius (y points down)


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
