"""The phantom's bones: vertebrae (cancellous bodies with a cortex, discs, the canal, posterior arches), oblique
ribs with costal cartilage, and the sternum, as signed-distance fields (mm, positive inside).

Short names for the body frame (A, B_ant, B_post, yc, Z, s) as in `ctld.demo.phantom_thorax`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ctld.demo.phantom_shapes import Grid, add_capsule, add_polyline
from ctld.demo.phantom_thorax import SpineLayout, Torso


@dataclass
class Skeleton:
    cortex_sd: np.ndarray  # vertebral cortex, posterior elements, rib cortex
    bone_sd: np.ndarray  # cancellous bone of the vertebral bodies and ribs
    disc_sd: np.ndarray
    canal_sd: np.ndarray  # the spinal canal (CSF)
    cartilage_sd: np.ndarray  # costal cartilage
    sternum_sd: np.ndarray


def make_skeleton(rng: np.random.Generator, torso: Torso, spine: SpineLayout, mean_dome_height: float) -> Skeleton:
    grid = torso.grid
    skeleton = Skeleton(*(grid.empty() for _ in range(6)))
    Z, level_mm = torso.height_mm, spine.level_mm
    first = -2 - int(spine.level_phase_mm // level_mm)
    levels = [spine.level_phase_mm + n * level_mm for n in range(first, int(Z / level_mm) + 3)]
    for z0 in levels:
        _add_vertebra(grid, skeleton, z0, torso, spine)
    _add_ribs(rng, skeleton, levels, torso, spine, mean_dome_height)
    _add_sternum(grid, skeleton, torso, mean_dome_height)
    return skeleton


def _add_vertebra(grid: Grid, skeleton: Skeleton, z0: float, torso: Torso, spine: SpineLayout) -> None:
    """One level from z0 up: the body with its cortex and the disc above it, the posterior arch around the
    canal, the spinous process, pedicles and transverse processes, and the canal itself."""
    s, Z = torso.organ_scale, torso.height_mm
    rv, y_vert, level_mm = spine.body_radius_mm, spine.body_y_mm, spine.level_mm
    disc_mm = 3.0 * Z / 100.0
    z1 = z0 + level_mm - disc_mm
    zc = (z0 + z1) / 2
    body = np.array([0.0, y_vert, zc])
    box = grid.box(body - [rv + 2, rv + 2, level_mm], body + [rv + 2, rv + 2, level_mm])
    if box is not None:
        region, z, y, x = box
        inplane = rv * 0.92 - np.sqrt((x / 1.0) ** 2 + ((y - np.float32(y_vert)) / 0.85) ** 2)
        cyl = np.minimum(inplane, (z1 - z0) / 2 - np.abs(z - np.float32(zc)))
        np.maximum(skeleton.cortex_sd[region], cyl, out=skeleton.cortex_sd[region])
        np.maximum(skeleton.bone_sd[region], cyl - 1.3, out=skeleton.bone_sd[region])
        gap = np.minimum(inplane - 0.5, disc_mm / 2 - np.abs(z - np.float32(z1 + disc_mm / 2)))
        np.maximum(skeleton.disc_sd[region], gap, out=skeleton.disc_sd[region])
    cortex_sd = skeleton.cortex_sd
    canal_y = y_vert + rv + 4.0 * s
    arch_z = (z0 + level_mm * 0.15, z0 + level_mm * 0.8)
    for ring in range(10):  # posterior arch: a ring of tubes around the canal
        a0, a1 = math.pi * (-0.15 + 1.3 * ring / 10), math.pi * (-0.15 + 1.3 * (ring + 1) / 10)
        for zq in np.linspace(*arch_z, 3):
            p0 = [6.5 * s * math.cos(a0), canal_y + 6.5 * s * math.sin(a0), zq]
            p1 = [6.5 * s * math.cos(a1), canal_y + 6.5 * s * math.sin(a1), zq]
            add_capsule(grid, cortex_sd, p0, p1, 2.2 * s, 2.2 * s)
    tip = [0.0, canal_y + 16 * s, z0 - 0.2 * level_mm]
    add_capsule(grid, cortex_sd, [0.0, canal_y + 7 * s, arch_z[1]], tip, 2.4 * s, 1.6 * s)
    for sign in (-1, 1):  # pedicles and transverse processes
        pedicle = ([sign * 0.6 * rv, y_vert + 0.6 * rv, zc], [sign * 5 * s, canal_y, zc])
        add_capsule(grid, cortex_sd, *pedicle, 2.3 * s, 2.3 * s)
        transverse = ([sign * 6 * s, canal_y + 1, zc], [sign * (rv + 9 * s), y_vert + 0.4 * rv, zc + 1])
        add_capsule(grid, cortex_sd, *transverse, 2.2 * s, 2.0 * s)
    canal = ([0.0, canal_y, z0 - level_mm], [0.0, canal_y, z0 + 2 * level_mm])
    add_capsule(grid, skeleton.canal_sd, *canal, 4.0 * s, 4.0 * s)


def _add_ribs(
    rng: np.random.Generator,
    skeleton: Skeleton,
    levels: list[float],
    torso: Torso,
    spine: SpineLayout,
    mean_dome_height: float,
) -> None:
    """Oblique tubes from the transverse process around the chest wall, descending anteriorly, with costal
    cartilage to the sternum for the upper ones."""
    grid, s, Z = torso.grid, torso.organ_scale, torso.height_mm
    rv, y_vert, level_mm = spine.body_radius_mm, spine.body_y_mm, spine.level_mm
    sternum_top, sternum_bottom = 0.95 * Z, mean_dome_height * Z + 0.08 * Z
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
                path.append(torso.wall_point(angle, z_head - drop * frac, 0.55))
            add_polyline(grid, skeleton.cortex_sd, path, radius)
            add_polyline(grid, skeleton.bone_sd, path, radius - 1.1)
            end = path[-1]
            if sternum_bottom < end[2] - 0.3 * level_mm < sternum_top:
                join = torso.wall_point(-math.pi / 2 + sign * 0.25, end[2] - 0.3 * level_mm, 0.6)
                add_polyline(grid, skeleton.cartilage_sd, [end, join], [radius * 0.85, radius * 0.8])


def _add_sternum(grid: Grid, skeleton: Skeleton, torso: Torso, mean_dome_height: float) -> None:
    """Flat elliptic segments in front of the heart, from above the diaphragm to the top of the thorax."""
    s, Z = torso.organ_scale, torso.height_mm
    sternum_top, sternum_bottom = 0.95 * Z, mean_dome_height * Z + 0.08 * Z
    for z0 in np.arange(sternum_bottom, sternum_top, 0.14 * Z):
        z1 = min(z0 + 0.12 * Z, sternum_top)
        mid = torso.wall_point(-math.pi / 2, (z0 + z1) / 2, 0.7)
        half = np.array([9 * s, 3.5 * s, (z1 - z0) / 2])
        box = grid.box(mid - half - 2, mid + half + 2)
        if box is not None:
            region, z, y, x = box
            inplane = 1 - np.sqrt((x / half[0]) ** 2 + ((y - np.float32(mid[1])) / half[1]) ** 2)
            seg = np.minimum(inplane * half[1], half[2] - np.abs(z - np.float32(mid[2])))
            np.maximum(skeleton.sternum_sd[region], seg, out=skeleton.sternum_sd[region])
