"""Building blocks of `urbanseg synth` scenes: a pinhole camera over a ground plane, the
shape record (polygon + official label + appearance), colour palettes and outlines.
The street itself is laid out in synth_layout.py.

World coordinates in metres: X to the right, Y up, Z forward; the camera sits at
(0, cam_h, 0) looking along +Z, so a point projects to
``x = xv + f X / Z``, ``y = yh + f (cam_h - Y) / Z`` (vanishing point (xv, yh)).
Everything is laid out in metres and projected, so ``--size`` scales the whole scene.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

# Appearance palettes, RGB in 0..1 before lighting. They overlap across classes on
# purpose (grey cars / grey road / grey buildings, green walls / trees, pale blue
# facades / sky) so that colour alone cannot tell the classes apart.
GREY = [(0.32, 0.32, 0.33), (0.45, 0.45, 0.46), (0.58, 0.58, 0.57), (0.7, 0.7, 0.7)]
CAR = GREY + [
    (0.85, 0.86, 0.86),
    (0.08, 0.08, 0.09),
    (0.12, 0.16, 0.32),
    (0.55, 0.08, 0.08),
    (0.16, 0.27, 0.18),
    (0.64, 0.6, 0.5),
    (0.22, 0.32, 0.55),
    (0.8, 0.62, 0.12),
]
ROAD = [(0.28, 0.28, 0.3), (0.36, 0.36, 0.37), (0.45, 0.44, 0.43), (0.52, 0.52, 0.53), (0.33, 0.31, 0.3)]
SIDEWALK = GREY + [(0.66, 0.6, 0.52), (0.6, 0.42, 0.38), (0.5, 0.52, 0.46), (0.52, 0.4, 0.45)]
BUILDING = GREY + [
    (0.76, 0.72, 0.64),
    (0.86, 0.86, 0.83),
    (0.6, 0.38, 0.28),
    (0.72, 0.6, 0.45),
    (0.55, 0.64, 0.52),
    (0.6, 0.66, 0.75),
    (0.3, 0.28, 0.28),
    (0.7, 0.55, 0.6),
]
WALL = GREY + [(0.36, 0.48, 0.32), (0.66, 0.6, 0.5), (0.58, 0.4, 0.3), (0.5, 0.55, 0.62)]
FENCE = [(0.3, 0.32, 0.3), (0.2, 0.34, 0.2), (0.45, 0.32, 0.2), (0.62, 0.62, 0.62), (0.2, 0.2, 0.22)]
VEGETATION = [
    (0.2, 0.34, 0.12),
    (0.3, 0.45, 0.15),
    (0.14, 0.24, 0.12),
    (0.5, 0.42, 0.16),
    (0.42, 0.48, 0.3),
    (0.3, 0.36, 0.28),
]
TERRAIN = [(0.36, 0.5, 0.2), (0.52, 0.5, 0.3), (0.45, 0.36, 0.26), (0.3, 0.42, 0.26), (0.5, 0.46, 0.4)]
SKY = [(0.34, 0.55, 0.86), (0.74, 0.77, 0.82), (0.6, 0.62, 0.66), (0.86, 0.88, 0.92), (0.5, 0.62, 0.8)]
POLE = [(0.35, 0.35, 0.37), (0.14, 0.14, 0.15), (0.2, 0.3, 0.22), (0.6, 0.6, 0.6)]
CLOTHES = [
    (0.08, 0.08, 0.09),
    (0.4, 0.4, 0.42),
    (0.12, 0.15, 0.3),
    (0.25, 0.35, 0.55),
    (0.6, 0.12, 0.12),
    (0.2, 0.35, 0.2),
    (0.66, 0.6, 0.48),
    (0.85, 0.85, 0.85),
    (0.4, 0.28, 0.18),
    (0.7, 0.5, 0.2),
]
SIGN = [(0.75, 0.1, 0.1), (0.12, 0.26, 0.65), (0.86, 0.76, 0.12), (0.88, 0.88, 0.88), (0.2, 0.5, 0.25)]
MISC = GREY + FENCE + [(0.5, 0.3, 0.2), (0.2, 0.4, 0.6), (0.7, 0.6, 0.2)]


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole camera: focal length f (px), vanishing point (xv, yh), height cam_h (m)."""

    f: float
    xv: float
    yh: float
    cam_h: float
    width: int
    height: int

    def project(self, X: Any, Y: Any, Z: Any) -> np.ndarray:
        """World points (broadcast arrays, metres) -> (K, 2) float64 image points."""
        X, Y, Z = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (X, Y, Z)))
        Z = np.maximum(Z, 0.05)
        return np.stack([self.xv + self.f * X / Z, self.yh + self.f * (self.cam_h - Y) / Z], -1)


@dataclasses.dataclass
class Shape:
    """One polygon in painter's order.

    label: an official Cityscapes label name (or "<name>group"); None for a decoration
    that exists only in the photo (it lies inside its parent and keeps the parent's label).
    plane: how pixels map back to surface coordinates (u, v) in metres for the texture:
    ("ground",) | ("side", X) | ("front", Z, X0, Y0) | ("box", Z, X0, X1, L) | ("sky",)
    | ("screen", x0, y0, scale). tex: texture name in synth_render.TEXTURES; params: its colours.
    """

    label: str | None
    polygon: np.ndarray
    tex: str
    plane: tuple
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Scene:
    camera: Camera
    shapes: list[Shape]
    shadows: list[np.ndarray]  # ground-plane shadow polygons, image coordinates
    light: dict  # global lighting parameters for the renderer


def pick(rng: np.random.Generator, palette: list, jitter: float = 0.06) -> tuple[float, float, float]:
    c = np.asarray(palette[rng.integers(len(palette))]) * rng.uniform(1 - jitter, 1 + jitter, 3)
    return tuple(np.clip(c, 0, 1).tolist())


def box_hull(cam: Camera, x0: float, x1: float, z0: float, z1: float, y0: float, y1: float) -> np.ndarray:
    """Image outline (convex hull) of an axis-aligned 3D box, (K, 2)."""
    X, Y, Z = np.meshgrid([x0, x1], [y0, y1], [z0, z1], indexing="ij")
    pts = cam.project(X.ravel(), Y.ravel(), Z.ravel()).astype(np.float32)
    import cv2

    return cv2.convexHull(pts)[:, 0, :].astype(np.float64)


def front_poly(cam: Camera, Z: float, X0: float, Y0: float, outline: npt.ArrayLike) -> np.ndarray:
    """A flat outline (K, 2) in metres (u right, v up) standing at depth Z -> image points."""
    outline = np.asarray(outline, np.float64)
    return cam.project(X0 + outline[:, 0], Y0 + outline[:, 1], Z)


def blob(rng: np.random.Generator, rx: float, ry: float, n: int = 14, rough: float = 0.18) -> np.ndarray:
    """A jagged ellipse (tree crown, bush) around the origin, (n, 2) metres."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = 1 + rng.uniform(-rough, rough, n)
    return np.stack([rx * r * np.cos(t), ry * r * np.sin(t)], -1)


def person_outline(rng: np.random.Generator, h: float, seated: bool = False) -> np.ndarray:
    """Silhouette of a standing (or seated, legs hidden) person, feet at v=0, (K, 2) metres."""
    s = h / 1.75
    stride = rng.uniform(0.02, 0.22)
    arm = rng.uniform(0.0, 0.12)
    pts = [
        (-0.11 - stride, 0),
        (-0.02, 0.78),
        (0.02, 0.78),
        (0.11 + stride, 0),
        (0.2 + stride, 0.0),
        (0.16, 0.85),
        (0.2, 1.05),
        (0.25 + arm, 0.8),
        (0.3 + arm, 0.82),
        (0.24, 1.4),
        (0.1, 1.48),
        (0.1, 1.55),
        (0.12, 1.68),
        (0.0, 1.75),
        (-0.12, 1.68),
        (-0.1, 1.55),
        (-0.1, 1.48),
        (-0.24, 1.4),
        (-0.3 - arm, 0.82),
        (-0.25 - arm, 0.8),
        (-0.2, 1.05),
        (-0.16, 0.85),
        (-0.2 - stride, 0.0),
    ]
    out = np.asarray(pts) * s
    if seated:  # upper body only, the vehicle hides the legs
        out = np.asarray([(-0.2, 0.78), (0.2, 0.78)] + pts[5:-2]) * s
        out[:, 1] -= 0.78 * s
    return out


def two_wheeler_outline(length: float, height: float, motor: bool) -> np.ndarray:
    """Side view of a bicycle / motorcycle with its wheels, ground at v=0, (K, 2) metres."""
    L, r = length, 0.34 if not motor else 0.32
    body = 0.25 if not motor else 0.45
    return np.asarray(
        [
            (-L / 2, r),
            (-L / 2 + 0.1, 0.04),
            (-L / 2 + 2 * r, 0.04),
            (-L / 2 + 2 * r, r * 1.2),
            (L / 2 - 2 * r, r * 1.2),
            (L / 2 - 2 * r, 0.04),
            (L / 2 - 0.1, 0.04),
            (L / 2, r),
            (L / 2 - 0.15, height),
            (L / 2 - 0.3, height),
            (L / 2 - 0.3, r + body),
            (-L / 2 + 0.35, r + body),
            (-L / 2 + 0.25, height * 0.9),
            (-L / 2 + 0.1, height * 0.9),
        ]
    )
