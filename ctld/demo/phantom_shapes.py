"""Geometric primitives of the phantom: signed distances on the voxel grid, painting, branching trees.

Every shape is a field of signed distances in mm (positive inside, float32, one value per voxel); a shape
covers a voxel with alpha = clip(0.5 + sd / edge_mm, 0, 1), a linear partial-volume ramp one pixel wide.
Shapes are combined with `np.maximum` (union) and `np.minimum` (intersection), and `Painter` lays them down
as materials, later layers covering earlier ones. Points are (x, y, z) mm in the body-centred frame of `Grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class Grid:
    """Voxel centres in body-centred mm: x to the patient's left, y posterior, z superior (0 at slice 0)."""

    def __init__(self, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]):
        depth, height, width = shape
        self.shape = shape
        self.spacing = np.asarray(spacing_mm, dtype=np.float64)  # (dz, dy, dx) mm
        self.z = (np.arange(depth) * spacing_mm[0]).astype(np.float32)
        self.y = ((np.arange(height) - (height - 1) / 2) * spacing_mm[1]).astype(np.float32)
        self.x = ((np.arange(width) - (width - 1) / 2) * spacing_mm[2]).astype(np.float32)
        self.edge_mm = float(min(spacing_mm[1], spacing_mm[2]))

    def empty(self) -> np.ndarray:
        """A signed-distance field with nothing in it (every voxel far outside)."""
        return np.full(self.shape, -1e3, dtype=np.float32)

    def full(self):
        """Broadcastable (z, y, x) coordinate arrays of the whole grid."""
        return self.z[:, None, None], self.y[None, :, None], self.x[None, None, :]

    def box(self, lo: np.ndarray, hi: np.ndarray):
        """Slices and coordinates of the voxels inside the axis-aligned box [lo, hi] ((x, y, z) mm), or None."""
        bounds = []
        for axis, coords, lo_v, hi_v in (
            (0, self.z, lo[2], hi[2]),
            (1, self.y, lo[1], hi[1]),
            (2, self.x, lo[0], hi[0]),
        ):
            step = self.spacing[axis]
            start = max(0, int(math.floor((lo_v - coords[0]) / step)))
            stop = min(len(coords), int(math.ceil((hi_v - coords[0]) / step)) + 1)
            if stop <= start:
                return None
            bounds.append((start, stop))
        (k0, k1), (j0, j1), (i0, i1) = bounds
        region = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        return region, self.z[k0:k1, None, None], self.y[None, j0:j1, None], self.x[None, None, i0:i1]

    def index_of(self, point: np.ndarray) -> tuple[int, int, int]:
        """(k, j, i) of the voxel nearest to `point` ((x, y, z) mm), possibly outside the grid."""
        return (
            int(round(point[2] / self.spacing[0])),
            int(round((point[1] - self.y[0]) / self.spacing[1])),
            int(round((point[0] - self.x[0]) / self.spacing[2])),
        )

    def lookup(self, field_mm: np.ndarray, point: np.ndarray) -> float:
        """Value of a full-grid field at the voxel nearest to `point` ((x, y, z) mm); -inf outside the grid."""
        index = self.index_of(point)
        if any(i < 0 or i >= n for i, n in zip(index, self.shape)):
            return -math.inf
        return float(field_mm[index])


def add_capsule(grid: Grid, sd: np.ndarray, p0, p1, r0_mm: float, r1_mm: float) -> None:
    """sd = max(sd, signed distance to the tapered tube from p0 (radius r0_mm) to p1 (radius r1_mm))."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    reach = max(r0_mm, r1_mm) + grid.edge_mm
    box = grid.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
    if box is None:
        return
    region, z, y, x = box
    v = p1 - p0
    vv = max(float(v @ v), 1e-9)
    px, py, pz = x - np.float32(p0[0]), y - np.float32(p0[1]), z - np.float32(p0[2])
    t = np.clip((px * np.float32(v[0]) + py * np.float32(v[1]) + pz * np.float32(v[2])) / np.float32(vv), 0, 1)
    dist = np.sqrt(
        (px - t * np.float32(v[0])) ** 2 + (py - t * np.float32(v[1])) ** 2 + (pz - t * np.float32(v[2])) ** 2
    )
    inside = np.float32(r0_mm) + t * np.float32(r1_mm - r0_mm) - dist
    np.maximum(sd[region], inside, out=sd[region])


def add_polyline(grid: Grid, sd: np.ndarray, points, radii_mm) -> None:
    """sd = max(sd, a chain of capsules through `points`, radius `radii_mm` (one per point, or one for all))."""
    points = np.asarray(points, dtype=np.float64)
    radii_mm = np.broadcast_to(np.asarray(radii_mm, dtype=np.float64), (len(points),))
    for a in range(len(points) - 1):
        add_capsule(grid, sd, points[a], points[a + 1], radii_mm[a], radii_mm[a + 1])


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch), then x (roll)."""
    a, b, c = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


def add_ellipsoid(grid: Grid, sd: np.ndarray, center, axes_mm, turn: np.ndarray | None = None) -> None:
    """sd = max(sd, approximate signed distance to an ellipsoid (exact along rays from its centre)).
    `axes_mm` are the semi-axes before the rotation `turn` (default none)."""
    center = np.asarray(center, dtype=np.float64)
    axes_mm = np.asarray(axes_mm, dtype=np.float64)
    turn = np.eye(3) if turn is None else turn
    reach = axes_mm.max() + grid.edge_mm
    box = grid.box(center - reach, center + reach)
    if box is None:
        return
    region, z, y, x = box
    p = (x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2]))
    local = [sum(p[r] * np.float32(turn[r, c]) for r in range(3)) for c in range(3)]  # u = R^T (p - c)
    rho = np.sqrt(sum((local[c] / np.float32(axes_mm[c])) ** 2 for c in range(3)))
    norm = np.sqrt(sum(local[c] ** 2 for c in range(3)))
    inside = np.where(rho > 1e-3, norm * (1.0 / np.maximum(rho, 1e-3) - 1.0), np.float32(axes_mm.min()))
    np.maximum(sd[region], inside.astype(np.float32), out=sd[region])


class Painter:
    """Paints materials in order onto float HU and uint8 labels (later layers cover earlier ones)."""

    def __init__(self, grid: Grid, background_hu: float):
        self.grid = grid
        self.hu = np.full(grid.shape, background_hu, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)

    def alpha(self, sd: np.ndarray) -> np.ndarray:
        return np.clip(0.5 + sd / np.float32(self.grid.edge_mm), 0.0, 1.0)

    def paint(self, sd_or_alpha: np.ndarray, value_hu, label: int, *, is_alpha: bool = False) -> None:
        """Blend `value_hu` (a number or a field) in with the shape's coverage; the label goes where it covers
        more than half of the voxel."""
        alpha = sd_or_alpha if is_alpha else self.alpha(sd_or_alpha)
        self.hu += alpha * (np.asarray(value_hu, dtype=np.float32) - self.hu)
        self.labels[alpha > 0.5] = label


# ---------------------------------------------------------------------------------------------------------
# Branching trees (pulmonary arteries, veins and bronchi)


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to the unit vector `d`."""
    v = rng.normal(size=3)
    return unit(v - (v @ d) * d)


@dataclass
class Tube:
    """One straight piece of a tree: from p0 (radius r0_mm) to p1 (radius r1_mm); the root's pieces are
    generation 0."""

    p0: np.ndarray
    p1: np.ndarray
    r0_mm: float
    r1_mm: float
    generation: int


def grow_tree(
    rng: np.random.Generator,
    grid: Grid,
    inside_sd: np.ndarray,
    start: np.ndarray,
    direction: np.ndarray,
    radius_mm: float,
    *,
    min_radius_mm: float,
    max_generation: int,
    out: list[Tube],
    generation: int = 0,
) -> None:
    """A branching tree of wandering tubes that stays inside the region where `inside_sd` > 0.

    Each branch is 3 short tubes whose direction drifts randomly; at its end it splits in two children whose
    radii follow Murray's law (r^3 = r1^3 + r2^3), turned 15-60 degrees from the parent on opposite sides.
    The tubes are appended to `out`, depth first.
    """
    length = radius_mm * rng.uniform(5.0, 8.0) + 3.0
    point, d, r = np.asarray(start, dtype=np.float64), unit(direction), radius_mm
    for _ in range(3):
        for attempt in range(6):  # turn harder each time the lung boundary is in the way
            d_try = unit(d + rng.normal(0.0, 0.3 + 0.25 * attempt, 3))
            q = point + d_try * (length / 3)
            if generation == 0 or grid.lookup(inside_sd, q) > 0.5 * r:
                break
        else:
            return  # the branch runs into the lung boundary: stop it there
        r_next = r * 0.96
        out.append(Tube(point, q, r, r_next, generation))
        point, d, r = q, d_try, r_next
    if generation >= max_generation or r * 0.72 < min_radius_mm:
        return
    share = rng.uniform(0.75, 0.9)
    radii = (r * share, r * (1.0 - share**3) ** (1.0 / 3.0))
    angles = (rng.uniform(15.0, 35.0), -rng.uniform(35.0, 60.0))
    side = perpendicular(rng, d)
    for child_radius, angle in zip(radii, angles):
        a = math.radians(angle)
        child = unit(d * math.cos(a) + side * math.sin(a))
        grow_tree(
            rng,
            grid,
            inside_sd,
            point,
            child,
            child_radius,
            min_radius_mm=min_radius_mm,
            max_generation=max_generation,
            out=out,
            generation=generation + 1,
        )
