"""Procedural chest CT phantoms: seeded, numpy + scipy only, written as real DICOM series.

    phantom = make_phantom(seed=3)                          # (100, 128, 128) int16 HU, ~0.5 s
    studies = make_cohort("demo_out/phantoms", n_studies=8, seed=0)
    python -m ctld.demo.phantom demo_out/phantoms --n_studies 8 --seed 0

A phantom is a child-sized contrast-enhanced chest CT (CT pulmonary angiography phase), sized so a 1 mm
study of ~100 slices x 128 x 128 pixels of 1.5 mm holds the whole thorax: body outline with subcutaneous fat
and muscle, lungs with a posterior density gradient, branching pulmonary artery, vein and bronchial trees
(tubes that wander and branch obliquely, so they change from one 1 mm slice to the next), the heart with
contrast-filled chambers, aorta, pulmonary trunk and arteries, superior vena cava, trachea, oesophagus,
vertebrae (cancellous bone with a brighter cortex, discs, posterior arches), oblique ribs with costal
cartilage, sternum, liver and stomach below the diaphragm domes, the scanner table, nodules 3-7 mm across
and emboli (filling defects inside arteries). Shapes are painted with soft (partial-volume) edges from signed
distances in mm, blurred by a small point-spread function, and given correlated noise of `noise_hu`.

Geometry is that of `ctld.data.volume.Volume` with an identity direction (axial slices, LPS): column index
i runs to the patient's left, row index j to posterior, slice index k to superior.

A thick series of the same acquisition is the mean of `factor` consecutive thin slices (`simulate_thick`),
positioned at the slab centres (DESIGN.md, Geometry convention), so both the real-pair and the
simulated-thick paths of `ctld-shards build` run on a cohort. Studies carry fake patient identifiers
("PHANTOM^001", birth date, accession number, institution) so the privacy checks have something to remove.
"""

from __future__ import annotations

import argparse
import enum
import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume

logger = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT stores


class Tissue(enum.IntEnum):
    """Label of the material painted last (with more than half coverage) at each voxel."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    SOFT_TISSUE = 4  # mediastinum, myocardium, oesophagus, airway walls, cartilage, liver, stomach
    BLOOD = 5  # contrast-filled heart chambers and vessels
    BONE = 6  # cancellous bone
    CORTEX = 7  # cortical bone
    NODULE = 8
    EMBOLUS = 9
    AIRWAY = 10  # air in the trachea, bronchi and stomach
    TABLE = 11


# Nominal HU of each material (before partial volume, blur and noise).
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 45.0,
    "lung": -850.0,
    "mediastinum": -80.0,  # mediastinal fat with strands
    "soft": 40.0,
    "myocardium": 55.0,
    "liver": 65.0,
    "cartilage": 110.0,
    "disc": 80.0,
    "csf": 15.0,
    "artery": 330.0,  # CTPA phase: right heart and pulmonary arteries brightest
    "vein": 210.0,  # pulmonary veins, left heart, aorta
    "svc": 600.0,  # undiluted contrast in the superior vena cava
    "bone": 650.0,
    "cortex": 1200.0,
    "embolus": 45.0,
    "table_shell": 250.0,
    "table_core": -750.0,
}


@dataclass
class Phantom:
    """One generated study."""

    hu: np.ndarray  # (D, H, W) int16 HU, thin slices
    labels: np.ndarray  # (D, H, W) uint8 `Tissue`
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_mm: tuple[float, float, float]  # LPS of voxel (0, 0, 0)
    seed: int
    findings: list[dict] = field(default_factory=list)  # nodules and emboli: kind, center_mm, index, radius_mm

    def volume(self) -> Volume:
        return Volume(
            hu=self.hu,
            spacing_mm=self.spacing_mm,
            origin_mm=self.origin_mm,
            direction=np.eye(3),
            meta={"slice_thickness_mm": self.spacing_mm[0], "source": "ctld phantom"},
        )


def thick_volume(thin: Volume, factor: int = 5) -> Volume:
    """The thick series of the same acquisition: slice k = mean of thin slices [k*factor, (k+1)*factor),
    positioned at the slab centre, `(factor - 1) / 2` thin spacings above the slab's first thin slice."""
    dz, dy, dx = thin.spacing_mm
    normal = np.asarray(thin.direction)[:, 2]
    origin = np.asarray(thin.origin_mm) + (factor - 1) / 2 * dz * normal
    return Volume(
        hu=simulate_thick(thin.hu, factor),
        spacing_mm=(dz * factor, dy, dx),
        origin_mm=tuple(origin),
        direction=thin.direction,
        meta={**thin.meta, "slice_thickness_mm": dz * factor},
    )


# ---------------------------------------------------------------------------------------------------------
# Signed-distance painting on the voxel grid. Every shape is a field of signed distances in mm (positive
# inside); a shape covers a voxel with alpha = clip(0.5 + sd / edge_mm, 0, 1), a linear partial-volume ramp.


class _Grid:
    """Voxel centres in body-centred mm: x to the patient's left, y posterior, z superior (0 at slice 0)."""

    def __init__(self, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]):
        depth, height, width = shape
        self.shape = shape
        self.spacing = np.asarray(spacing_mm, dtype=np.float64)  # (dz, dy, dx)
        self.z = (np.arange(depth) * spacing_mm[0]).astype(np.float32)
        self.y = ((np.arange(height) - (height - 1) / 2) * spacing_mm[1]).astype(np.float32)
        self.x = ((np.arange(width) - (width - 1) / 2) * spacing_mm[2]).astype(np.float32)
        self.edge_mm = float(min(spacing_mm[1], spacing_mm[2]))

    def empty(self) -> np.ndarray:
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

    def lookup(self, field_mm: np.ndarray, point: np.ndarray) -> float:
        """Value of a full-grid field at the voxel nearest to `point` ((x, y, z) mm); -inf outside the grid."""
        index = (
            int(round(point[2] / self.spacing[0])),
            int(round((point[1] - self.y[0]) / self.spacing[1])),
            int(round((point[0] - self.x[0]) / self.spacing[2])),
        )
        if any(i < 0 or i >= n for i, n in zip(index, self.shape)):
            return -math.inf
        return float(field_mm[index])

    def index_of(self, point: np.ndarray) -> tuple[int, int, int]:
        return (
            int(round(point[2] / self.spacing[0])),
            int(round((point[1] - self.y[0]) / self.spacing[1])),
            int(round((point[0] - self.x[0]) / self.spacing[2])),
        )


def _add_capsule(grid: _Grid, sd: np.ndarray, p0, p1, r0: float, r1: float) -> None:
    """sd = max(sd, signed distance to the tapered tube from p0 (radius r0) to p1 (radius r1))."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    reach = max(r0, r1) + grid.edge_mm
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
    inside = np.float32(r0) + t * np.float32(r1 - r0) - dist
    np.maximum(sd[region], inside, out=sd[region])


def _add_polyline(grid: _Grid, sd: np.ndarray, points, radii) -> None:
    points = np.asarray(points, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
    for a in range(len(points) - 1):
        _add_capsule(grid, sd, points[a], points[a + 1], radii[a], radii[a + 1])


def _rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch), then x (roll)."""
    a, b, c = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


def _add_ellipsoid(grid: _Grid, sd: np.ndarray, center, axes, rotation: np.ndarray | None = None) -> None:
    """sd = max(sd, approximate signed distance to an ellipsoid (exact along rays from its centre))."""
    center = np.asarray(center, dtype=np.float64)
    axes = np.asarray(axes, dtype=np.float64)
    rotation = np.eye(3) if rotation is None else rotation
    reach = axes.max() + grid.edge_mm
    box = grid.box(center - reach, center + reach)
    if box is None:
        return
    region, z, y, x = box
    p = (x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2]))
    local = [sum(p[r] * np.float32(rotation[r, c]) for r in range(3)) for c in range(3)]  # u = R^T (p - c)
    rho = np.sqrt(sum((local[c] / np.float32(axes[c])) ** 2 for c in range(3)))
    norm = np.sqrt(sum(local[c] ** 2 for c in range(3)))
    inside = np.where(rho > 1e-3, norm * (1.0 / np.maximum(rho, 1e-3) - 1.0), np.float32(axes.min()))
    np.maximum(sd[region], inside.astype(np.float32), out=sd[region])


class _Painter:
    """Paints materials in order onto float HU and uint8 labels (later layers cover earlier ones)."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.hu = np.full(grid.shape, HU["air"], dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)

    def alpha(self, sd: np.ndarray) -> np.ndarray:
        return np.clip(0.5 + sd / np.float32(self.grid.edge_mm), 0.0, 1.0)

    def paint(self, sd_or_alpha: np.ndarray, value, label: Tissue, *, is_alpha: bool = False) -> None:
        alpha = sd_or_alpha if is_alpha else self.alpha(sd_or_alpha)
        self.hu += alpha * (np.asarray(value, dtype=np.float32) - self.hu)
        self.labels[alpha > 0.5] = label


# ---------------------------------------------------------------------------------------------------------
# Anatomy


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    return _unit(v - (v @ d) * d)


@dataclass
class _Tube:
    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    generation: int


def _grow_tree(
    rng: np.random.Generator,
    grid: _Grid,
    inside_sd: np.ndarray,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    *,
    min_radius: float,
    max_generation: int,
    out: list[_Tube],
    generation: int = 0,
) -> None:
    """A branching tree of wandering tubes that stays inside the region where `inside_sd` > 0.

    Each branch is 3 short tubes whose direction drifts randomly; at its end it splits in two children whose
    radii follow Murray's law (r^3 = r1^3 + r2^3), turned 15-60 degrees from the parent on opposite sides.
    """
    length = radius * rng.uniform(5.0, 8.0) + 3.0
    point, d, r = np.asarray(start, dtype=np.float64), _unit(direction), radius
    for _ in range(3):
        for attempt in range(6):  # turn harder each time the lung boundary is in the way
            d_try = _unit(d + rng.normal(0.0, 0.3 + 0.25 * attempt, 3))
            q = point + d_try * (length / 3)
            if generation == 0 or grid.lookup(inside_sd, q) > 0.5 * r:
                break
        else:
            return  # the branch runs into the lung boundary: stop it there
        r_next = r * 0.96
        out.append(_Tube(point, q, r, r_next, generation))
        point, d, r = q, d_try, r_next
    if generation >= max_generation or r * 0.72 < min_radius:
        return
    share = rng.uniform(0.75, 0.9)
    radii = (r * share, r * (1.0 - share**3) ** (1.0 / 3.0))
    angles = (rng.uniform(15.0, 35.0), -rng.uniform(35.0, 60.0))
    side = _perpendicular(rng, d)
    for child_radius, angle in zip(radii, angles):
        a = math.radians(angle)
        child = _unit(d * math.cos(a) + side * math.sin(a))
        _grow_tree(
            rng,
            grid,
            inside_sd,
            point,
            child,
            child_radius,
            min_radius=min_radius,
            max_generation=max_generation,
            out=out,
            generation=generation + 1,
        )


def make_phantom(
    seed: int,
    *,
    num_slices: int = 100,
    size: int = 128,
    slice_spacing_mm: float = 1.0,
    pixel_spacing_mm: float = 1.5,
    noise_hu: float = 15.0,
) -> Phantom:
    """Generate one thin-slice chest CT phantom.

    Args:
        seed: everything (anatomy, findings, noise) follows from it; the same seed gives the same array.
        num_slices: D, slices along z (inferior to superior); the thorax is scaled to fill them.
        size: H = W in pixels; the body fills ~85% of the field of view.
        slice_spacing_mm: dz (thin slices).
        pixel_spacing_mm: dy = dx.
        noise_hu: standard deviation of the correlated noise inside the body (0 for a noise-free phantom).

    Returns:
        A `Phantom` with int16 HU, tissue labels and the list of nodules and emboli.
    """
    if num_slices < 10 or size < 32:
        raise ValueError(f"phantom needs num_slices >= 10 and size >= 32, got {num_slices} and {size}")
    rng = np.random.default_rng(seed)
    spacing = (float(slice_spacing_mm), float(pixel_spacing_mm), float(pixel_spacing_mm))
    grid = _Grid((num_slices, size, size), spacing)
    painter = _Painter(grid)
    zz, yy, xx = grid.full()
    Z = num_slices * slice_spacing_mm  # thorax height
    fov = size * pixel_spacing_mm
    t = zz / np.float32(Z)  # 0 inferior .. 1 superior

    # Body: a superellipse whose size drifts with z; depth below the skin in mm along rays from its centre.
    scale = rng.uniform(0.92, 1.03)
    A = 0.40 * fov * scale  # half-width
    B_ant, B_post = 0.31 * fov * scale * rng.uniform(0.93, 1.0), 0.30 * fov * scale
    yc = 0.03 * fov
    power = rng.uniform(2.2, 2.6)
    s = A / 80.0  # organ sizes below are for a body 160 mm wide, scaled with it
    wobble = rng.uniform(0, 2 * math.pi, 6)
    a_z = A * (1 + 0.04 * np.sin(np.pi * t + wobble[0]) + 0.08 * (0.5 - t))  # wider towards the base
    b_z = np.where(yy < yc, B_ant, B_post) * (1 + 0.03 * np.sin(2 * np.pi * t + wobble[1]))
    dxb, dyb = xx, yy - np.float32(yc)
    rho = (np.abs(dxb / a_z) ** power + np.abs(dyb / b_z) ** power) ** (1 / power)
    radial = np.sqrt(dxb**2 + dyb**2)
    body_sd = (radial * (1 / np.maximum(rho, 1e-3) - 1)).astype(np.float32)
    phi = np.arctan2(dyb, dxb)  # 0 = patient's left, +pi/2 = posterior

    rng_f = np.concatenate(
        [[rng.uniform(0.8, 1.4)], rng.uniform(0, 2 * math.pi, 3), [rng.uniform(0.85, 1.2)]]
    )  # fat and muscle shape

    def wall_thickness(phi_, t_):
        """Subcutaneous fat and muscle thickness (mm) at angle phi_ (0 = left, pi/2 = posterior), height t_."""
        fat = (6.0 * s * rng_f[0]) * (1 + 0.35 * np.cos(2 * phi_ + rng_f[1]) + 0.2 * np.sin(phi_ + rng_f[2]))
        fat = fat * (1 + 0.15 * np.sin(2 * np.pi * t_ + rng_f[3]))
        muscle = 7.0 * s * rng_f[4] * (1 + 1.3 * np.maximum(0, np.sin(phi_)) ** 4)  # paraspinal muscles
        muscle = muscle + 5.0 * s * np.maximum(0, -np.sin(phi_)) ** 2 * np.clip((t_ - 0.35) * 3, 0, 1)  # pectoral
        return fat, muscle

    fat_mm, muscle_mm = wall_thickness(phi, t)
    muscle_sd = body_sd - fat_mm
    cavity_sd = body_sd - fat_mm - muscle_mm

    def wall_point(phi_: float, z_: float, depth_fraction: float) -> np.ndarray:
        """(x, y, z) mm of the point at `depth_fraction` of the muscle layer, along angle phi_ at height z_."""
        t_ = z_ / Z
        a_ = A * (1 + 0.04 * math.sin(math.pi * t_ + wobble[0]) + 0.08 * (0.5 - t_))
        b_ = (B_ant if math.sin(phi_) < 0 else B_post) * (1 + 0.03 * math.sin(2 * math.pi * t_ + wobble[1]))
        c, sn = math.cos(phi_), math.sin(phi_)
        r_skin = 1.0 / ((abs(c) / a_) ** power + (abs(sn) / b_) ** power) ** (1 / power)
        fat_, muscle_ = wall_thickness(np.float64(phi_), np.float64(t_))
        r = r_skin - fat_ - depth_fraction * muscle_
        return np.array([r * c, yc + r * sn, z_])

    # Spine geometry (needed by the lung mask).
    rv = 8.5 * s * rng.uniform(0.95, 1.08)  # vertebral body radius
    y_vert = yc + 0.40 * B_post
    level_mm = 14.0 * s * rng.uniform(0.92, 1.08) * Z / 100.0
    level_phase = rng.uniform(0, level_mm)

    # Diaphragm domes (right higher: liver), apex, mediastinum.
    h_right, h_left = rng.uniform(0.22, 0.30), rng.uniform(0.16, 0.23)
    lung_x = 0.5 * A
    # Each dome is a paraboloid under its lung, lowest laterally and posteriorly (the costophrenic recesses);
    # their maximum is one continuous diaphragm.
    recess = 0.3 * np.maximum(0, dyb / B_post) ** 2 + 0.1 * np.minimum(0, dyb / B_ant) ** 2
    h_mean = (h_right + h_left) / 2
    dome = Z * functools.reduce(
        np.maximum,
        [
            h_right - 1.0 * ((xx + lung_x) / A) ** 2 - recess,
            h_left - 1.0 * ((xx - lung_x) / A) ** 2 - recess,
            h_mean - 0.02 - 1.5 * (xx / A) ** 2 - recess,  # the central tendon under the heart
        ],
    ).astype(np.float32)
    apex = (Z * (0.93 - 1.6 * ((np.abs(xx) - lung_x) / A) ** 2 - 0.3 * ((dyb - 0.05 * B_post) / B_post) ** 2)).astype(
        np.float32
    )
    x_med = 0.03 * A
    w_med = (0.05 + 0.02 * np.sin(2 * np.pi * t + wobble[2])) * A  # the thin septum where the lungs meet

    # Heart: a rotated ellipsoid resting on the diaphragm, long axis to the left, anterior and inferior.
    heart_c = np.array([0.12 * A, yc - 0.30 * B_ant, Z * (h_mean + 0.14)])
    heart_axes = np.array([0.44 * A, 0.40 * B_ant, 0.19 * Z]) * rng.uniform(0.95, 1.05)
    heart_rot = _rotation(yaw_deg=-rng.uniform(25, 40), roll_deg=rng.uniform(-15, -5))
    heart_sd = grid.empty()
    _add_ellipsoid(grid, heart_sd, heart_c, heart_axes, heart_rot)

    # Great vessels (polylines of tubes).
    top = Z * 1.05
    aorta_pts = [
        heart_c + np.array([-0.10 * A, 0.10 * B_ant, 0.10 * Z]),
        [-0.03 * A, yc - 0.18 * B_ant, 0.62 * Z],
        [-0.02 * A, yc - 0.14 * B_ant, 0.76 * Z],
        [0.03 * A, yc + 0.02 * B_post, 0.84 * Z],  # arch, running posterior and to the left
        [0.12 * A, yc + 0.20 * B_post, 0.83 * Z],
        [0.19 * A, y_vert - 0.6 * rv, 0.74 * Z],
        [0.18 * A, y_vert - 0.5 * rv, 0.40 * Z],
        [0.10 * A, y_vert - 0.8 * rv, -0.05 * Z],
    ]
    aorta_r = np.array([6.5, 6.5, 6.2, 5.8, 5.5, 5.2, 5.0, 4.8]) * s
    aorta_sd = grid.empty()
    _add_polyline(grid, aorta_sd, aorta_pts, aorta_r)

    bifurcation = np.array([0.05 * A, yc - 0.10 * B_ant, 0.64 * Z])
    hilum_left = np.array([0.36 * A, yc + 0.08 * B_post, 0.62 * Z])
    hilum_right = np.array([-0.36 * A, yc + 0.04 * B_post, 0.58 * Z])
    pa_sd = grid.empty()
    _add_polyline(grid, pa_sd, [heart_c + np.array([0.02 * A, -0.15 * B_ant, 0.12 * Z]), bifurcation], [6 * s, 5.5 * s])
    pa_branches = [
        ([0.25 * A, yc - 0.02 * B_ant, 0.65 * Z], hilum_left),
        ([-0.10 * A, yc - 0.02 * B_ant, 0.61 * Z], hilum_right),
    ]
    for mid, hilum in pa_branches:
        _add_polyline(grid, pa_sd, [bifurcation, mid, hilum], [4.5 * s, 4.2 * s, 3.8 * s])
    svc_sd = grid.empty()
    _add_polyline(
        grid,
        svc_sd,
        [[-0.16 * A, yc - 0.10 * B_ant, top], [-0.14 * A, yc - 0.16 * B_ant, 0.48 * Z]],
        [4.5 * s, 4.5 * s],
    )

    # Trachea and main bronchi: tubes with a soft-tissue wall.
    carina = np.array([0.0, yc + 0.12 * B_post, 0.70 * Z])
    bronchus_left = np.array([0.30 * A, yc + 0.14 * B_post, 0.66 * Z])
    bronchus_right = np.array([-0.30 * A, yc + 0.10 * B_post, 0.64 * Z])
    airway_lumen, airway_outer = grid.empty(), grid.empty()
    for pts, radius in (
        ([[0.0, yc + 0.10 * B_post, top], carina], 5.5 * s),
        ([carina, bronchus_left], 3.8 * s),
        ([carina, bronchus_right], 4.0 * s),
    ):
        _add_polyline(grid, airway_lumen, pts, radius)
        _add_polyline(grid, airway_outer, pts, radius + 1.3 * s)
    esophagus_sd = grid.empty()
    _add_polyline(
        grid,
        esophagus_sd,
        [
            [0.03 * A, yc + 0.30 * B_post, top],
            [0.06 * A, yc + 0.30 * B_post, 0.3 * Z],
            [0.15 * A, yc + 0.1 * B_post, -0.05 * Z],
        ],
        3.5 * s,
    )

    # Lungs: inside the chest cavity, above the domes, below the apex, outside the mediastinum, heart,
    # aorta and spine. One signed field (min of the constraints, in mm).
    # The mediastinum: fat around the heart and the great vessels, the superior mediastinum above the heart,
    # the spine, and a thin septum where the lungs meet.
    spine_keepout = np.minimum(rv + 6 * s - np.abs(xx), dyb - (y_vert - yc - rv - 4 * s))
    superior = np.minimum(
        (1 - np.sqrt((xx / (0.17 * A)) ** 2 + ((yy - np.float32(yc - 0.05 * B_ant)) / (0.40 * B_ant)) ** 2)) * 0.17 * A,
        zz - np.float32(heart_c[2]),
    )
    mediastinum_sd = functools.reduce(
        np.maximum,
        [
            heart_sd + 3.0,
            aorta_sd + 3.0,
            pa_sd + 3.0,
            svc_sd + 3.0,
            airway_outer + 3.0,
            esophagus_sd + 3.0,
            spine_keepout,
            superior,
            w_med - np.abs(xx - x_med),
        ],
    )
    lung_sd = functools.reduce(np.minimum, [cavity_sd - 1.5, zz - dome, apex - zz, -mediastinum_sd]).astype(np.float32)

    # Vessel and airway trees grown from the hila into each lung.
    artery_tubes: list[_Tube] = []
    vein_tubes: list[_Tube] = []
    bronchus_tubes: list[_Tube] = []
    for side, hilum, bronchus in ((1.0, hilum_left, bronchus_left), (-1.0, hilum_right, bronchus_right)):
        artery_roots = (
            [side, 0.1, 0.9],
            [side, 0.5, 0.6],
            [side, 0.3, -0.8],
            [side, 0.9, -0.4],
            [side, -0.6, -0.3],
            [side, -0.2, -0.9],
            [side, 0.0, 0.0],
        )
        for direction in artery_roots:
            _grow_tree(
                rng,
                grid,
                lung_sd,
                hilum,
                np.array(direction),
                2.4 * s,
                min_radius=0.4,
                max_generation=8,
                out=artery_tubes,
            )
        vein_root = np.array([0.22 * side * A + 0.1 * A, yc + 0.02 * B_post, Z * (h_mean + 0.18)])
        for direction in (
            [side, -0.3, 0.6],
            [side, 0.2, -0.6],
            [side, -0.7, 0.0],
            [side, 0.6, 0.2],
            [side, -0.3, -0.7],
        ):
            _grow_tree(
                rng,
                grid,
                lung_sd,
                vein_root,
                np.array(direction),
                2.2 * s,
                min_radius=0.4,
                max_generation=8,
                out=vein_tubes,
            )
        for direction in ([side, 0.0, 0.8], [side, 0.4, -0.8], [side, 0.8, -0.3]):
            _grow_tree(
                rng,
                grid,
                lung_sd,
                bronchus,
                np.array(direction),
                2.4 * s,
                min_radius=0.9,
                max_generation=4,
                out=bronchus_tubes,
            )
    artery_sd, vein_sd = grid.empty(), grid.empty()
    bronchus_lumen, bronchus_outer = grid.empty(), grid.empty()
    for tube in artery_tubes:
        _add_capsule(grid, artery_sd, tube.p0, tube.p1, tube.r0, tube.r1)
    for tube in vein_tubes:
        _add_capsule(grid, vein_sd, tube.p0, tube.p1, tube.r0, tube.r1)
    for tube in bronchus_tubes:
        _add_capsule(grid, bronchus_lumen, tube.p0, tube.p1, tube.r0 * 0.75, tube.r1 * 0.75)
        _add_capsule(grid, bronchus_outer, tube.p0, tube.p1, tube.r0, tube.r1)

    # Findings: nodules in the lungs, emboli inside the larger pulmonary arteries.
    z_offset = -round(Z / 2)
    findings: list[dict] = []
    nodule_sd = grid.empty()
    nodule_hu = np.zeros(grid.shape, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(1.5, 3.5)
        for _attempt in range(200):
            center = np.array([rng.uniform(-A, A), rng.uniform(yc - B_ant, yc + B_post), rng.uniform(0.2 * Z, 0.9 * Z)])
            if grid.lookup(lung_sd, center) > radius + 2:
                break
        else:
            continue
        solid = rng.random() > 0.25
        value = rng.uniform(20, 70) if solid else rng.uniform(-600, -450)
        one = grid.empty()
        axes = radius * rng.uniform(0.8, 1.2, 3)
        _add_ellipsoid(grid, one, center, axes, _rotation(*rng.uniform(0, 180, 3)))
        if rng.random() < 0.4:  # lobulated: a second, smaller lobe
            _add_ellipsoid(grid, one, center + _unit(rng.normal(size=3)) * radius * 0.8, axes * 0.6)
        nodule_hu = np.where(one > nodule_sd, np.float32(value), nodule_hu)
        np.maximum(nodule_sd, one, out=nodule_sd)
        findings.append(
            {
                "kind": "nodule" if solid else "ground_glass_nodule",
                "radius_mm": round(float(radius), 2),
                "hu": round(float(value), 1),
                "center_mm": _world(center, grid, z_offset),
                "index": grid.index_of(center),
            }
        )
    embolus_sd = grid.empty()
    # Emboli lodge in the lobar and segmental arteries: the last stretch of each main pulmonary artery and
    # the first generations of the trees.
    large = [tube for tube in artery_tubes if tube.r0 >= 1.5 * s and tube.generation <= 2]
    large += [_Tube(np.array(mid), hilum, 4.0 * s, 3.8 * s, -1) for mid, hilum in pa_branches]
    for number in range(int(rng.integers(1, 4))):
        if not large:
            break
        tube = large[int(rng.integers(len(large)))]
        a = rng.uniform(0.0, 0.5)
        p0 = tube.p0 + a * (tube.p1 - tube.p0)
        p1 = p0 + _unit(tube.p1 - tube.p0) * tube.r0 * rng.uniform(2.0, 4.0)
        radius = tube.r0 * (rng.uniform(0.5, 0.7) if number else 0.85)  # the first one nearly occludes
        _add_capsule(grid, embolus_sd, p0, p1, radius, radius * 0.8)
        center = (p0 + p1) / 2
        findings.append(
            {
                "kind": "embolus",
                "radius_mm": round(float(radius), 2),
                "hu": HU["embolus"],
                "center_mm": _world(center, grid, z_offset),
                "index": grid.index_of(center),
            }
        )

    # Paint, outside in.
    painter.paint(body_sd, HU["fat"], Tissue.FAT)
    painter.paint(muscle_sd, HU["muscle"], Tissue.MUSCLE)
    painter.paint(cavity_sd, HU["mediastinum"], Tissue.FAT)
    abdomen_sd = np.minimum(cavity_sd, dome - zz)
    painter.paint(abdomen_sd, HU["liver"], Tissue.SOFT_TISSUE)
    stomach_c = np.array([0.38 * A, yc - 0.15 * B_ant, Z * (h_left - 0.10)])
    stomach_sd = grid.empty()
    _add_ellipsoid(grid, stomach_sd, stomach_c, [0.22 * A, 0.28 * B_ant, 0.12 * Z], _rotation(yaw_deg=30))
    stomach_sd = np.minimum(stomach_sd, abdomen_sd - 3)
    painter.paint(stomach_sd, HU["soft"] - 25, Tissue.SOFT_TISSUE)
    air_level = stomach_c[1] - rng.uniform(0.0, 0.15) * B_ant  # supine: gas rises anteriorly (smaller y)
    painter.paint(np.minimum(stomach_sd - 1.5, np.float32(air_level) - yy), HU["air"], Tissue.AIRWAY)

    smooth = ndimage.gaussian_filter(rng.standard_normal((num_slices // 4 + 1, size // 4 + 1, size // 4 + 1)), 1.5)
    smooth = ndimage.zoom(smooth / max(smooth.std(), 1e-6), 4, order=1)[:num_slices, :size, :size].astype(np.float32)
    lung_hu = HU["lung"] + 45.0 * (dyb / B_post) + 18.0 * smooth  # posterior (dependent) lung is denser
    painter.paint(lung_sd, lung_hu, Tissue.LUNG)
    painter.paint(np.minimum(bronchus_outer, lung_sd + 3), HU["soft"], Tissue.SOFT_TISSUE)
    painter.paint(np.minimum(bronchus_lumen, lung_sd + 3), HU["air"] + 40, Tissue.AIRWAY)
    painter.paint(vein_sd, HU["vein"], Tissue.BLOOD)
    painter.paint(artery_sd, HU["artery"], Tissue.BLOOD)
    painter.paint(nodule_sd, nodule_hu, Tissue.NODULE)

    # Heart: myocardium, then the chambers (right = arterial contrast, left = venous), split by the septum.
    painter.paint(heart_sd, HU["myocardium"], Tissue.SOFT_TISSUE)
    chambers = grid.empty()
    _add_ellipsoid(grid, chambers, heart_c, heart_axes - 4.0 * s, heart_rot)
    normal = heart_rot[:, 0]  # septum plane through the centre, normal along the long axis in-plane
    septum = (xx - np.float32(heart_c[0])) * np.float32(normal[1]) - (yy - np.float32(heart_c[1])) * np.float32(
        normal[0]
    )
    painter.paint(np.minimum(chambers, septum - 1.5 * s), HU["artery"], Tissue.BLOOD)
    painter.paint(np.minimum(chambers, -septum - 1.5 * s), HU["vein"], Tissue.BLOOD)
    painter.paint(aorta_sd, HU["vein"], Tissue.BLOOD)
    painter.paint(pa_sd, HU["artery"], Tissue.BLOOD)
    painter.paint(np.minimum(embolus_sd, np.maximum(artery_sd, pa_sd)), HU["embolus"], Tissue.EMBOLUS)
    painter.paint(svc_sd, HU["svc"], Tissue.BLOOD)
    painter.paint(np.minimum(airway_outer, zz - carina[2] + 30), HU["soft"], Tissue.SOFT_TISSUE)
    painter.paint(airway_lumen, HU["air"] + 20, Tissue.AIRWAY)
    painter.paint(esophagus_sd, HU["soft"], Tissue.SOFT_TISSUE)

    # Vertebrae: bodies with cortex and discs, the canal, the posterior arch and spinous process.
    cortex_sd, bone_sd, disc_sd, canal_sd = grid.empty(), grid.empty(), grid.empty(), grid.empty()
    disc_mm = 3.0 * Z / 100.0
    first = -2 - int(level_phase // level_mm)
    levels = [level_phase + n * level_mm for n in range(first, int(Z / level_mm) + 3)]
    for z0 in levels:
        z1 = z0 + level_mm - disc_mm
        zc = (z0 + z1) / 2
        body = np.array([0.0, y_vert, zc])
        box = grid.box(body - [rv + 2, rv + 2, level_mm], body + [rv + 2, rv + 2, level_mm])
        if box is not None:
            region, z, y, x = box
            inplane = rv * 0.92 - np.sqrt((x / 1.0) ** 2 + ((y - np.float32(y_vert)) / 0.85) ** 2)
            cyl = np.minimum(inplane, (z1 - z0) / 2 - np.abs(z - np.float32(zc)))
            np.maximum(cortex_sd[region], cyl, out=cortex_sd[region])
            np.maximum(bone_sd[region], cyl - 1.3, out=bone_sd[region])
            gap = np.minimum(inplane - 0.5, disc_mm / 2 - np.abs(z - np.float32(z1 + disc_mm / 2)))
            np.maximum(disc_sd[region], gap, out=disc_sd[region])
        canal_y = y_vert + rv + 4.0 * s
        arch_z = (z0 + level_mm * 0.15, z0 + level_mm * 0.8)
        for ring in range(10):  # posterior arch: a ring of tubes around the canal
            a0, a1 = math.pi * (-0.15 + 1.3 * ring / 10), math.pi * (-0.15 + 1.3 * (ring + 1) / 10)
            for zq in np.linspace(*arch_z, 3):
                p0 = [6.5 * s * math.cos(a0), canal_y + 6.5 * s * math.sin(a0), zq]
                p1 = [6.5 * s * math.cos(a1), canal_y + 6.5 * s * math.sin(a1), zq]
                _add_capsule(grid, cortex_sd, p0, p1, 2.2 * s, 2.2 * s)
        tip = [0.0, canal_y + 16 * s, z0 - 0.2 * level_mm]
        _add_capsule(grid, cortex_sd, [0.0, canal_y + 7 * s, arch_z[1]], tip, 2.4 * s, 1.6 * s)
        for sign in (-1, 1):  # pedicles and transverse processes
            _add_capsule(
                grid, cortex_sd, [sign * 0.6 * rv, y_vert + 0.6 * rv, zc], [sign * 5 * s, canal_y, zc], 2.3 * s, 2.3 * s
            )
            _add_capsule(
                grid,
                cortex_sd,
                [sign * 6 * s, canal_y + 1, zc],
                [sign * (rv + 9 * s), y_vert + 0.4 * rv, zc + 1],
                2.2 * s,
                2.0 * s,
            )
        _add_capsule(grid, canal_sd, [0.0, canal_y, z0 - level_mm], [0.0, canal_y, z0 + 2 * level_mm], 4.0 * s, 4.0 * s)

    # Ribs: oblique tubes from the transverse process around the chest wall, descending anteriorly, with
    # costal cartilage to the sternum for the upper ones.
    cartilage_sd, sternum_sd = grid.empty(), grid.empty()
    sternum_top, sternum_bottom = 0.95 * Z, h_mean * Z + 0.08 * Z
    for z0 in levels:
        z_head = z0 + 0.55 * level_mm
        drop = rng.uniform(1.6, 2.2) * level_mm
        radius = 2.3 * s * rng.uniform(0.9, 1.1)
        for sign in (-1, 1):
            phis = np.linspace(math.radians(78), math.radians(-55), 16)
            path = [np.array([sign * (rv + 9 * s), y_vert + 0.4 * rv, z_head])]
            for n, p in enumerate(phis):
                frac = n / (len(phis) - 1)
                angle = p if sign > 0 else math.pi - p
                point = wall_point(angle, z_head - drop * frac, 0.55)
                path.append(point)
            _add_polyline(grid, cortex_sd, path, radius)
            _add_polyline(grid, bone_sd, path, radius - 1.1)
            end = path[-1]
            if sternum_bottom < end[2] - 0.3 * level_mm < sternum_top:
                join = wall_point(-math.pi / 2 + sign * 0.25, end[2] - 0.3 * level_mm, 0.6)
                _add_polyline(grid, cartilage_sd, [end, join], [radius * 0.85, radius * 0.8])
    for z0 in np.arange(sternum_bottom, sternum_top, 0.14 * Z):
        z1 = min(z0 + 0.12 * Z, sternum_top)
        mid = wall_point(-math.pi / 2, (z0 + z1) / 2, 0.7)
        half = np.array([9 * s, 3.5 * s, (z1 - z0) / 2])
        box = grid.box(mid - half - 2, mid + half + 2)
        if box is not None:
            region, z, y, x = box
            inplane = 1 - np.sqrt((x / half[0]) ** 2 + ((y - np.float32(mid[1])) / half[1]) ** 2)
            seg = np.minimum(inplane * half[1], half[2] - np.abs(z - np.float32(mid[2])))
            np.maximum(sternum_sd[region], seg, out=sternum_sd[region])
    painter.paint(cartilage_sd, HU["cartilage"], Tissue.SOFT_TISSUE)
    painter.paint(disc_sd, HU["disc"], Tissue.SOFT_TISSUE)
    painter.paint(np.maximum(cortex_sd, sternum_sd), HU["cortex"], Tissue.CORTEX)
    painter.paint(np.maximum(bone_sd, sternum_sd - 1.2), HU["bone"], Tissue.BONE)
    painter.paint(np.minimum(canal_sd, -bone_sd), HU["csf"], Tissue.SOFT_TISSUE)

    # Scanner table under the patient: two shells around a foam core, curved with the back.
    table_y = yc + B_post + 4.0 + 0.02 * xx**2 / A
    within = (0.48 * fov - np.abs(xx)).astype(np.float32)
    shell = np.minimum(within, 3.0 - np.abs(yy - (table_y + 3.0)))
    painter.paint(np.broadcast_to(shell, grid.shape), HU["table_shell"], Tissue.TABLE)
    core = np.minimum(within - 2, 1.8 - np.abs(yy - (table_y + 3.0)))
    painter.paint(np.broadcast_to(core, grid.shape), HU["table_core"], Tissue.TABLE)

    # Acquisition: point-spread blur, then correlated noise (stronger inside the body, as photon counts drop).
    hu = ndimage.gaussian_filter(painter.hu, sigma=(0.5 / spacing[0], 0.5 / spacing[1], 0.5 / spacing[2]))
    if noise_hu > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), sigma=(0.4, 0.8, 0.8))
        noise *= np.float32(noise_hu) / max(float(noise.std()), 1e-6)
        inside = np.clip(0.5 + body_sd / 10.0, 0.0, 1.0)
        hu += noise * (0.6 + 0.4 * inside)
    hu_int16 = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)

    origin = (float(grid.x[0]), float(grid.y[0]), float(z_offset))
    return Phantom(
        hu=hu_int16, labels=painter.labels, spacing_mm=spacing, origin_mm=origin, seed=seed, findings=findings
    )


def _world(point: np.ndarray, grid: _Grid, z_offset: float) -> list[float]:
    return [round(float(point[0]), 2), round(float(point[1]), 2), round(float(point[2] + z_offset), 2)]


# ---------------------------------------------------------------------------------------------------------
# DICOM studies and cohorts


@dataclass
class PhantomStudy:
    """Where one phantom study was written."""

    index: int
    patient_name: str
    study_dir: Path
    thin_dir: Path
    thick_dir: Path | None
    seed: int
    findings: list[dict]


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["ctld-phantom", *(str(p) for p in parts)])


def write_study(
    phantom: Phantom,
    out_dir: str | os.PathLike,
    *,
    index: int,
    with_thick: bool,
    factor: int = 5,
) -> PhantomStudy:
    """Write `phantom` as a thin DICOM series (and a thick one of the same acquisition) under
    `out_dir/PHANTOM_<index>/`. Patient and study attributes are fake but look real, on purpose."""
    from ctld.data.dicom_write import write_dicom_series

    name = f"PHANTOM^{index:03d}"
    study_dir = Path(out_dir) / f"PHANTOM_{index:03d}"
    patient = {
        "PatientName": name,
        "PatientID": f"PH{index:06d}",
        "PatientBirthDate": f"2016{(index % 12) + 1:02d}15",
        "PatientSex": "MF"[index % 2],
        "PatientAge": "009Y",
    }
    study = {
        "StudyInstanceUID": _uid(phantom.seed, index, "study"),
        "FrameOfReferenceUID": _uid(phantom.seed, index, "frame"),
        "StudyDate": "20260101",
        "StudyTime": "120000",
        "StudyID": f"{index}",
        "StudyDescription": "CTLD PHANTOM CHEST CTPA",
        "AccessionNumber": f"ACC{index:07d}",
        "InstitutionName": "CTLD Phantom Children's Hospital",
        "ReferringPhysicianName": "DOE^JANE",
        "Manufacturer": "ctld phantom",
    }
    thin = phantom.volume()
    thin_dir = study_dir / "thin_1mm"
    write_dicom_series(
        thin,
        thin_dir,
        patient=patient,
        study=study,
        series_description=f"CHEST {thin.spacing_mm[0]:g}mm",
        series_number=2,
        series_instance_uid=_uid(phantom.seed, index, "thin"),
    )
    thick_dir = None
    if with_thick:
        thick = thick_volume(thin, factor)
        thick_dir = study_dir / f"thick_{thick.spacing_mm[0]:g}mm"
        write_dicom_series(
            thick,
            thick_dir,
            patient=patient,
            study=study,
            series_description=f"CHEST {thick.spacing_mm[0]:g}mm",
            series_number=3,
            series_instance_uid=_uid(phantom.seed, index, "thick"),
        )
    return PhantomStudy(index, name, study_dir, thin_dir, thick_dir, phantom.seed, phantom.findings)


def make_cohort(
    out_dir: str | os.PathLike,
    n_studies: int,
    seed: int,
    *,
    thick_fraction: float = 0.5,
    factor: int = 5,
    first_index: int = 1,
    **phantom_kwargs,
) -> list[PhantomStudy]:
    """Generate `n_studies` phantoms and write them as DICOM studies under `out_dir`, plus `phantoms.json`.

    Args:
        out_dir: one `PHANTOM_<index>/` folder per study (thin_1mm/ and, for some, thick_5mm/).
        n_studies: how many studies.
        seed: cohort seed; study i uses its own seed drawn from it, so studies differ and reruns match.
        thick_fraction: fraction of studies that also get a thick series (spread evenly over the cohort).
        factor: thick / thin spacing.
        first_index: index (and patient name number) of the first study.
        phantom_kwargs: passed to `make_phantom` (num_slices, size, pixel_spacing_mm, noise_hu, ...).
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if not 0.0 <= thick_fraction <= 1.0:
        raise ValueError(f"thick_fraction must be in [0, 1], got {thick_fraction}")
    out_dir = Path(out_dir)
    seeds = np.random.SeedSequence(seed).generate_state(n_studies)
    studies = []
    for n in range(n_studies):
        with_thick = math.ceil((n + 1) * thick_fraction) > math.ceil(n * thick_fraction)  # the first one has it
        phantom = make_phantom(int(seeds[n]), **phantom_kwargs)
        studies.append(write_study(phantom, out_dir, index=first_index + n, with_thick=with_thick, factor=factor))
        logger.info("phantom study %d/%d written to %s", n + 1, n_studies, studies[-1].study_dir)
    record = [
        {
            "index": study.index,
            "study_dir": study.study_dir.name,
            "thin_dir": str(study.thin_dir.relative_to(out_dir)),
            "thick_dir": str(study.thick_dir.relative_to(out_dir)) if study.thick_dir else None,
            "seed": study.seed,
            "findings": study.findings,
        }
        for study in studies
    ]
    tmp = out_dir / "phantoms.json.tmp"
    tmp.write_text(json.dumps({"cohort_seed": seed, "phantom": phantom_kwargs, "studies": record}, indent=1))
    tmp.replace(out_dir / "phantoms.json")
    return studies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctld.demo.phantom",
        description="Write a cohort of procedural chest CT phantoms as DICOM studies (thin 1 mm, some thick 5 mm).",
    )
    parser.add_argument("out_dir", help="folder for PHANTOM_<n>/ study folders and phantoms.json")
    parser.add_argument("--n_studies", type=int, default=8, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--num_slices", type=int, default=100, help="thin slices per study")
    parser.add_argument("--size", type=int, default=128, help="rows = columns")
    parser.add_argument("--pixel_spacing_mm", type=float, default=1.5, help="in-plane pixel spacing")
    parser.add_argument("--noise_hu", type=float, default=15.0, help="noise standard deviation in the body")
    parser.add_argument("--thick_fraction", type=float, default=0.5, help="fraction of studies with a thick series")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    studies = make_cohort(
        args.out_dir,
        args.n_studies,
        args.seed,
        thick_fraction=args.thick_fraction,
        num_slices=args.num_slices,
        size=args.size,
        pixel_spacing_mm=args.pixel_spacing_mm,
        noise_hu=args.noise_hu,
    )
    print(f"wrote {len(studies)} phantom studies to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
