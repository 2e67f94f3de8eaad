"""Inside the phantom's lungs: pulmonary artery, vein and bronchial trees grown from the hila, and the
findings (nodules in the lungs, emboli in the larger pulmonary arteries) with their records.

Short names for the body frame (A, B_ant, B_post, yc, Z, s) as in `ctld.demo.phantom_thorax`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctld.demo.phantom_shapes import Tube, add_capsule, add_ellipsoid, grow_tree, rotation, unit
from ctld.demo.phantom_thorax import CentralAirways, GreatVessels, Torso
from ctld.demo.phantom_tissue import HU

# Directions of the first branches from each hilum, (y, z) with x = +1 towards the left lung, -1 the right.
ARTERY_ROOTS = ((0.1, 0.9), (0.5, 0.6), (0.3, -0.8), (0.9, -0.4), (-0.6, -0.3), (-0.2, -0.9), (0.0, 0.0))
VEIN_ROOTS = ((-0.3, 0.6), (0.2, -0.6), (-0.7, 0.0), (0.6, 0.2), (-0.3, -0.7))
BRONCHUS_ROOTS = ((0.0, 0.8), (0.4, -0.8), (0.8, -0.3))


@dataclass
class PulmonaryTrees:
    artery_tubes: list[Tube]  # emboli lodge in the larger ones
    artery_sd: np.ndarray
    vein_sd: np.ndarray
    bronchus_lumen_sd: np.ndarray
    bronchus_outer_sd: np.ndarray  # lumen plus the wall


def grow_pulmonary_trees(
    rng: np.random.Generator,
    torso: Torso,
    lung_sd: np.ndarray,
    vessels: GreatVessels,
    airways: CentralAirways,
    mean_dome_height: float,
) -> PulmonaryTrees:
    """Vessel and airway trees grown from the hila into each lung (left lung first: arteries, veins, bronchi)."""
    grid, s = torso.grid, torso.organ_scale
    A, B_post, yc, Z = torso.half_width_mm, torso.half_depth_posterior_mm, torso.center_y_mm, torso.height_mm
    artery_tubes: list[Tube] = []
    vein_tubes: list[Tube] = []
    bronchus_tubes: list[Tube] = []

    def grow(start, side, roots, radius_mm, min_radius_mm, max_generation, out):
        for dy, dz in roots:
            direction = np.array([side, dy, dz])
            grow_tree(
                rng,
                grid,
                lung_sd,
                start,
                direction,
                radius_mm,
                min_radius_mm=min_radius_mm,
                max_generation=max_generation,
                out=out,
            )

    sides = ((1.0, vessels.hilum_left, airways.bronchus_left), (-1.0, vessels.hilum_right, airways.bronchus_right))
    for side, hilum, bronchus in sides:
        grow(hilum, side, ARTERY_ROOTS, 2.4 * s, 0.4, 8, artery_tubes)
        vein_root = np.array([0.22 * side * A + 0.1 * A, yc + 0.02 * B_post, Z * (mean_dome_height + 0.18)])
        grow(vein_root, side, VEIN_ROOTS, 2.2 * s, 0.4, 8, vein_tubes)
        grow(bronchus, side, BRONCHUS_ROOTS, 2.4 * s, 0.9, 4, bronchus_tubes)

    artery_sd, vein_sd = grid.empty(), grid.empty()
    bronchus_lumen, bronchus_outer = grid.empty(), grid.empty()
    for tube in artery_tubes:
        add_capsule(grid, artery_sd, tube.p0, tube.p1, tube.r0_mm, tube.r1_mm)
    for tube in vein_tubes:
        add_capsule(grid, vein_sd, tube.p0, tube.p1, tube.r0_mm, tube.r1_mm)
    for tube in bronchus_tubes:
        add_capsule(grid, bronchus_lumen, tube.p0, tube.p1, tube.r0_mm * 0.75, tube.r1_mm * 0.75)
        add_capsule(grid, bronchus_outer, tube.p0, tube.p1, tube.r0_mm, tube.r1_mm)
    return PulmonaryTrees(artery_tubes, artery_sd, vein_sd, bronchus_lumen, bronchus_outer)


def _world_mm(point: np.ndarray, z_offset_mm: float) -> list[float]:
    """(x, y, z) in the patient frame of the written study, rounded for the record."""
    return [round(float(point[0]), 2), round(float(point[1]), 2), round(float(point[2] + z_offset_mm), 2)]


def place_nodules(
    rng: np.random.Generator, torso: Torso, lung_sd: np.ndarray, z_offset_mm: float
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """2-4 nodules 3-7 mm across inside the lungs, solid or ground glass, some lobulated.

    Returns the nodules' signed distances, the HU of the nodule covering each voxel, and their records."""
    grid = torso.grid
    A, B_ant, B_post, yc, Z = torso.outline_mm
    records: list[dict] = []
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
        add_ellipsoid(grid, one, center, axes, rotation(*rng.uniform(0, 180, 3)))
        if rng.random() < 0.4:  # lobulated: a second, smaller lobe
            add_ellipsoid(grid, one, center + unit(rng.normal(size=3)) * radius * 0.8, axes * 0.6)
        nodule_hu = np.where(one > nodule_sd, np.float32(value), nodule_hu)
        np.maximum(nodule_sd, one, out=nodule_sd)
        records.append(
            {
                "kind": "nodule" if solid else "ground_glass_nodule",
                "radius_mm": round(float(radius), 2),
                "hu": round(float(value), 1),
                "center_mm": _world_mm(center, z_offset_mm),
                "index": grid.index_of(center),
            }
        )
    return nodule_sd, nodule_hu, records


def place_emboli(
    rng: np.random.Generator, torso: Torso, trees: PulmonaryTrees, vessels: GreatVessels, z_offset_mm: float
) -> tuple[np.ndarray, list[dict]]:
    """1-3 emboli (filling defects) in the lobar and segmental arteries: the last stretch of each main
    pulmonary artery and the first generations of the trees. Returns their signed distances and records."""
    grid, s = torso.grid, torso.organ_scale
    records: list[dict] = []
    embolus_sd = grid.empty()
    large = [tube for tube in trees.artery_tubes if tube.r0_mm >= 1.5 * s and tube.generation <= 2]
    large += [Tube(np.array(mid), hilum, 4.0 * s, 3.8 * s, -1) for mid, hilum in vessels.pulmonary_branches]
    for number in range(int(rng.integers(1, 4))):
        if not large:
            break
        tube = large[int(rng.integers(len(large)))]
        a = rng.uniform(0.0, 0.5)
        p0 = tube.p0 + a * (tube.p1 - tube.p0)
        p1 = p0 + unit(tube.p1 - tube.p0) * tube.r0_mm * rng.uniform(2.0, 4.0)
        radius = tube.r0_mm * (rng.uniform(0.5, 0.7) if number else 0.85)  # the first one nearly occludes
        add_capsule(grid, embolus_sd, p0, p1, radius, radius * 0.8)
        center = (p0 + p1) / 2
        records.append(
            {
                "kind": "embolus",
                "radius_mm": round(float(radius), 2),
                "hu": HU["embolus"],
                "center_mm": _world_mm(center, z_offset_mm),
                "index": grid.index_of(center),
            }
        )
    return embolus_sd, records
